"""KotaDB's test suites.

gRPC's fork switch is set before any test module imports grpc (services/common/forksafety.py):
the suites use gRPC in-process and, as root, start PostgreSQL's tools through fork(), whose
at-fork handlers could otherwise break the child (seen as `pg_ctl stop` failing).
"""

import services.common.forksafety  # noqa: F401
