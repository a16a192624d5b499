; C++ definitions for services/search/engine/symbols/symbols.py.
; Captures as in c.scm. Functions, typedefs, variables and in-class method declarations have
; no @name: symbols.py follows the declarator chain; a qualified declarator
; (`void Foo::bar()`) yields `bar` qualified as `Foo::bar`.

(function_definition) @definition.function

(type_definition) @definition.type

(alias_declaration name: (type_identifier) @name) @definition.type

(namespace_definition name: (_) @name) @definition.namespace

(class_specifier name: (_) @name body: (field_declaration_list)) @definition.class

(struct_specifier name: (_) @name body: (field_declaration_list)) @definition.struct

(union_specifier name: (_) @name body: (field_declaration_list)) @definition.struct

(enum_specifier name: (_) @name body: (enumerator_list)) @definition.enum

(enumerator name: (identifier) @name) @definition.constant

(preproc_def name: (identifier) @name) @definition.macro

(preproc_function_def name: (identifier) @name) @definition.macro

(concept_definition name: (identifier) @name) @definition.type

; Method declarations inside a class body (definitions are function_definition above).
(field_declaration_list
  (field_declaration declarator: (function_declarator)) @definition.method)

(field_declaration_list
  (declaration declarator: (function_declarator)) @definition.method)

(translation_unit (declaration) @definition.variable)

(declaration_list (declaration) @definition.variable)

(preproc_if (declaration) @definition.variable)
(preproc_ifdef (declaration) @definition.variable)
(preproc_else (declaration) @definition.variable)
(preproc_elif (declaration) @definition.variable)
(preproc_elifdef (declaration) @definition.variable)
