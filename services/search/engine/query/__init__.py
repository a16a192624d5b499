"""query turns what a user typed into what the engine runs: a trigram plan and a match tree.

query (the query language), regexsyntax (RE2 syntax, for planning), plan (trigram plans),
verify (exact line matching with RE2 semantics) and matchtree (a parsed query compiled into
per-document matchers). It reads no index.

Nothing is imported here: each caller imports the module it needs.
"""
