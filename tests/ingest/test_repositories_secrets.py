"""SecretBox and the URL policy: the two pure pieces under CreateRepository.

SecretBox must round-trip under any configured key, bind each blob to its context, refuse
tampered or foreign blobs without echoing them, and keep old keys readable after rotation. The
URL policy must refuse loopback, private, link-local and metadata hosts (literal or resolved),
embedded credentials and local URLs unless allowed.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument
from services.ingest.config import IngestSettings
from services.ingest.secretbox import SecretBox, SecretBoxError, generate_key_spec
from services.ingest.urlpolicy import Resolver, check_url, forbidden_address
from services.ingest.webhooks import LogBudget


def test_round_trip_and_context_binding() -> None:
    box = SecretBox.parse(generate_key_spec("k1"))
    blob = box.encrypt(b"s3cret-token", context=b"repo-a:token")
    assert b"s3cret-token" not in blob
    assert box.key_id(blob) == "k1"
    assert box.decrypt(blob, context=b"repo-a:token") == b"s3cret-token"
    with pytest.raises(SecretBoxError):
        box.decrypt(blob, context=b"repo-b:token")
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(SecretBoxError):
        box.decrypt(bytes(tampered), context=b"repo-a:token")
    with pytest.raises(SecretBoxError):
        box.decrypt(blob[:10], context=b"repo-a:token")
    # Two encryptions of one secret differ (random nonces).
    assert box.encrypt(b"x", context=b"c") != box.encrypt(b"x", context=b"c")


def test_rotation_keeps_old_keys_readable() -> None:
    old = generate_key_spec("old")
    new = generate_key_spec("new")
    sealed_old = SecretBox.parse(old).encrypt(b"value", context=b"ctx")
    rotated = SecretBox.parse(f"{new},{old}")
    assert rotated.primary == "new"
    assert rotated.decrypt(sealed_old, context=b"ctx") == b"value"
    assert rotated.key_id(rotated.encrypt(b"value", context=b"ctx")) == "new"
    with pytest.raises(SecretBoxError, match="'old'"):
        SecretBox.parse(new).decrypt(sealed_old, context=b"ctx")


def test_bad_key_settings_do_not_echo_key_material() -> None:
    with pytest.raises(FailedPrecondition) as missing:
        SecretBox.from_settings(IngestSettings())
    assert missing.value.reason == "SECRET_KEYS_MISSING"
    short = base64.b64encode(b"tooshort-keymaterial").decode()
    with pytest.raises(FailedPrecondition) as invalid:
        SecretBox.from_settings(IngestSettings(secret_keys=f"k1:{short}"))
    assert invalid.value.reason == "SECRET_KEYS_INVALID"
    assert short not in invalid.value.message
    assert "secret_keys" not in repr(IngestSettings(secret_keys=generate_key_spec()))


def _resolver(table: Mapping[str, Sequence[str]]) -> Resolver:
    async def resolve(host: str, port: int) -> Sequence[str]:
        return table.get(host, ())

    return resolve


REFUSED_URLS = [
    ("https://127.0.0.1/o/r.git", "URL_HOST_FORBIDDEN"),
    ("https://169.254.169.254/latest/meta-data", "URL_HOST_FORBIDDEN"),
    ("https://[::1]/o/r.git", "URL_HOST_FORBIDDEN"),
    ("https://[::ffff:127.0.0.1]/o/r.git", "URL_HOST_FORBIDDEN"),
    ("https://10.1.2.3/o/r.git", "URL_HOST_FORBIDDEN"),
    ("https://100.100.100.200/o/r", "URL_HOST_FORBIDDEN"),
    ("ssh://git@192.168.1.1/o/r.git", "URL_HOST_FORBIDDEN"),
    ("git@127.0.0.1:o/r.git", "URL_HOST_FORBIDDEN"),
    ("https://internal.example/o/r.git", "URL_HOST_FORBIDDEN"),
    ("https://rebind.example/o/r.git", "URL_HOST_FORBIDDEN"),
    ("https://nowhere.example/o/r.git", "URL_HOST_UNRESOLVABLE"),
    ("https://user:hunter2@github.com/o/r.git", "URL_CREDENTIALS"),
    ("https://ghp_token@github.com/o/r.git", "URL_CREDENTIALS"),
    ("ssh://git:pw@github.com/o/r.git", "URL_CREDENTIALS"),
    ("http://github.com/o/r.git", "URL_SCHEME"),
    ("git://github.com/o/r.git", "URL_SCHEME"),
    ("ext::sh -c touch% pwned", "URL_INVALID"),
    ("file:///srv/repo", "URL_SCHEME"),
    ("/srv/repo", "URL_SCHEME"),
    ("-uhttps://github.com/o/r", "URL_INVALID"),
    ("https://github.com/", "URL_INVALID"),
    ("https://github.com/o/r?x=1", "URL_INVALID"),
]

DNS = {
    "github.com": ["140.82.112.3"],
    "internal.example": ["10.0.0.7"],
    # One private address among public ones is enough to refuse.
    "rebind.example": ["140.82.112.3", "127.0.0.1"],
}


@pytest.mark.parametrize(("url", "reason"), REFUSED_URLS)
async def test_refused_urls(url: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await check_url(url, resolver=_resolver(DNS))
    assert refused.value.reason == reason
    assert refused.value.field_violations[0].field == "repository.url"
    for secret in ("hunter2", "ghp_token", ":pw@"):
        assert secret not in refused.value.message


async def test_accepted_urls() -> None:
    checked = await check_url("https://github.com/octo/hello.git", resolver=_resolver(DNS))
    assert (checked.kind, checked.host, checked.port) == ("https", "github.com", 443)
    assert checked.addresses == ("140.82.112.3",)
    assert (await check_url("ssh://git@github.com:2222/o/r.git", resolver=_resolver(DNS))).port == 2222
    scp = await check_url("git@github.com:octo/hello.git", resolver=_resolver(DNS))
    assert (scp.kind, scp.host, scp.path) == ("scp", "github.com", "octo/hello.git")


async def test_local_urls_only_when_allowed() -> None:
    local = await check_url("file:///srv/repo", allow_local=True)
    assert (local.kind, local.path) == ("local", "/srv/repo")
    assert (await check_url("/srv/repo", allow_local=True)).kind == "local"
    loopback = await check_url("https://127.0.0.1:8443/o/r.git", allow_local=True)
    assert loopback.addresses == ("127.0.0.1",)
    with pytest.raises(InvalidArgument):
        await check_url("file://otherhost/srv/repo", allow_local=True)


def test_forbidden_address_kinds() -> None:
    assert forbidden_address("169.254.169.254") == "cloud metadata"
    assert forbidden_address("127.0.0.5") == "loopback"
    assert forbidden_address("fe80::1") == "link-local"
    assert forbidden_address("172.16.0.1") == "private"
    assert forbidden_address("0.0.0.0") is not None
    assert forbidden_address("8.8.8.8") is None


def test_log_budget_refills_at_its_rate() -> None:
    now = [100.0]
    budget = LogBudget(per_second=2.0, clock=lambda: now[0])
    assert [budget.allow() for _ in range(3)] == [True, True, False]
    now[0] += 0.5
    assert [budget.allow() for _ in range(2)] == [True, False]
    now[0] += 60.0  # a long quiet spell refills to the rate, not beyond
    assert [budget.allow() for _ in range(3)] == [True, True, False]
