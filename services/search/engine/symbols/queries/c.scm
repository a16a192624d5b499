; C definitions for services/search/engine/symbols/symbols.py.
; Captures: @definition.<kind> spans the definition, @name is its name. Functions, typedefs
; and global variables have no @name: symbols.py follows the declarator chain
; (pointer, array, parenthesised, init declarators) to the identifier, and drops prototypes.
; Top-level declarations are matched directly under the translation unit or under
; preprocessor conditionals (symbols.py checks the latter are not inside a function).

(function_definition) @definition.function

(type_definition) @definition.type

(struct_specifier name: (type_identifier) @name body: (field_declaration_list)) @definition.struct

(union_specifier name: (type_identifier) @name body: (field_declaration_list)) @definition.struct

(enum_specifier name: (type_identifier) @name body: (enumerator_list)) @definition.enum

(enumerator name: (identifier) @name) @definition.constant

(preproc_def name: (identifier) @name) @definition.macro

(preproc_function_def name: (identifier) @name) @definition.macro

(translation_unit (declaration) @definition.variable)

(preproc_if (declaration) @definition.variable)
(preproc_ifdef (declaration) @definition.variable)
(preproc_else (declaration) @definition.variable)
(preproc_elif (declaration) @definition.variable)
(preproc_elifdef (declaration) @definition.variable)
