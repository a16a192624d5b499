"""The auth service: API keys, permissions, rate limits, quotas and Envoy's ext_authz `Check`.

Start it with `kotadb serve auth` or `python -m services.auth`; `services.auth.server.build`
assembles it for tests.
"""
