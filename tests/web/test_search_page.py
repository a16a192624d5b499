"""The search page in a real browser: Debian's chromium driven by Playwright, against a real stack.

The three services and Envoy run as in production; Envoy serves the page itself at `/`
(deploy/web, direct_response). Demo documents are written through the REST API: thirty
modules that share a term (so results page), a parser with symbols, and a hostile document
whose content and path carry `<script>`, `<img onerror>` and attribute-breaking quotes. The
browser types queries, pages, opens a file at a line anchor, searches symbols, shows a bad
query's error inline, and must render the hostile document as text. Screenshots of the main
states go to the test's directory, and also to `KOTADB_SCREENSHOT_DIR` when set (how
docs/search-*.png were made).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.sync_api import Dialog, Page, expect, sync_playwright

from services.auth.keys import hash_key
from services.common.supervisor import Supervisor
from tests.gatewayhttp import http_json
from tests.harness import (
    Envoy,
    seed_key,
    service_env,
    spawn_services,
    start_gateway,
)

IDENTITY_KEY = "web-tests-identity-key-0123456789abcdef"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
XSS_PATH = 'xss/"><img src=x onerror=alert(1)>.py'
XSS_TEXT = '<script>alert("xss")</script>\nx = "\'><img src=x onerror=alert(2)> xssneedle"\n'
PARSER = (
    'import re\n\n\nclass Parser:\n    """Parser reads tokens."""\n\n    def parse(self, text):\n'
    "        needle = text.strip()\n        return needle\n\n\ndef helper():\n    return Parser()\n"
)


@dataclass(frozen=True)
class Site:
    """Site is the gateway serving the page, an API key, and the ids of the demo documents."""

    envoy: Envoy
    key: str
    ids: dict[str, str]


def _post(url: str, key: str, body: Any) -> dict[str, Any]:
    code, answer = http_json("POST", url, key, body)
    assert code == 200 and isinstance(answer, dict), answer
    return answer


async def _github_repository(database_url: str, key: str) -> str:
    """_github_repository records a synced GitHub repository for the key's owner; returns its id."""
    connection = await asyncpg.connect(database_url)
    try:
        user = await connection.fetchval(
            "select user_id from public.api_keys where key_hash = $1", hash_key(key)
        )
        repository_id = await connection.fetchval(
            "insert into public.repositories (user_id, full_name, url, last_synced_commit)"
            " values ($1, 'acme/widgets', 'https://github.com/acme/widgets.git', $2) returning id",
            user,
            COMMIT,
        )
    finally:
        await connection.close()
    return str(repository_id)


@pytest.fixture(scope="module")
def site(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("web")
    env = service_env(database_url, workdir, IDENTITY_KEY, KOTADB_INGEST_SYMBOL_WORKERS="1")
    with Supervisor(grace=20) as supervisor:
        addresses = spawn_services(supervisor, workdir, env)
        envoy = start_gateway(supervisor, workdir, addresses, IDENTITY_KEY)
        key = seed_key(database_url, email_prefix="web", permissions=("read", "write"), rate_limit=6000)
        repository_id = asyncio.run(_github_repository(database_url, key))
        documents = [
            {"path": "src/parser.py", "text": PARSER, "repositoryId": repository_id},
            {"path": XSS_PATH, "text": XSS_TEXT},
        ]
        documents += [
            {"path": f"pkg/mod_{i:02}.py", "text": f"def handler_{i}(needle):\n    return needle * {i}\n"}
            for i in range(30)
        ]
        written = _post(f"{envoy.url}/v1/documents:batchUpsert", key, {"documents": documents})
        assert all(not r["fieldViolations"] for r in written["results"]), written
        ids = {r["path"]: r["id"] for r in written["results"]}
        # Wait until the index covers the writes (min_revision), so the browser sees them at once.
        _post(f"{envoy.url}/v1/code:search", key, {"query": "needle", "minRevision": written["revision"]})
        yield Site(envoy, key, ids)


@pytest.fixture(scope="module")
def browser_page(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 720})
        dialogs: list[str] = []

        def refuse(dialog: Dialog) -> None:
            dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", refuse)
        page.goto(site.envoy.url + "/")
        page.fill("#key", site.key)
        page.click("#key-save")
        yield page
        assert dialogs == [], f"a script from the data ran: {dialogs}"
        browser.close()


