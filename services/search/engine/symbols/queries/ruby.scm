; Ruby definitions for services/search/engine/symbols/symbols.py.
; Captures: @definition.<kind> spans the definition, @name is its name. `class A::B` names
; are split on `::` in symbols.py; methods inside `class << self` belong to the class.

(class name: [(constant) (scope_resolution)] @name) @definition.class

(module name: [(constant) (scope_resolution)] @name) @definition.module

(method name: (_) @name) @definition.method

(singleton_method name: (_) @name) @definition.method

(assignment left: (constant) @name) @definition.constant
