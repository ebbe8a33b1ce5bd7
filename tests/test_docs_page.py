"""/docs works with no network: Swagger UI comes from the package, in a real browser."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from api_fixtures import LiveServer, live_server
from browser_fixtures import chromium, open_page

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server() as running:
        yield running


def test_docs_page_uses_the_packaged_swagger_ui(server: LiveServer) -> None:
    page = httpx.get(f"{server.url}/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    script = httpx.get(f"{server.url}/docs-assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith(
        "text/javascript"
    )
    assert httpx.get(f"{server.url}/docs-assets/../app.py").status_code == 404


def test_docs_page_renders_offline_in_a_browser(server: LiveServer) -> None:
    with chromium() as browser, open_page(browser, f"{server.url}/docs") as (page, record):
        page.get_by_text("/v1/completions", exact=True).first.wait_for(timeout=30_000)
        assert record.foreign_requests(server.url) == []
