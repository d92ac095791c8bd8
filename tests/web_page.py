"""The web page tests' shared parts: a watched Chromium page, screenshots, and reading the grid.

The browser itself is conftest's `browser` fixture; each test module has its own home and server.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from playwright.sync_api import Browser, Page

from conftest import REPO

SCREENSHOTS_COPY = REPO / "test-output" / "web"
TIMEOUT_MS = 60_000  # Playwright's waits: the page, the server and Chromium share a loaded machine
FACET_VISIBLE = 12  # labels a head shows before "Show all"


def snap(page: Page, shots: Path, name: str, *, full_page: bool = True) -> None:
    """A screenshot in the test's folder, copied to test-output/web/ for people to look at."""
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    SCREENSHOTS_COPY.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, SCREENSHOTS_COPY / path.name)


class Watched:
    """A page plus what it did: uncaught errors, console errors, requests leaving the server."""

    def __init__(self, page: Page, base: str):
        self.page = page
        self.errors: list[str] = []
        self.console_errors: list[str] = []
        self.foreign: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        # With the resource's address: "Failed to load resource" alone does not say which.
        page.on(
            "console",
            lambda msg: msg.type == "error" and self.console_errors.append(f"{msg.text} ({msg.location.get('url')})"),
        )

        def on_request(request) -> None:
            url = request.url
            if not (url.startswith(base + "/") or url.startswith(("blob:", "data:"))):
                self.foreign.append(url)

        page.on("request", on_request)

    def check(self) -> None:
        assert self.errors == [], self.errors
        assert self.console_errors == [], self.console_errors
        assert self.foreign == [], f"the page reached outside its server: {self.foreign}"


def open_page(browser: Browser, base: str, **context) -> tuple[Page, Watched]:
    """A fresh browser context's page on the server at `base` (1280 x 900 unless `context` says
    otherwise), watched."""
    ctx = browser.new_context(**({"viewport": {"width": 1280, "height": 900}} | context))
    ctx.set_default_timeout(TIMEOUT_MS)
    page = ctx.new_page()
    return page, Watched(page, base)


def watched_page(browser: Browser, base: str, **context) -> Iterator[Watched]:
    """For a `watched` fixture: the page, then its context closed and what it did checked."""
    page, watch = open_page(browser, base, **context)
    yield watch
    page.context.close()
    watch.check()


def grid_ids(page: Page) -> list[int]:
    return page.eval_on_selector_all("#results > li.card", "items => items.map(li => Number(li.dataset.id))")


def wait_for_grid(page: Page, expected: list[int]) -> None:
    """Until the grid shows exactly `expected`, in order, and the search is done."""
    try:
        page.wait_for_function(
            """ids => document.body.dataset.search === "done" &&
                JSON.stringify([...document.querySelectorAll("#results > li.card")].map(li => Number(li.dataset.id)))
                === JSON.stringify(ids)""",
            arg=expected,
            timeout=TIMEOUT_MS,
        )
    except Exception:
        pass  # the assertion below says what the grid shows instead
    assert grid_ids(page) == expected


def wait_for_images(page: Page, selector: str) -> None:
    page.wait_for_function(
        "sel => { const imgs = [...document.querySelectorAll(sel)];"
        " return imgs.length > 0 && imgs.every(img => img.complete && img.naturalWidth > 0); }",
        arg=selector,
    )


def ids_of(payload: dict) -> list[int]:
    return [r["id"] for r in payload["results"]]


def url_query(page: Page) -> dict[str, list[str]]:
    return parse_qs(urlsplit(page.url).query)


def facet_button(page: Page, verb: str, head: str, label: str):
    """A facet's button, opening its head's group (and finding the label) when it is folded away."""
    group = page.locator(f'details.facet[data-head="{head}"]')
    if group.get_attribute("open") is None:
        group.locator("summary").click()
    find = group.locator(".facet-find")
    if find.count():  # a long list: the first labels only, then just those matching what is typed
        rows = group.locator(".facet-row")
        assert group.locator(".facet-row:visible").count() == min(rows.count(), FACET_VISIBLE) < rows.count()
        find.fill(label)
        visible = group.locator(".facet-row:visible .facet-label").all_inner_texts()
        assert label in visible and all(label in text for text in visible), visible
    return page.get_by_role("button", name=f"{verb} {label} ({head})", exact=True)
