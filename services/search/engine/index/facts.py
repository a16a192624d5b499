"""facts works out a document's ranking facts, the `facts` bits of its record (format.py).

The builder stores them in every segment of format version 2 or later; the reader works them
out per candidate for version 1 segments, which stored none. The rules are languages.py's (test, vendored and
generated paths, generated-code markers).
"""

from __future__ import annotations

from services.search.engine.index.format import (
    FACT_GENERATED_CONTENT,
    FACT_GENERATED_PATH,
    FACT_PRESENT,
    FACT_TEST,
    FACT_VENDORED,
)
from services.search.engine.languages import is_generated, is_test, is_vendored


def path_facts(path: str) -> int:
    """path_facts is the path half of a document record's `facts` bits (format.py), FACT_PRESENT included."""
    facts = FACT_PRESENT
    if is_test(path):
        facts |= FACT_TEST
    if is_vendored(path):
        facts |= FACT_VENDORED
    if is_generated(path):
        facts |= FACT_GENERATED_PATH
    return facts


def content_facts(content: bytes | memoryview) -> int:
    """content_facts is the content half of a document record's `facts` bits: a generated-code marker."""
    return FACT_GENERATED_CONTENT if is_generated("", bytes(content[:2048])) else 0
