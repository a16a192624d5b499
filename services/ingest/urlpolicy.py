"""URL policy for repository clone URLs: which schemes, which hosts, never embedded credentials.

A repository URL is something a stranger gives us and our workers then connect to, so it is an
SSRF vector: `https://169.254.169.254/...` would have a worker fetch cloud metadata, and
`https://10.0.0.5/` would probe the private network. `check_url` accepts:

* `https://host[:port]/path` and `ssh://[user@]host[:port]/path`, and scp-style
  `[user@]host:path` (git's shorthand for ssh);
* `file:///abs/path` and absolute local paths only with `allow_local` (tests and `kotadb dev`).

It refuses URLs carrying a password or (for https) any user info — tokens go in the repository's
encrypted access token, never in a URL that ends up in logs and process lists — and hosts whose
every resolved address is not globally routable: loopback, private, link-local (169.254/16, the
metadata address among them), shared (100.64/10), multicast, reserved and unspecified addresses,
IPv4-mapped IPv6 included. One bad address among several refuses the host: git picks any.
`allow_local` lifts the host check too.

A URL that passed here may later resolve elsewhere (DNS rebinding): the worker calls `check_url`
again just before fetching and can pin git to `CheckedURL.addresses`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

from services.common.errors import FieldViolation, InvalidArgument

MAX_URL_LENGTH = 2048
# Seconds the resolver may take before the host counts as unresolvable.
RESOLVE_TIMEOUT = 5.0

# Cloud metadata endpoints, refused by name in the message so an operator sees why.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)

_SCP = re.compile(
    r"^(?:(?P<user>[^@/:\s]+)@)?(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(?P<path>[^/].*|/.*)$"
)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")
_SCHEMES = "only https://, ssh:// and scp-style (user@host:path) URLs are accepted"
_CONTROL = re.compile(r"[\x00-\x20\x7f]")

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


@dataclasses.dataclass(frozen=True)
class CheckedURL:
    """CheckedURL is a URL that passed the policy: its kind, host, port and resolved addresses.

    `kind` is `https`, `ssh`, `scp` or `local`; `host` is empty and `addresses` empty for local
    URLs; `port` is the URL's port or the scheme's default.
    """

    url: str
    kind: str
    host: str
    port: int
    addresses: tuple[str, ...]
    path: str


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """system_resolver resolves `host` with the operating system's resolver (getaddrinfo)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _refuse(message: str, reason: str, field: str) -> InvalidArgument:
    return InvalidArgument(
        message,
        reason=reason,
        field_violations=[FieldViolation(field, message, reason)],
    )


async def check_url(
    url: str,
    *,
    allow_local: bool = False,
    resolver: Resolver = system_resolver,
    field: str = "repository.url",
) -> CheckedURL:
    """check_url returns the checked URL or raises InvalidArgument with a field violation on `field`.

    Reasons: URL_INVALID (malformed, too long, control characters, leading dash), URL_SCHEME
    (not https/ssh/scp, or local without `allow_local`), URL_CREDENTIALS (user info or password),
    URL_HOST_FORBIDDEN (resolves to a non-global address), URL_HOST_UNRESOLVABLE. Messages name
    the host but never echo user info.
    """
    if not url or len(url) > MAX_URL_LENGTH:
        raise _refuse(f"the URL must be 1 to {MAX_URL_LENGTH} characters", "URL_INVALID", field)
    if _CONTROL.search(url):
        raise _refuse("the URL contains spaces or control characters", "URL_INVALID", field)
    # git would take a leading dash as an option (CVE-2017-1000117 and its kin).
    if url.startswith("-"):
        raise _refuse("the URL must not start with '-'", "URL_INVALID", field)
    if url.startswith("/") or url.lower().startswith("file:"):
        return _local(url, allow_local, field)
    if "://" not in url:
        return await _scp(url, allow_local=allow_local, resolver=resolver, field=field)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _refuse("the URL is malformed", "URL_INVALID", field) from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "ssh"):
        raise _refuse(_SCHEMES, "URL_SCHEME", field)
    if parts.password is not None or (scheme == "https" and parts.username is not None):
        raise _refuse(
            "the URL must not carry credentials; give a private repository's token as access_token",
            "URL_CREDENTIALS",
            field,
        )
    if parts.query or parts.fragment:
        raise _refuse("the URL must not have a query or fragment", "URL_INVALID", field)
    host = parts.hostname or ""
    if parts.username is not None and (not parts.username or parts.username.startswith("-")):
        raise _refuse("the URL's ssh user name is not valid", "URL_INVALID", field)
    path = parts.path
    if not path.strip("/"):
        raise _refuse("the URL names no repository path", "URL_INVALID", field)
    effective_port = port if port is not None else (443 if scheme == "https" else 22)
    addresses = await _check_host(
        host, effective_port, allow_local=allow_local, resolver=resolver, field=field
    )
    return CheckedURL(url=url, kind=scheme, host=host, port=effective_port, addresses=addresses, path=path)


def _local(url: str, allow_local: bool, field: str) -> CheckedURL:
    if not allow_local:
        raise _refuse("local paths and file:// URLs are not accepted by this server", "URL_SCHEME", field)
    if url.startswith("/"):
        path = url
    else:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise _refuse("a file URL is file:///absolute/path", "URL_INVALID", field)
        path = parts.path
    if not path.startswith("/") or "\\" in path:
        raise _refuse("a local repository path must be absolute", "URL_INVALID", field)
    return CheckedURL(url=url, kind="local", host="", port=0, addresses=(), path=path)


async def _scp(url: str, *, allow_local: bool, resolver: Resolver, field: str) -> CheckedURL:
    match = _SCP.match(url)
    if match is None:
        raise _refuse(_SCHEMES, "URL_SCHEME", field)
    user = match.group("user")
    if user is not None and user.startswith("-"):
        raise _refuse("the URL's ssh user name is not valid", "URL_INVALID", field)
    host = match.group("host").strip("[]")
    path = match.group("path")
    if not path.strip("/"):
        raise _refuse("the URL names no repository path", "URL_INVALID", field)
    addresses = await _check_host(host, 22, allow_local=allow_local, resolver=resolver, field=field)
    return CheckedURL(url=url, kind="scp", host=host, port=22, addresses=addresses, path=path)


async def _check_host(
    host: str, port: int, *, allow_local: bool, resolver: Resolver, field: str
) -> tuple[str, ...]:
    if not host:
        raise _refuse("the URL has no host", "URL_INVALID", field)
    literal = _literal_address(host)
    if literal is None and not _HOSTNAME.match(host):
        raise _refuse("the URL's host is not a valid host name", "URL_INVALID", field)
    if literal is not None:
        found: Sequence[str] = [str(literal)]
    else:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                found = await resolver(host, port)
        except (OSError, TimeoutError, UnicodeError):
            found = []
        if not found:
            raise _refuse(f"the host {host} does not resolve", "URL_HOST_UNRESOLVABLE", field)
    addresses = tuple(dict.fromkeys(found))
    if allow_local:
        return addresses
    for text in addresses:
        reason = forbidden_address(text)
        if reason is not None:
            raise _refuse(
                f"the host {host} resolves to a {reason} address, which repositories may not use",
                "URL_HOST_FORBIDDEN",
                field,
            )
    return addresses


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def forbidden_address(text: str) -> str | None:
    """forbidden_address names what kind of non-global address `text` is, or None if it is global."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return "malformed"
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            address = mapped
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_private:
        return "private"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified or address.is_reserved or not address.is_global:
        return "reserved"
    return None
