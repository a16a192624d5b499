"""The search service: wraps the engine (services/search/engine/) and keeps it in sync with Postgres.

Start it with `kotadb serve search` or `python -m services.search`; `services.search.server.build`
assembles it for tests.
"""