def _shot(page: Page, name: str, tmp_path: Path) -> None:
    page.screenshot(path=str(tmp_path / name))
    target = os.environ.get("KOTADB_SCREENSHOT_DIR")
    if target:
        page.screenshot(path=str(Path(target) / name))


def test_page_is_served_by_the_gateway_with_a_strict_policy(site: Site) -> None:
    with urllib.request.urlopen(site.envoy.url + "/", timeout=30) as response:
        body = response.read().decode()
        headers = response.headers
    assert "<title>KotaDB code search</title>" in body
    assert headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    with urllib.request.urlopen(site.envoy.url + "/app.js", timeout=30) as response:
        assert response.headers["content-type"].startswith("text/javascript")


def test_typing_shows_highlighted_results_and_pages(browser_page: Page, tmp_path: Path) -> None:
    page = browser_page
    page.click("#q")
    page.keyboard.type("needle", delay=40)  # search-as-you-type: no Enter
    expect(page.locator("#results .file")).to_have_count(25)
    # The first page stops counting once it has its files: the page says the totals are lower bounds.
    expect(page.locator("#status")).to_contain_text("showing 25 files")
    expect(page.locator("#status .limit")).to_contain_text("lower bounds")
    numbers = page.locator("#results .file").first.locator(".ln .no").all_text_contents()
    assert numbers == ["1", "2"]  # context stops before the next matching line: no line twice
    first_marks = page.locator("#results mark")
    assert set(first_marks.all_text_contents()) == {"needle"}
    expect(page.locator("#more")).to_be_visible()
    _shot(page, "search-results.png", tmp_path)
    page.click("#more")
    expect(page.locator("#results .file")).to_have_count(32)  # 30 modules, the parser, the hostile file
    expect(page.locator("#more")).to_be_hidden()
    page.locator("#q").blur()
    page.keyboard.press("n")
    page.keyboard.press("n")
    expect(page.locator("#results mark.current")).to_have_count(1)
    assert page.locator("#results mark").nth(1).get_attribute("class") == "current"
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"


def test_file_view_at_a_line_anchor(browser_page: Page, site: Site, tmp_path: Path) -> None:
    page = browser_page
    document_id = site.ids["src/parser.py"]
    page.goto(f"{site.envoy.url}/?doc={document_id}#L7-L9")
    expect(page.locator("#file .ln.sel")).to_have_count(3)
    expect(page.locator("#file .ln")).to_have_count(PARSER.count("\n"))
    expect(page.locator("#L7.sel")).to_contain_text("def parse(self, text):")
    permalink = page.locator("#permalink").get_attribute("href") or ""
    assert permalink.startswith(f"/?doc={document_id}&rev=") and permalink.endswith("#L7-L9")
    host = page.locator("#file a.host")
    expect(host).to_have_attribute(
        "href", f"https://github.com/acme/widgets/blob/{COMMIT}/src/parser.py#L7-L9"
    )
    expect(page.locator("#file .file-head .meta")).to_contain_text("acme/widgets")
    page.click("#L12 .no")
    expect(page.locator("#file .ln.sel")).to_have_count(1)
    assert page.evaluate("location.hash") == "#L12"
    expect(host).to_have_attribute("href", f"https://github.com/acme/widgets/blob/{COMMIT}/src/parser.py#L12")
    _shot(page, "search-file.png", tmp_path)


def test_symbol_search_and_bad_query_error(browser_page: Page, site: Site) -> None:
    page = browser_page
    page.goto(site.envoy.url + "/?q=Parser&mode=symbols")
    expect(page.locator("#results table.symbols tr").first).to_contain_text("Parser")
    expect(page.locator("#results table.symbols")).to_contain_text("src/parser.py:4")
    page.goto(site.envoy.url + "/")
    page.fill("#q", "foo (bar")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("INVALID_QUERY")


def test_hostile_document_renders_as_text(browser_page: Page, site: Site) -> None:
    page = browser_page
    page.goto(site.envoy.url + "/?q=xssneedle")
    line = page.locator("#results .ln.hit .tx").first
    expect(line).to_contain_text("<img src=x onerror=alert(2)>")
    expect(page.locator("#results .file-head .path").first).to_have_text(XSS_PATH)
    assert page.locator("#results img").count() == 0
    assert page.locator("#results script").count() == 0
    page.goto(f"{site.envoy.url}/?doc={site.ids[XSS_PATH]}#L1")
    expect(page.locator("#L1")).to_contain_text('<script>alert("xss")</script>')
    assert page.locator("#file img, #file script").count() == 0
