"""The web page end to end: Debian's Chromium, driven by Playwright, against a real `lookalike serve`.

One home folder per module: 20 of the shipped CC0 photos (2 per class, in `tops/` and `other/`
folders) plus one corrupt file, indexed with the real pipeline and ONNX model, and a binary head
`garment` (tops vs other) trained on them, so the facets, the heads view and the status view all
have real content. Every assertion about results compares the grid with the API's own answer
for the same query, fetched separately over HTTP. A second server on the same home, started with
LOOKALIKE_API_KEYS and LOOKALIKE_ADMIN_KEYS, is where the page has to ask for a key.

Screenshots of the main states go to the test's temporary folder and to test-output/web/.
"""

from __future__ import annotations

import base64
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from playwright.sync_api import Page
from sqlalchemy import select
from web_page import (
    TIMEOUT_MS,
    Watched,
    facet_button,
    grid_ids,
    ids_of,
    open_page,
    snap,
    url_query,
    wait_for_grid,
    wait_for_images,
    watched_page,
)

import databases
from conftest import SAMPLES
from indexer.export import export_embeddings
from indexer.heads import labels as label_io
from indexer.heads.training import TrainOptions
from indexer.heads.workflow import train
from indexer.importer import import_embeddings
from indexer.library import Library
from indexer.models import ImageRow
from indexer.pipeline import index_folders
from indexer.settings import Settings
from live_server import running_server

TOPS = {"dress", "longsleeve", "outwear", "shirt", "t-shirt"}
K = 24  # the page's default number of results
API_KEY = "web-test-key"
OTHER_KEY = "another-web-key"
ADMIN_KEY = "web-admin-key"


@dataclass
class Home:
    settings: Settings
    photos: Path
    ids: dict[str, int]  # absolute path -> image id
    corrupt: Path

    def id_of(self, path: Path) -> int:
        return self.ids[str(path)]


@pytest.fixture(scope="module")
def home(tmp_path_factory, model_cache) -> Iterator[Home]:
    with pytest.MonkeyPatch.context() as mp:
        databases.clear_settings(mp)
        root = tmp_path_factory.mktemp("web")
        photos = root / "photos"
        for path in sorted(SAMPLES.rglob("*.jpg"))[::4]:
            group = "tops" if path.parent.name in TOPS else "other"
            dest = photos / group / path.parent.name / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        corrupt = photos / "corrupt.jpg"  # beside the class folders: indexed (and failed), not a label
        corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")

        settings = Settings(home=root / "home", model_cache=model_cache)
        library = Library(settings)
        try:
            report = index_folders(library, [str(photos)])
            assert report.added == 20 and [p for p, _ in report.failed] == [str(corrupt)]
            labels = label_io.finalise(label_io.read_folders(photos, "binary"), positive="tops")
            train(library, "garment", labels, TrainOptions(seed=0))
            with library.sessions() as session:
                ids = {row.path: row.id for row in session.scalars(select(ImageRow)) if row.status == "indexed"}
        finally:
            library.close()
        yield Home(settings, photos, ids, corrupt)


def serve(home: Home, log: Path, **env: str):
    """`lookalike serve` on the module's home in its own process, configured through the environment."""
    settings = home.settings
    return running_server(settings.home, model_cache=settings.model_cache, env=env, log=log)


@pytest.fixture(scope="module")
def server(home, tmp_path_factory) -> Iterator[str]:
    with serve(home, tmp_path_factory.mktemp("web-server") / "serve.log") as base:
        yield base


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture
def watched(browser, server) -> Iterator[Watched]:
    yield from watched_page(browser, server)


# -- helpers -----------------------------------------------------------------------------------------


def upload_answer(http: httpx.Client, path: Path, **filters) -> dict:
    response = http.post("/search", params={"k": K, **filters}, files={"file": (path.name, path.read_bytes())})
    assert response.status_code == 200, response.text
    return response.json()


def similar_answer(http: httpx.Client, image_id: int, **filters) -> dict:
    response = http.get(f"/images/{image_id}/similar", params={"k": K, **filters})
    assert response.status_code == 200, response.text
    return response.json()


def query_photo(home: Home) -> Path:
    return sorted(home.photos.rglob("*.jpg"))[5]


# -- tests ---------------------------------------------------------------------------------------------


