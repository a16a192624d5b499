"""symbols finds symbol definitions with tree-sitter and searches them.

symbols (one document's definitions, by queries/<language>.scm), pygaps (Python function bodies
left out of the parse), symbolpool (extraction over worker processes) and symsearch (symbol
search ranking).

Nothing is imported here: importing the package does not load tree-sitter.
"""
