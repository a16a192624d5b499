; Java definitions for services/search/engine/symbols/symbols.py.
; Captures: @definition.<kind> spans the definition, @name is its name. `static final`
; fields become constants in symbols.py.

(class_declaration name: (identifier) @name) @definition.class

(record_declaration name: (identifier) @name) @definition.class

(interface_declaration name: (identifier) @name) @definition.interface

(annotation_type_declaration name: (identifier) @name) @definition.interface

(enum_declaration name: (identifier) @name) @definition.enum

(method_declaration name: (identifier) @name) @definition.method

(constructor_declaration name: (identifier) @name) @definition.method

(compact_constructor_declaration name: (identifier) @name) @definition.method

(enum_constant name: (identifier) @name) @definition.constant

(field_declaration declarator: (variable_declarator name: (identifier) @name)) @definition.field

(constant_declaration declarator: (variable_declarator name: (identifier) @name)) @definition.constant