def test_upload_then_include_and_exclude_filters(watched, server, http, home, shots):
    page = watched.page
    page.goto(server + "/")
    page.wait_for_selector(".facet-btn")
    assert page.title() == "lookalike"

    photo = query_photo(home)
    page.set_input_files("#file-input", str(photo))
    unfiltered = upload_answer(http, photo)
    wait_for_grid(page, ids_of(unfiltered))
    first = page.locator("#results > li.card").first
    assert int(first.get_attribute("data-id")) == home.id_of(photo)
    assert float(first.get_attribute("data-score")) == pytest.approx(1.0, abs=1e-4)
    assert first.locator(".badge").inner_text() == "same image"
    # The query shows beside the results; the URL cannot hold an upload, so it stays bare.
    assert page.locator("#query").is_visible() and photo.name in page.locator("#query-caption").inner_text()
    assert "similar" not in url_query(page)
    # Each card: thumbnail with alt text, score, tags.
    wait_for_images(page, "#results .card-open img")
    alt = first.locator("img").get_attribute("alt")
    assert alt.startswith(photo.name)
    assert first.locator(".score").inner_text() == f"{unfiltered['results'][0]['score']:.3f}"
    top_tag = max(unfiltered["results"][0]["tags"], key=lambda t: t["score"])
    assert top_tag["label"] in first.locator(".tags").inner_text()
    snap(page, shots, "01-upload")

    # Include: garment:tops. The grid becomes the API's answer for the same filter.
    facet_button(page, "Include", "garment", "tops").click()
    included = upload_answer(http, photo, tag="garment:tops")
    assert ids_of(included) != ids_of(unfiltered) and included["results"]
    assert all(any(t["head"] == "garment" and t["label"] == "tops" for t in r["tags"]) for r in included["results"])
    wait_for_grid(page, ids_of(included))
    assert url_query(page) == {"tag": ["garment:tops"]}
    assert page.get_by_role("button", name="Include tops (garment)", exact=True).get_attribute("aria-pressed") == "true"

    # Exclude the commonest ImageNet label among those results (but not one all of them carry).
    counts = Counter(t["label"] for r in included["results"] for t in r["tags"] if t["head"] == "imagenet")
    label = next(lbl for lbl, n in counts.most_common() if n < len(included["results"]))
    facet_button(page, "Exclude", "imagenet", label).click()
    both = upload_answer(http, photo, tag="garment:tops", not_tag=f"imagenet:{label}")
    assert both["results"] and len(both["results"]) == len(included["results"]) - counts[label]
    assert not any(t["head"] == "imagenet" and t["label"] == label for r in both["results"] for t in r["tags"])
    wait_for_grid(page, ids_of(both))
    assert url_query(page) == {"tag": ["garment:tops"], "not_tag": [f"imagenet:{label}"]}
    chips = page.locator("#active-filters .chip")
    assert chips.count() == 2
    wait_for_images(page, "#results .card-open img")
    snap(page, shots, "02-filtered")

    # Removing the include filter (its chip) re-runs the upload with the exclusion alone.
    page.get_by_role("button", name="Remove filter: include garment:tops").click()
    wait_for_grid(page, ids_of(upload_answer(http, photo, not_tag=f"imagenet:{label}")))
    assert url_query(page) == {"not_tag": [f"imagenet:{label}"]}

    # The minimum-score slider: keyboard steps, then the grid follows min_score.
    page.locator("#min-score").focus()
    for _ in range(4):
        page.keyboard.press("ArrowRight")  # 4 x 0.05
    page.wait_for_function("() => new URLSearchParams(location.search).get('min_score') === '0.2'")
    wait_for_grid(page, ids_of(upload_answer(http, photo, not_tag=f"imagenet:{label}", min_score=0.2)))


def test_paste_and_drop_an_image(watched, server, http, home):
    page = watched.page
    page.goto(server + "/")
    page.locator(".facet-btn").first.wait_for()
    photos = sorted(home.photos.rglob("*.jpg"))
    event_js = """([kind, name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, { type: "image/jpeg" }));
        const event = kind === "paste"
            ? new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true })
            : new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true });
        (kind === "paste" ? document.body : document.querySelector("#dropzone")).dispatchEvent(event);
    }"""
    for kind, photo in (("paste", photos[2]), ("drop", photos[11])):
        payload = base64.b64encode(photo.read_bytes()).decode()
        page.evaluate(event_js, [kind, photo.name, payload])
        wait_for_grid(page, ids_of(upload_answer(http, photo)))
        assert grid_ids(page)[0] == home.id_of(photo), kind
        assert photo.name in page.locator("#query-caption").inner_text()


