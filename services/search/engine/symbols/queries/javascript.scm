; JavaScript definitions for services/search/engine/symbols/symbols.py (also the base of TypeScript's).
; Captures: @definition.<kind> spans the definition, @name is its name.
; Top-level `const f = () => ...` becomes a function in symbols.py; other `const`s constants.

(function_declaration name: (identifier) @name) @definition.function

(generator_function_declaration name: (identifier) @name) @definition.function

(class_declaration name: (_) @name) @definition.class

(method_definition name: (_) @name) @definition.method

(field_definition property: (_) @name) @definition.field

(program
  [(lexical_declaration (variable_declarator name: (identifier) @name) @definition.variable)
   (variable_declaration (variable_declarator name: (identifier) @name) @definition.variable)])

(program
  (export_statement
    declaration: [
      (lexical_declaration (variable_declarator name: (identifier) @name) @definition.variable)
      (variable_declaration (variable_declarator name: (identifier) @name) @definition.variable)]))

; Pre-class JavaScript: `Foo.prototype.bar = function () {}` is the method `Foo.bar`, and
; `exports.baz = () => {}` the function `baz` (symbols.py reads @owner).
(program
  (expression_statement
    (assignment_expression
      left: (member_expression object: (_) @owner property: (property_identifier) @name)
      right: [(function_expression) (arrow_function) (generator_function)]) @definition.function))
