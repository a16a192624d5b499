"""search runs queries over an index snapshot: candidates, verification, ranking and pages.

request (what a search asks for), candidates (the plan evaluated per segment), searchrun (one
ranked run), hits and page (verified matches into a SearchResult), stream (every match in index
order, and counts), rank, cursor, results, and searcher, the public entry point.

Nothing is imported here: each caller imports the module it needs.
"""
