; Python definitions for services/search/engine/symbols/symbols.py.
; Captures: @definition.<kind> spans the definition, @name is its name. Functions nested in a
; class become methods, and upper-case module variables become constants, in symbols.py.

(class_definition name: (identifier) @name) @definition.class

(function_definition name: (identifier) @name) @definition.function

(type_alias_statement left: (type (identifier) @name)) @definition.type

; Module-level assignments (`X = 1`, `x: int = 2`) are variables or constants.
(module
  (expression_statement
    (assignment left: (identifier) @name) @definition.variable))

; Class-level assignments are fields (dataclass fields, enum members, class constants).
(class_definition
  body: (block
    (expression_statement
      (assignment left: (identifier) @name) @definition.field)))