def test_a_resized_copy_is_marked_as_a_copy(watched, server, http, home, tmp_path, shots):
    page = watched.page
    page.goto(server + "/")
    page.locator(".facet-btn").first.wait_for()
    photo = query_photo(home)
    copy = tmp_path / "half-size-copy.jpg"
    with Image.open(photo) as img:
        img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC).save(copy, quality=90)
    answer = upload_answer(http, copy)
    assert answer["results"][0]["near_duplicate"] and answer["results"][0]["score"] < 0.9999
    page.set_input_files("#file-input", str(copy))
    wait_for_grid(page, ids_of(answer))
    first = page.locator("#results > li.card").first
    assert int(first.get_attribute("data-id")) == home.id_of(photo)
    badge = first.locator(".badge")
    assert badge.inner_text() == "copy" and "copy of the query" in badge.get_attribute("title")
    assert page.locator("#results > li.card .badge").count() == 1  # only the copy is marked
    snap(page, shots, "12-resized-copy")


def test_open_a_result_more_like_this_and_reload(watched, server, http, home, shots):
    page = watched.page
    page.goto(server + "/?tag=garment:tops")
    photo = query_photo(home)
    page.set_input_files("#file-input", str(photo))
    answer = upload_answer(http, photo, tag="garment:tops")
    wait_for_grid(page, ids_of(answer))

    # Open the second result: the original, its metadata, tags with scores and its neighbours.
    second = answer["results"][1]
    page.locator("#results > li.card").nth(1).locator(".card-open").click()
    dialog = page.locator("#detail")
    assert dialog.is_visible() and dialog.get_attribute("data-id") == str(second["id"])
    meta = http.get(f"/images/{second['id']}").json()
    assert meta["tags"] == second["tags"]  # an image's own metadata carries the tags its results show
    page.wait_for_function(
        "path => document.querySelector('#detail-meta').textContent.includes(path)", arg=meta["path"]
    )
    assert f"{meta['width']} × {meta['height']} px" in page.locator("#detail-meta").inner_text()
    tag_rows = page.locator("#detail-tags tbody tr")
    assert tag_rows.count() == len(second["tags"])
    assert f"{second['tags'][0]['score']:.3f}" in page.locator("#detail-tags").inner_text()
    neighbours = http.get(f"/images/{second['id']}/similar", params={"k": 8}).json()
    page.wait_for_function("n => document.querySelectorAll('#detail-similar > li.card').length === n", arg=8)
    shown = page.eval_on_selector_all("#detail-similar > li.card", "items => items.map(li => Number(li.dataset.id))")
    assert shown == ids_of(neighbours)
    wait_for_images(page, "#detail-img")
    natural = page.eval_on_selector("#detail-img", "img => [img.naturalWidth, img.naturalHeight]")
    assert natural == [meta["width"], meta["height"]]  # the original file, not the thumbnail
    wait_for_images(page, "#detail-similar img")
    snap(page, shots, "03-detail", full_page=False)

    # "More like this": the id goes into the URL (filters kept) and the grid shows its neighbours.
    page.locator("#detail-more").click()
    assert not dialog.is_visible()
    page.wait_for_url(lambda url: "similar=" in url)
    assert url_query(page) == {"similar": [str(second["id"])], "tag": ["garment:tops"]}
    expected = ids_of(similar_answer(http, second["id"], tag="garment:tops"))
    assert second["id"] not in expected and expected != ids_of(answer)
    wait_for_grid(page, expected)
    page.wait_for_function(
        "name => document.querySelector('#query-caption').textContent === 'More like ' + name",
        arg=Path(meta["path"]).name,
    )
    wait_for_images(page, "#results .card-open img")
    snap(page, shots, "04-more-like-this")

    # The URL is the search: a reload (and a fresh tab) shows the same results.
    url = page.url
    page.reload()
    wait_for_grid(page, expected)
    other = page.context.new_page()
    other.goto(url)
    wait_for_grid(other, expected)
    assert (
        other.get_by_role("button", name="Include tops (garment)", exact=True).get_attribute("aria-pressed") == "true"
    )
    # The query image's own details (no result to take its tags from: they come with its metadata).
    other.locator("#query-open").click()
    other.locator("#detail").wait_for(state="visible")
    other.wait_for_function(
        "n => document.querySelectorAll('#detail-tags tbody tr').length === n", arg=len(meta["tags"])
    )
    assert other.locator("#detail").get_attribute("data-id") == str(second["id"])
    other.close()

    # Back goes to the previous URL (the upload's filters; the upload itself is no longer the query).
    page.go_back()
    page.wait_for_url(lambda u: "similar=" not in u)
    assert url_query(page) == {"tag": ["garment:tops"]}


