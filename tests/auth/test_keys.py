"""API key format: generation, checksum, and refusal of truncated, mistyped or foreign keys."""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Callable

import pytest

from services.auth import keys
from services.auth.keys import BadChecksum, MalformedKey, generate_key, hash_key, parse_key
from services.common.errors import Unauthenticated

KEY_SHAPE = re.compile(r"^kdb_(live|test)_[0-9A-Za-z]{38}$")


@pytest.mark.parametrize("env", ["live", "test"])
def test_generated_keys_have_the_documented_shape(env: str) -> None:
    generated = generate_key(env)
    assert KEY_SHAPE.match(generated.plaintext)
    assert generated.plaintext.startswith(f"kdb_{env}_")
    assert generated.display_prefix == generated.plaintext[:15]
    assert generated.key_hash == hashlib.sha256(generated.plaintext.encode()).hexdigest()
    parsed = parse_key(generated.plaintext)
    assert parsed.environment == env
    assert parsed.key_hash == generated.key_hash
    assert parsed.display_prefix == generated.display_prefix


def test_keys_are_unique_and_secret_stays_out_of_repr() -> None:
    generated = [generate_key() for _ in range(200)]
    assert len({key.plaintext for key in generated}) == 200
    assert generated[0].plaintext not in repr(generated[0])
    assert generated[0].plaintext not in repr(parse_key(generated[0].plaintext))


def test_checksum_is_crc32_of_prefix_and_body_in_base62() -> None:
    generated = generate_key()
    text = generated.plaintext
    value = zlib.crc32(text[:-6].encode())
    digits = ""
    while value:
        value, digit = divmod(value, 62)
        digits = keys.BASE62[digit] + digits
    assert text[-6:] == digits.rjust(6, "0")


def test_every_single_character_typo_is_caught() -> None:
    text = generate_key().plaintext
    for position in range(keys.PREFIX_LENGTH, len(text)):
        for replacement in "0aZ":
            if text[position] == replacement:
                continue
            typo = text[:position] + replacement + text[position + 1 :]
            with pytest.raises(BadChecksum) as caught:
                parse_key(typo)
            assert caught.value.reason == "BAD_API_KEY_CHECKSUM"


def test_swapped_neighbours_are_caught() -> None:
    text = generate_key().plaintext
    body = text[keys.PREFIX_LENGTH : -6]
    position = next(i for i in range(len(body) - 1) if body[i] != body[i + 1])
    swapped = body[:position] + body[position + 1] + body[position] + body[position + 2 :]
    with pytest.raises(BadChecksum):
        parse_key(text[: keys.PREFIX_LENGTH] + swapped + text[-6:])


@pytest.mark.parametrize(
    "mangle",
    [
        lambda key: key[:-1],
        lambda key: key[:20],
        lambda key: key + "A",
        lambda key: "kdb_prod_" + key[9:],
        lambda key: "sk_live_" + key[9:],
        lambda key: key.replace("kdb_", "KDB_", 1),
        lambda key: key[:30] + "-" + key[31:],
        lambda key: key[:30] + "é" + key[31:],
        lambda key: " " + key[:-1],
        lambda key: "",
    ],
    ids=[
        "truncated-by-one",
        "truncated",
        "too-long",
        "wrong-env",
        "foreign-prefix",
        "upper-prefix",
        "punctuation",
        "non-ascii",
        "leading-space",
        "empty",
    ],
)
def test_malformed_keys_are_refused_without_echoing_them(mangle: Callable[[str], str]) -> None:
    text = generate_key().plaintext
    bad = mangle(text)
    with pytest.raises(MalformedKey) as caught:
        parse_key(bad)
    assert isinstance(caught.value, Unauthenticated)
    assert caught.value.reason == "MALFORMED_API_KEY"
    if bad:
        assert bad not in caught.value.message


def test_hash_is_deterministic_and_distinct() -> None:
    first, second = generate_key(), generate_key()
    assert hash_key(first.plaintext) == hash_key(first.plaintext) == first.key_hash
    assert first.key_hash != second.key_hash


def test_unknown_environment_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        generate_key("prod")


def test_base62_encode_pads_and_refuses_overflow() -> None:
    assert keys.base62_encode(0, 6) == "000000"
    assert keys.base62_encode(61, 2) == "0z"
    assert keys.base62_encode(2**32 - 1, 6) == "4gfFC3"
    with pytest.raises(ValueError):
        keys.base62_encode(62**2, 2)
