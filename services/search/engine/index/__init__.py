"""index is the engine's on-disk index: written (builder, writer, merge, build) and read (reader, index).

The layout is described once, at the top of format.py. Data flows from a source tree (build) or
documents (writer) through segment writing (builder, postings, trigrams, facts) to immutable
segment files, which reader opens and index pins as snapshots of the live segments.

Nothing is imported here: each caller imports the module it needs (`kotadb index search` must
not pay for the writer).
"""