def test_heads_view_shows_the_trained_head(watched, server, http, shots):
    page = watched.page
    page.goto(server + "/")
    page.get_by_role("link", name="Heads").click()
    page.wait_for_url(lambda url: "view=heads" in url)
    card = page.locator('.head-card[data-head="garment"]')
    card.wait_for()
    report = http.get("/heads/garment").json()
    metrics = report["metrics"]["metrics"]
    # Each figure with its 95% interval where the report has one (the cross-validated small set does).
    intervals = metrics["ci95"]
    assert {"accuracy", "precision", "recall", "f1"} <= set(intervals)
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        row = card.locator(f'tr[data-metric="{key}"] td')
        want = f"{metrics[key]:.3f}"
        if key in intervals:
            want += f" (95% CI {intervals[key][0]:.3f}–{intervals[key][1]:.3f})"
        assert row.inner_text() == want, key
    assert card.locator('tr[data-metric="positives"] td').inner_text() == str(metrics["positives"])
    warnings = report["metrics"]["warnings"]
    assert card.locator(".head-warnings li").all_inner_texts() == warnings
    labels = card.locator(".head-labels").inner_text()
    assert "tops" in labels and "positive" in labels and f"{report['thresholds'][0]:.3f}" in labels
    matrix = card.locator("table.confusion tbody").inner_text().split()
    assert [int(x) for x in matrix if x.isdigit()] == [n for row in metrics["confusion_matrix"] for n in row]
    # The three plots saved at training, served from the training's folder below the head's.
    wait_for_images(page, '.head-card[data-head="garment"] .plot img')
    assert card.locator(".plot img").count() == 3
    assert page.locator('.head-card[data-head="imagenet"]').is_visible()  # the built-in head, listed after
    snap(page, shots, "05-heads")

    plot = http.get("/heads/garment/plots/confusion_matrix.png")
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
    assert plot.content.startswith(b"\x89PNG\r\n\x1a\n")
    plots = Path(report["report_dir"]) / "plots" / report["metrics"]["plot_set"]
    assert plot.content == (plots / "confusion_matrix.png").read_bytes()
    for path in (
        "/heads/garment/plots/report.json",  # in the folder, but not a plot
        "/heads/garment/plots/..%2Freport.json",
        "/heads/garment/plots/%2E%2E%2F%2E%2E%2Flookalike.db",
        "/heads/garment/plots/../report.json",
        "/heads/garment/plots/confusion_matrix.png?set=..%2F..%2F..",  # a set is a name, not a path
        "/heads/imagenet/plots/loss.png",  # the built-in head has no report folder
        "/heads/no-such-head/plots/loss.png",
    ):
        assert http.get(path).status_code == 404, path


def test_status_view_shows_counts_and_failures(watched, server, http, home, shots):
    page = watched.page
    page.goto(server + "/?view=status")
    page.locator(".count-card").first.wait_for()
    stats = http.get("/stats").json()
    assert stats["images"] == {"indexed": 20, "imported": 0, "failed": 1, "total": 21}
    for key in ("indexed", "failed", "total"):
        value = page.locator(f'.count-card[data-status="{key}"] .count-value').inner_text()
        assert int(value) == stats["images"][key], key
    text = page.locator("#status-content").inner_text()
    assert stats["backbone"] in text and stats["index"]["type"] in text and str(stats["dimension"]) in text
    failures = page.locator("table.failures tbody tr")
    assert failures.count() == 1
    row = failures.first.inner_text()
    assert str(home.corrupt) in row and stats["failures"][0]["reason"] in row
    assert page.locator("nav a[aria-current=page]").inner_text() == "Index status"
    snap(page, shots, "06-status")


