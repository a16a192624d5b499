"""KotaDB services: auth, ingest, search, the shared runtime and the command line."""
