"""KotaDB as MCP tools for coding agents: stdio (`kotadb mcp`) and Streamable HTTP behind the gateway.

* `backend.py` — the calls a tool makes, as the caller: through the gateway with the caller's
  API key (stdio), or straight to the services with the identity the gateway's Check signed for
  the `/mcp` request (HTTP); gRPC failures become MCP tool errors with their reason.
* `render.py` — proto answers → compact, bounded text for a model's context.
* `tools.py` — the tools: names, JSON schemas, descriptions (the query language with examples).
* `server.py` — the two transports.
"""