def test_keyboard_reaches_facets_and_results(watched, server, http, home):
    page = watched.page
    image_id = home.id_of(query_photo(home))
    page.goto(f"{server}/?similar={image_id}")
    wait_for_grid(page, ids_of(similar_answer(http, image_id)))
    page.locator(".facet-btn").first.wait_for()

    def tab_to(selector: str, limit: int = 40) -> None:
        for _ in range(limit):
            page.keyboard.press("Tab")
            if page.evaluate("sel => document.activeElement && document.activeElement.matches(sel)", selector):
                return
        raise AssertionError(f"Tab never reached {selector}")

    # Facets: one tab stop per head, arrow keys inside, Enter toggles.
    tab_to(".facet-btn")
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"  # visible focus
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowDown")
    counts = http.get("/tags").json()["garment"]
    second = sorted(counts, key=lambda label: (-counts[label], label))[1]  # the page lists by count
    focused = page.evaluate("document.activeElement.getAttribute('aria-label')")
    assert focused == f"Any of {second} (garment)"
    page.keyboard.press("Enter")
    page.wait_for_function(
        "term => new URLSearchParams(location.search).get('any_tag') === term", arg=f"garment:{second}"
    )
    expected = ids_of(similar_answer(http, image_id, any_tag=f"garment:{second}"))
    wait_for_grid(page, expected)

    # Results: Tab reaches the first card, Enter opens it, Escape closes and gives focus back.
    tab_to("#results .card-open")
    card_id = page.evaluate("document.activeElement.closest('li').dataset.id")
    assert card_id == str(expected[0])
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    page.keyboard.press("Enter")
    dialog = page.locator("#detail")
    dialog.wait_for(state="visible")
    assert dialog.get_attribute("data-id") == card_id
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")
    assert page.evaluate("document.activeElement.closest('li')?.dataset.id") == card_id
    # The next result's "More like this" by keyboard.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "More like this"
    page.keyboard.press("Enter")
    page.wait_for_url(lambda url: f"similar={card_id}" in url)
    wait_for_grid(page, ids_of(similar_answer(http, int(card_id), any_tag=f"garment:{second}")))


