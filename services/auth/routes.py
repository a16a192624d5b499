"""Routes: which kotadb.v1 method an HTTP request calls, and so which permission it needs.

Envoy runs ext_authz before the JSON transcoder (docs/design.md §7), so `Check` sees REST
requests with their original path (`POST /v1/apiKeys/{id}:revoke`) and native gRPC requests
with the gRPC path (`POST /kotadb.v1.AuthService/RevokeApiKey`). Both resolve here to the same
`Route`: REST paths through a table built from the `google.api.http` rules in the descriptors
(the same rules the transcoder uses, so the two cannot disagree), gRPC paths directly. The
permission each method needs comes from services/common/identity.py, which the services'
identity interceptor uses too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor
from kotadb.v1 import auth_pb2, ingest_pb2, search_pb2

from services.common.identity import ADMIN, READ, method_permission

# The services the gateway exposes, and whose routes Check therefore authorizes.
GATEWAY_FILES: tuple[FileDescriptor, ...] = (
    auth_pb2.DESCRIPTOR,
    ingest_pb2.DESCRIPTOR,
    search_pb2.DESCRIPTOR,
)
GATEWAY_SERVICES: tuple[str, ...] = (
    "kotadb.v1.AuthService",
    "kotadb.v1.IngestService",
    "kotadb.v1.SearchService",
)

# A user's session JWT (rather than an API key) is accepted on these services' methods only:
# key management, usage, and (by method) index rebuilds. Everything else needs an API key.
SESSION_SERVICES: tuple[str, ...] = ("kotadb.v1.AuthService",)
SESSION_METHODS: tuple[str, ...] = ("/kotadb.v1.SearchService/RebuildIndex",)

# Gateway paths served by something other than a kotadb.v1 method: the MCP server's Streamable
# HTTP endpoint (services/mcp). Reaching it needs `read`; its write tools call the ingest service
# as the caller, which refuses them without `write`.
PLAIN_ROUTES: dict[str, tuple[tuple[str, ...], str]] = {"/mcp": (("GET", "POST", "DELETE"), READ)}

_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)(?:=([^}]*))?\}")


@dataclasses.dataclass(frozen=True)
class Route:
    """Route is one callable method: its gRPC path, the permission it needs, who may use a session.

    `permission` is `read`, `write`, `admin`, `service` (internal) or `""` (no credential).
    """

    grpc_method: str
    permission: str
    sessions_allowed: bool

    @property
    def service(self) -> str:
        """service is the full name of the gRPC service, e.g. `kotadb.v1.SearchService`."""
        return self.grpc_method.strip("/").split("/", 1)[0]


@dataclasses.dataclass(frozen=True)
class _RestRule:
    verb: str
    pattern: re.Pattern[str]
    literal_segments: int
    route: Route


class RouteTable:
    """RouteTable resolves an HTTP method and path (REST or gRPC) to the Route it calls."""

    def __init__(self, files: Iterable[FileDescriptor] = GATEWAY_FILES) -> None:
        self._grpc: dict[str, Route] = {}
        rules: list[_RestRule] = []
        for file in files:
            for service in file.services_by_name.values():
                if service.full_name not in GATEWAY_SERVICES:
                    continue
                for method in service.methods:
                    route = _route_for(method)
                    self._grpc[route.grpc_method] = route
                    for verb, template in _http_bindings(method):
                        rules.append(_rest_rule(verb, template, route))
        # Most specific first: a template with more literal text beats one with variables
        # (so `/v1/index` never loses to `/v1/{x}`-style rules if such rules are added).
        rules.sort(key=lambda rule: (-rule.literal_segments, rule.pattern.pattern))
        self._rest = rules

    @property
    def grpc_methods(self) -> list[str]:
        """grpc_methods lists every gRPC path the table knows, sorted."""
        return sorted(self._grpc)

    def resolve(self, http_method: str, path: str) -> Route | None:
        """resolve returns the Route `http_method path` calls, or None for an unknown route.

        `path` may carry a query string, which is ignored.
        """
        bare = path.split("?", 1)[0].split("#", 1)[0]
        found = self._grpc.get(bare)
        if found is not None:
            # Native gRPC is always POST; anything else on a gRPC path is not a call.
            return found if http_method.upper() == "POST" else None
        verb = http_method.upper()
        plain = PLAIN_ROUTES.get(bare)
        if plain is not None:
            verbs, permission = plain
            return (
                Route(grpc_method=bare, permission=permission, sessions_allowed=False)
                if verb in verbs
                else None
            )
        for rule in self._rest:
            if rule.verb == verb and rule.pattern.fullmatch(bare):
                return rule.route
        return None


def _route_for(method: MethodDescriptor) -> Route:
    grpc_method = f"/{method.containing_service.full_name}/{method.name}"
    permission = method_permission(grpc_method)
    sessions = method.containing_service.full_name in SESSION_SERVICES or grpc_method in SESSION_METHODS
    return Route(
        grpc_method=grpc_method,
        permission=ADMIN if permission is None else permission,
        sessions_allowed=sessions,
    )


def _http_bindings(method: MethodDescriptor) -> Iterator[tuple[str, str]]:
    """_http_bindings yields (HTTP verb, path template) for a method's google.api.http rules."""
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return
    rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]
    for candidate in (rule, *rule.additional_bindings):
        kind = candidate.WhichOneof("pattern")
        if kind is None:
            continue
        if kind == "custom":
            yield candidate.custom.kind.upper(), candidate.custom.path
        else:
            yield kind.upper(), str(getattr(candidate, kind))


def _rest_rule(verb: str, template: str, route: Route) -> _RestRule:
    """_rest_rule compiles a google.api.http path template into an anchored regular expression.

    `{field}` matches one path segment, `{field=a/*/b/**}` its own pattern (`*` one segment,
    `**` any number), and a trailing `:verb` is literal. A variable never spans a `:`, so
    `{id}:revoke` and `{id}:rotate` cannot match each other's paths.
    """
    path, verb_suffix = template, ""
    last = template.rsplit("/", 1)[-1]
    if ":" in last and "}" not in last.rsplit(":", 1)[1]:
        path, verb_suffix = template.rsplit(":", 1)
        verb_suffix = ":" + verb_suffix
    parts: list[str] = []
    position = 0
    literal = 0
    for match in _VARIABLE.finditer(path):
        parts.append(re.escape(path[position : match.start()]))
        literal += path[position : match.start()].count("/")
        parts.append(_segment_pattern(match.group(2)))
        position = match.end()
    parts.append(re.escape(path[position:]))
    literal += path[position:].count("/")
    parts.append(re.escape(verb_suffix))
    return _RestRule(verb=verb, pattern=re.compile("".join(parts)), literal_segments=literal, route=route)


def _segment_pattern(pattern: str | None) -> str:
    if not pattern or pattern == "*":
        return "[^/:]+"
    pieces = []
    for segment in pattern.split("/"):
        if segment == "**":
            pieces.append("[^:]+")
        elif segment == "*":
            pieces.append("[^/:]+")
        else:
            pieces.append(re.escape(segment))
    return "/".join(pieces)
