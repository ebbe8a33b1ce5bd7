"""Helpers for the browser tests: Debian's Chromium driven by Playwright, and a page that records
every request it makes and every console error it logs.

The tests skip, saying what to install, when Playwright for Python (the dev extra) or a
Chromium binary is missing; Playwright's own browser download is not used.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest

# GPTSERVE_CHROMIUM names another Chromium (or Chrome) binary.
CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str | None:
    """The Chromium to drive: GPTSERVE_CHROMIUM, else Debian's `chromium` on the PATH."""
    given = os.environ.get("GPTSERVE_CHROMIUM")
    if given:
        return given if os.access(given, os.X_OK) else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium until the block ends, or a skip that names what to install."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed: pip install -e '.[dev]'")
    executable = chromium_path()
    if executable is None:
        pytest.skip(
            "no Chromium found: install Debian's package (apt-get install -y chromium) "
            "or set GPTSERVE_CHROMIUM to a Chromium binary"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class PageRecord:
    """What a page did: the URLs it requested and the errors it reported."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def foreign_requests(self, origin: str) -> list[str]:
        """Requests to anywhere but `origin` (scheme://host:port)."""
        return [url for url in self.requests if not _same_origin(url, origin)]


def _same_origin(url: str, origin: str) -> bool:
    parts, expected = urlsplit(url), urlsplit(origin)
    return (parts.scheme, parts.netloc) == (expected.scheme, expected.netloc)


def watch(page: Any) -> PageRecord:
    """Record the page's requests, console errors and uncaught exceptions from now on."""
    record = PageRecord()
    page.on("request", lambda request: record.requests.append(request.url))
    page.on(
        "console",
        lambda message: (
            record.errors.append(f"console: {message.text}") if message.type == "error" else None
        ),
    )
    page.on("pageerror", lambda error: record.errors.append(f"page error: {error}"))
    return record


@contextmanager
def open_page(
    browser: Any, url: str, width: int = 1280, height: int = 900, color_scheme: str = "light"
) -> Iterator[tuple[Any, PageRecord]]:
    """The playground at `url` in a fresh context (its own session storage), watched from its
    first request; closed when the block ends."""
    context = browser.new_context(
        viewport={"width": width, "height": height}, color_scheme=color_scheme
    )
    try:
        page = context.new_page()
        page.set_default_timeout(15_000)
        record = watch(page)
        page.goto(url)
        yield page, record
    finally:
        context.close()