def test_phone_viewport(browser, server, http, home, shots):
    page, watch = open_page(browser, server, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        image_id = home.id_of(query_photo(home))
        page.goto(f"{server}/?similar={image_id}")
        wait_for_grid(page, ids_of(similar_answer(http, image_id)))
        lefts = page.eval_on_selector_all(
            "#results > li.card", "items => items.map(li => Math.round(li.getBoundingClientRect().left))"
        )
        assert 1 <= len(set(lefts)) <= 2, lefts
        widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert widths[0] <= widths[1] == 390, widths
        # Filters fold away behind a button on a phone.
        assert not page.locator("#facets").is_visible()
        wait_for_images(page, "#results > li.card:nth-child(-n+4) .card-open img")
        snap(page, shots, "07-phone", full_page=False)
        page.get_by_role("button", name="Filters").click()
        assert page.locator("#facets").is_visible()
        assert page.get_by_role("button", name="Filters").get_attribute("aria-expanded") == "true"
        widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert widths[0] <= widths[1], widths
        snap(page, shots, "08-phone-filters", full_page=False)
    finally:
        page.context.close()
    watch.check()


@pytest.fixture(scope="module")
def keyed_server(home, tmp_path_factory) -> Iterator[str]:
    """A second real server on the same home, with API keys (two user keys, one admin key) set."""
    log = tmp_path_factory.mktemp("web-keyed-server") / "serve.log"
    keys = {"LOOKALIKE_API_KEYS": f"{API_KEY}, {OTHER_KEY}", "LOOKALIKE_ADMIN_KEYS": ADMIN_KEY}
    with serve(home, log, **keys) as base:
        yield base


def test_api_key_prompt_session_storage_and_blob_images(browser, keyed_server, home, shots):
    """Against a server started with LOOKALIKE_API_KEYS: the page asks for a key, refuses a wrong
    one, searches with the right one (sent as a Bearer token, images as blob: URLs), keeps it in
    sessionStorage only (no localStorage, no cookie) and a new browser context starts without it."""
    base = keyed_server
    assert httpx.get(f"{base}/tags", timeout=60).status_code == 401  # the server really wants a key
    bearer = f"Bearer {API_KEY}"

    def new_page(context) -> tuple[Page, Watched, list[tuple[str, str | None, int]]]:
        page = context.new_page()
        seen: list[tuple[str, str | None, int]] = []  # data requests: path, Authorization, status

        def on_response(response) -> None:
            path = urlsplit(response.url).path
            if response.url.startswith(base + "/") and not (path == "/" or path.startswith("/static/")):
                seen.append((path, response.request.headers.get("authorization"), response.status))

        page.on("response", on_response)
        return page, Watched(page, base), seen

    def key_in_storage(page: Page) -> dict:
        return page.evaluate(
            """() => ({ session: sessionStorage.getItem('lookalike.apiKey'), local: localStorage.length,
                        cookie: document.cookie })"""
        )

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page, watch, seen = new_page(context)
    key_field = page.get_by_label("API key", exact=True)
    use_key = page.get_by_role("button", name="Use this key")
    try:
        page.goto(base + "/")
        key_dialog = page.locator("#key-dialog")
        key_dialog.wait_for(state="visible")
        assert key_field.is_visible() and key_field.get_attribute("type") == "password"
        assert page.locator("#key-error").inner_text() == ""
        assert seen and all(status == 401 and auth is None for _, auth, status in seen), seen
        snap(page, shots, "09-api-key-prompt", full_page=False)

        # A wrong key: the server refuses it, the prompt stays and says so; nothing is kept.
        refused_before = len(seen)
        key_field.fill("wrong-key")
        use_key.click()
        page.wait_for_function("() => document.querySelector('#key-error').textContent.includes('not accepted')")
        assert key_dialog.is_visible() and key_field.input_value() == ""
        assert any(auth == "Bearer wrong-key" and status == 401 for _, auth, status in seen[refused_before:])
        assert page.locator(".facet-btn").count() == 0
        assert key_in_storage(page) == {"session": None, "local": 0, "cookie": ""}
        assert not page.locator("#forget-key").is_visible()
        snap(page, shots, "10-api-key-refused", full_page=False)

        # The right key: the dialog goes, the facets load and a search shows the API's answer.
        key_field.fill(API_KEY)
        use_key.click()
        key_dialog.wait_for(state="hidden")
        page.locator(".facet-btn").first.wait_for()  # /tags answered, with the key
        assert key_in_storage(page) == {"session": API_KEY, "local": 0, "cookie": ""}
        assert context.cookies() == []
        assert page.locator("#forget-key").is_visible()
        first_ok = next(i for i, (_, auth, _s) in enumerate(seen) if auth == bearer)

        photo = query_photo(home)
        with httpx.Client(base_url=base, timeout=60, headers={"Authorization": bearer}) as http:
            answer = upload_answer(http, photo)
        page.set_input_files("#file-input", str(photo))
        wait_for_grid(page, ids_of(answer))
        assert grid_ids(page)[0] == home.id_of(photo)
        wait_for_images(page, "#results .card-open img")
        sources = page.eval_on_selector_all("#results .card-open img", "imgs => imgs.map(img => img.src)")
        assert sources and all(src.startswith("blob:") for src in sources)
        snap(page, shots, "11-api-key-results")
        # Once the key is known, every data request carries it and is answered (thumbnails too).
        later = seen[first_ok:]
        assert {p for p, _, _s in later} >= {"/tags", "/search", f"/images/{home.id_of(photo)}/thumbnail"}
        assert all(auth == bearer and status == 200 for _, auth, status in later), later

        # A reload of the same tab keeps the key (same session): no prompt, data comes straight back.
        count = len(seen)
        page.reload()
        page.locator(".facet-btn").first.wait_for()
        assert not key_dialog.is_visible() and key_in_storage(page)["session"] == API_KEY
        assert all(auth == bearer and status == 200 for _, auth, status in seen[count:]), seen[count:]
    finally:
        context.close()
    # The server's own 401 answers before the right key are the only console errors allowed.
    assert watch.errors == [] and watch.foreign == []
    assert all("401" in message for message in watch.console_errors), watch.console_errors

    # A new browser context is a new session: no key, the prompt again, and nothing answered.
    fresh = browser.new_context(viewport={"width": 1280, "height": 900})
    fresh.set_default_timeout(TIMEOUT_MS)
    page, watch, seen = new_page(fresh)
    try:
        page.goto(base + "/")
        page.locator("#key-dialog").wait_for(state="visible")
        assert key_in_storage(page) == {"session": None, "local": 0, "cookie": ""}
        assert seen and all(auth is None and status == 401 for _, auth, status in seen), seen
        assert page.locator(".facet-btn").count() == 0

        # "Forget API key" drops it from the session: the next data request asks again.
        page.get_by_label("API key", exact=True).fill(API_KEY)
        page.get_by_role("button", name="Use this key").click()
        page.locator(".facet-btn").first.wait_for()
        page.get_by_role("button", name="Forget API key").click()
        assert key_in_storage(page)["session"] is None
        assert not page.locator("#forget-key").is_visible()
        page.get_by_role("link", name="Index status").click()
        page.locator("#key-dialog").wait_for(state="visible")
    finally:
        fresh.close()
    assert watch.errors == [] and watch.foreign == []
    assert all("401" in message for message in watch.console_errors), watch.console_errors


# -- a catalogue whose files live elsewhere -------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_server(home, tmp_path_factory) -> Iterator[tuple[str, set[int], list[int]]]:
    """A home with 8 photos indexed here and the embeddings of 6 others imported under paths that
    are not on this machine (the module home's own, exported); yields (server, imported ids,
    indexed ids)."""
    root = tmp_path_factory.mktemp("web-mixed")
    photos = sorted(p for p in home.photos.rglob("*.jpg") if p != home.corrupt)
    local = root / "photos"
    local.mkdir()
    for path in photos[:8]:
        shutil.copy2(path, local / path.name)
    source = Library(home.settings)
    try:
        export_embeddings(source, root / "all.parquet")
    finally:
        source.close()
    table = pq.read_table(root / "all.parquet")
    keep = [i for i, p in enumerate(table.column("path").to_pylist()) if p in {str(q) for q in photos[8:14]}]
    assert len(keep) == 6
    table = table.take(keep)
    remote = [f"/elsewhere/catalogue/{Path(p).name}" for p in table.column("path").to_pylist()]
    table = table.set_column(table.schema.get_field_index("path"), "path", pa.array(remote, pa.string()))
    pq.write_table(table, root / "remote.parquet")

    settings = Settings(home=root / "home", model_cache=home.settings.model_cache)
    library = Library(settings)
    try:
        assert index_folders(library, [str(local)]).added == 8
        assert import_embeddings(library, [root / "remote.parquet"]).added == 6
        with library.sessions() as session:
            rows = list(session.scalars(select(ImageRow)))
        imported = {row.id for row in rows if row.status == "imported"}
        indexed = sorted(row.id for row in rows if row.status == "indexed")
    finally:
        library.close()
    with running_server(settings.home, model_cache=settings.model_cache, log=root / "serve.log") as base:
        yield base, imported, indexed


def test_imported_rows_show_a_labelled_tile_and_fetch_no_file(browser, mixed_server, shots):
    base, imported, indexed = mixed_server
    page, watch = open_page(browser, base)  # a thumbnail asked for and refused would be a console error
    asked: list[str] = []
    page.on("request", lambda request: asked.append(urlsplit(request.url).path))
    try:
        with httpx.Client(base_url=base, timeout=60) as http:
            local_id = indexed[0]
            answer = similar_answer(http, local_id)
            assert {r["id"] for r in answer["results"] if not r["has_file"]} == imported
            assert http.get(f"/images/{min(imported)}/thumbnail").status_code == 404
        page.goto(f"{base}/?similar={local_id}")
        wait_for_grid(page, ids_of(answer))
        tiles = page.eval_on_selector_all(
            "#results > li.card",
            "items => items.map(li => [Number(li.dataset.id),"
            " li.querySelector('.card-open').classList.contains('no-preview'),"
            " li.querySelector('.card-open').dataset.note || ''])",
        )
        for image_id, no_preview, note in tiles:
            assert no_preview == (image_id in imported), (image_id, note)
            assert ("another host" in note) == (image_id in imported), note
        wait_for_images(page, "#results .card-open:not(.no-preview) img")
        snap(page, shots, "09-imported-rows", full_page=False)

        # Its details: the note instead of the original, no link to a file that is not here.
        position = next(i for i, r in enumerate(answer["results"]) if r["id"] in imported)
        page.locator("#results > li.card").nth(position).locator(".card-open").click()
        page.locator("#detail").wait_for(state="visible")
        figure = page.locator(".detail-figure")
        assert "no-preview" in (figure.get_attribute("class") or "")
        assert "another host" in (figure.get_attribute("data-note") or "")
        assert not page.locator("#detail-file").is_visible()
        page.wait_for_function("() => document.querySelectorAll('#detail-similar > li.card').length > 0")
    finally:
        page.context.close()
    watch.check()
    wanted = {f"/images/{i}/{what}" for i in imported for what in ("thumbnail", "file")}
    assert not wanted.intersection(asked), sorted(wanted.intersection(asked))
