; TypeScript and TSX definitions for services/search/engine/symbols/symbols.py.
; Captures: @definition.<kind> spans the definition, @name is its name.

(function_declaration name: (identifier) @name) @definition.function

(generator_function_declaration name: (identifier) @name) @definition.function

(function_signature name: (identifier) @name) @definition.function

(class_declaration name: (_) @name) @definition.class

(abstract_class_declaration name: (_) @name) @definition.class

(interface_declaration name: (_) @name) @definition.interface

(type_alias_declaration name: (_) @name) @definition.type

(enum_declaration name: (_) @name) @definition.enum

(internal_module name: (_) @name) @definition.namespace

(module name: (_) @name) @definition.module

(method_definition name: (_) @name) @definition.method

(method_signature name: (_) @name) @definition.method

(abstract_method_signature name: (_) @name) @definition.method

(public_field_definition name: (_) @name) @definition.field

(interface_body (property_signature name: (_) @name) @definition.field)

(program
  [(lexical_declaration (variable_declarator name: (identifier) @name) @definition.variable)
   (variable_declaration (variable_declarator name: (identifier) @name) @definition.variable)])

(program
  (export_statement
    declaration: [
      (lexical_declaration (variable_declarator name: (identifier) @name) @definition.variable)
      (variable_declaration (variable_declarator name: (identifier) @name) @definition.variable)]))
