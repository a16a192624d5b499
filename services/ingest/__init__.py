"""The ingest service: documents, repositories, GitHub webhooks and the indexing job queue.

Start it with `kotadb serve ingest` or `python -m services.ingest`; `services.ingest.server.build`
assembles it for tests.
"""
