"""Teaching lookalike from the page, end to end: Debian's Chromium, driven by Playwright, against a
real `lookalike serve` (issue 12).

One home folder per module: 40 of the shipped CC0 photos (4 per class), indexed with the real
pipeline and ONNX model, and no head but the built-in one, so every head here is made by the page.
The loop: search by several examples ("Like" / "Unlike" on results), the tray and the URL that
keeps them, "Save as tag…", labelling suggestions with the mouse and the keyboard, Train, the new
tag in the search page's filters, a second version, and "Make current" on the first. Every grid,
count and figure the page shows is compared with the API's own answer, fetched separately. A
second server on the same home, started with LOOKALIKE_TRAIN_INLINE_MAX=0, trains in the
background (202 and polling); a third one has API keys, where a write asks for an admin key.

Screenshots of the main states go to the test's temporary folder and to test-output/web/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page
from sqlalchemy import select
from web_page import (
    Watched,
    facet_button,
    grid_ids,
    ids_of,
    open_page,
    snap,
    url_query,
    wait_for_grid,
    watched_page,
)

import databases
from conftest import SAMPLES
from indexer.library import Library
from indexer.models import ImageRow
from indexer.pipeline import index_folders
from indexer.settings import Settings
from live_server import running_server

K = 24  # the page's default number of results
HEAD = "extras"  # the binary head the loop teaches: accessories (shoes; later hats too) or clothes
POSITIVE, NEGATIVE = "accessory", "clothes"
API_KEY = "teach-user-key"
ADMIN_KEY = "teach-admin-key"


@dataclass
class Home:
    settings: Settings
    ids: dict[str, int]  # absolute path -> image id
    kind: dict[int, str]  # image id -> clothing class (its folder)

    def of(self, kind: str) -> list[int]:
        return sorted(i for i, k in self.kind.items() if k == kind)

    def label(self, image_id: int, accessories=("shoes",)) -> str:
        """The label a person would give this image, `accessories` being the classes they count as such."""
        return POSITIVE if self.kind[image_id] in accessories else NEGATIVE


@pytest.fixture(scope="module")
def home(tmp_path_factory, model_cache) -> Iterator[Home]:
    with pytest.MonkeyPatch.context() as mp:
        databases.clear_settings(mp)
        root = tmp_path_factory.mktemp("teach")
        photos = root / "photos"
        for path in sorted(SAMPLES.rglob("*.jpg"))[::2]:
            dest = photos / path.parent.name / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        settings = databases.home_settings(root / "home", model_cache=model_cache)
        library = Library(settings)
        try:
            assert index_folders(library, [str(photos)]).added == 40
            with library.sessions() as session:
                ids = {row.path: row.id for row in session.scalars(select(ImageRow))}
        finally:
            library.close()
        yield Home(settings, ids, {i: Path(p).parent.name for p, i in ids.items()})


def serve(home: Home, log: Path, **env: str):
    return running_server(home.settings.home, model_cache=home.settings.model_cache, env=env, log=log)


@pytest.fixture(scope="module")
def server(home, tmp_path_factory) -> Iterator[str]:
    with serve(home, tmp_path_factory.mktemp("teach-server") / "serve.log") as base:
        yield base


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teach-screenshots")


@pytest.fixture
def watched(browser, server) -> Iterator[Watched]:
    yield from watched_page(browser, server)


# -- the API's answers -------------------------------------------------------------------------------


def examples_answer(http: httpx.Client, like, unlike=(), strategy="average", **filters) -> dict:
    """POST /search by example ids, as the page sends it (the ids in the query string, no body)."""
    params = [("positive", i) for i in like] + [("negative", i) for i in unlike]
    params += [("strategy", strategy), ("k", K), *filters.items()]
    response = http.post("/search", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def binary_body(positive: str, ids, others=()) -> dict:
    """A PUT /heads/{name}/examples body: `ids` labelled `positive`, `others` labelled "other"."""
    examples = [{"image_id": i, "labels": [positive]} for i in ids]
    examples += [{"image_id": i, "labels": ["other"]} for i in others]
    return {"type": "binary", "positive": positive, "examples": examples}


def stored_examples(http: httpx.Client, head: str) -> dict[int, list[str]]:
    response = http.get(f"/heads/{head}/examples")
    assert response.status_code == 200, response.text
    return {e["image_id"]: e["labels"] for e in response.json()["examples"]}


def label_of(http: httpx.Client, image_id: int) -> str | None:
    """The label the head HEAD gives the image now."""
    tags = http.get(f"/images/{image_id}").json()["tags"]
    return next((t["label"] for t in tags if t["head"] == HEAD), None)


def tag_counts(http: httpx.Client, head: str) -> dict[str, int]:
    return http.get("/tags").json().get(head, {})


# -- what the page shows --------------------------------------------------------------------------------


def tray_ids(page: Page, side: str) -> list[int]:
    return page.eval_on_selector_all(f"#tray-{side} .tray-item[data-id]", "lis => lis.map(li => Number(li.dataset.id))")


def card(page: Page, image_id: int):
    return page.locator(f'#results > li.card[data-id="{image_id}"]')


def suggestion_ids(page: Page) -> list[int]:
    return page.eval_on_selector_all("#suggestions .suggestion", "items => items.map(li => Number(li.dataset.id))")


def wait_for_suggestions(page: Page) -> None:
    page.wait_for_function(
        "() => !document.querySelector('#suggestions[aria-busy]')"
        " && document.querySelectorAll('#suggestions .suggestion').length > 0"
    )


def shown_examples(page: Page) -> dict[int, list[str]]:
    """The label groups' tiles, as image id -> labels."""
    pairs = page.eval_on_selector_all(
        ".label-group .example",
        "items => items.map(li => [Number(li.dataset.id), li.closest('.label-group').dataset.label])",
    )
    out: dict[int, list[str]] = {}
    for image_id, label in pairs:
        out.setdefault(image_id, []).append(label)
    return {i: sorted(labels) for i, labels in out.items()}


def facet_counts(page: Page, head: str) -> dict[str, int]:
    rows = page.eval_on_selector_all(
        f'.facet[data-head="{head}"] .facet-row',
        "rows => rows.map(r => [r.dataset.term.split(':').slice(1).join(':'), Number(r.dataset.count)])",
    )
    return dict(rows)


def wait_for_facets(page: Page, head: str, expected: dict[str, int]) -> None:
    try:
        page.wait_for_function(
            """([head, want]) => {
                const rows = [...document.querySelectorAll(`.facet[data-head="${head}"] .facet-row`)];
                const got = Object.fromEntries(
                    rows.map(r => [r.dataset.term.slice(head.length + 1), Number(r.dataset.count)]));
                return JSON.stringify(Object.entries(got).sort()) === JSON.stringify(Object.entries(want).sort());
            }""",
            arg=[head, expected],
        )
    except Exception:
        pass  # the assertion says what the facets show instead
    assert facet_counts(page, head) == expected


def label_by_key(page: Page, home: Home, image_id: int, accessories=("shoes",)) -> None:
    """With the suggestion focused, its label's number key; then the tile appears under that label."""
    label = home.label(image_id, accessories)
    page.keyboard.press("1" if label == POSITIVE else "2")  # the positive label is key 1
    page.locator(f'#suggestions .suggestion[data-id="{image_id}"]').wait_for(state="detached")
    page.locator(f'.label-group[data-label="{label}"] .example[data-id="{image_id}"]').wait_for()


def focused_suggestion(page: Page) -> int | None:
    return page.evaluate("Number(document.activeElement.closest('#suggestions .suggestion')?.dataset.id) || null")


def wait_for_version(page: Page, number: int) -> None:
    page.locator(f'#head-versions tr[data-version="{number}"][data-current="true"]').wait_for()


def check_evaluation(page: Page, http: httpx.Client, head: str) -> dict:
    """The editor's evaluation is the current version's report, with what it rests on."""
    report = http.get(f"/heads/{head}").json()["metrics"]
    metrics = report["metrics"]
    page.wait_for_function(
        "n => (document.querySelector('#head-eval .rests-on')?.textContent || '').startsWith(`Rests on ${n} example`)",
        arg=metrics["n"],
    )
    assert metrics["evaluated_on"] in page.locator("#head-eval .rests-on").inner_text()
    intervals = metrics.get("ci95", {})
    for key in ("accuracy", "precision", "recall", "f1"):
        want = f"{metrics[key]:.3f}"
        if key in intervals:
            want += f" (95% CI {intervals[key][0]:.3f}–{intervals[key][1]:.3f})"
        assert page.locator(f'#head-eval tr[data-metric="{key}"] td').inner_text() == want, key
    assert page.locator("#head-eval .head-warnings li").all_inner_texts() == report["warnings"]
    shown = page.eval_on_selector_all("#head-mistakes .mistake", "items => items.map(li => Number(li.dataset.id))")
    assert shown == [m["image_id"] for m in report["mistakes"]]
    return report


# -- tests ---------------------------------------------------------------------------------------------


def test_search_by_several_examples_keeps_them_in_the_url(watched, server, http, home, shots):
    page = watched.page
    shoes = home.of("shoes")
    first = shoes[0]
    page.goto(f"{server}/?similar={first}")
    single = http.get(f"/images/{first}/similar", params={"k": K}).json()
    wait_for_grid(page, ids_of(single))
    assert not page.locator("#tray").is_visible()

    # "Like" on another shoe: the query image and that one are the examples now; the grid is the
    # API's answer for both, the URL holds both, and neither is a result any more.
    liked = next(i for i in ids_of(single) if home.kind[i] == "shoes")
    name = Path(next(r["path"] for r in single["results"] if r["id"] == liked)).name
    toggle = card(page, liked).get_by_role("button", name=f"Like (more like this): {name}")
    assert toggle.get_attribute("aria-pressed") == "false"
    toggle.click()
    both = examples_answer(http, [first, liked])
    assert {first, liked}.isdisjoint(ids_of(both))
    wait_for_grid(page, ids_of(both))
    assert url_query(page) == {"like": [str(first), str(liked)]}
    assert tray_ids(page, "like") == [first, liked] and tray_ids(page, "unlike") == []
    assert not page.locator("#query").is_visible()
    assert "ranked by 2 examples" in page.locator("#search-status").inner_text()

    # "Unlike" from the keyboard: the focus stays on the grid, on the toggle of the card that
    # took the unliked one's place.
    grid = grid_ids(page)
    position, unliked = next((n, i) for n, i in enumerate(grid) if home.kind[i] != "shoes")
    card(page, unliked).locator(".toggle-unlike").focus()
    page.keyboard.press("Enter")
    three = examples_answer(http, [first, liked], [unliked])
    wait_for_grid(page, ids_of(three))
    assert url_query(page) == {"like": [str(first), str(liked)], "unlike": [str(unliked)]}
    focused = page.evaluate("[document.activeElement.dataset.side, document.activeElement.closest('li')?.dataset.id]")
    assert focused == ["unlike", str(ids_of(three)[position])]

    # A second "Unlike" with the mouse, then the other strategy.
    second = next(i for i in grid_ids(page) if home.kind[i] not in ("shoes", home.kind[unliked]))
    card(page, second).locator(".toggle-unlike").click()
    wait_for_grid(page, ids_of(examples_answer(http, [first, liked], [unliked, second])))
    page.get_by_label("Best match").check()
    best = examples_answer(http, [first, liked], [unliked, second], strategy="best_score")
    wait_for_grid(page, ids_of(best))
    assert url_query(page)["strategy"] == ["best_score"]
    assert "best match" in page.locator("#search-status").inner_text()
    snap(page, shots, "teach-01-tray")

    # The URL is the search: a reload, and a new tab, restore the tray, the strategy and the grid.
    url = page.url
    page.reload()
    wait_for_grid(page, ids_of(best))
    assert tray_ids(page, "like") == [first, liked] and tray_ids(page, "unlike") == [unliked, second]
    assert page.get_by_label("Best match").is_checked()
    other = page.context.new_page()
    other.goto(url)
    wait_for_grid(other, ids_of(best))
    other.close()

    # Remove one from the tray: the grid follows; a filter applies to the examples' ranking too.
    page.get_by_role("button", name=f"Remove {name} from more like this").click()
    fewer = examples_answer(http, [first], [unliked, second], strategy="best_score")
    wait_for_grid(page, ids_of(fewer))
    assert url_query(page) == {"like": [str(first)], "unlike": [str(unliked), str(second)], "strategy": ["best_score"]}
    top = max(fewer["results"][0]["tags"], key=lambda t: t["score"])
    facet_button(page, "Include", "imagenet", top["label"]).click()
    filtered = examples_answer(http, [first], [unliked, second], strategy="best_score", tag=f"imagenet:{top['label']}")
    wait_for_grid(page, ids_of(filtered))

    # Back: the previous URL's examples and grid again.
    page.go_back()
    wait_for_grid(page, ids_of(fewer))
    assert tray_ids(page, "like") == [first]


def test_save_as_tag_label_suggestions_train_filter_and_roll_back(watched, server, http, home, shots):
    page = watched.page
    like, unlike = home.of("shoes")[:2], home.of("dress")[:1]
    query = "&".join([*(f"like={i}" for i in like), *(f"unlike={i}" for i in unlike)])
    page.goto(f"{server}/?{query}")
    wait_for_grid(page, ids_of(examples_answer(http, like, unlike)))
    page.evaluate("window.loadedOnce = true")  # gone if anything below reloads the page

    # Save as tag: a new binary head whose examples are the tray's, then its editor.
    page.get_by_role("button", name="Save as tag…").click()
    dialog = page.locator("#head-dialog")
    dialog.wait_for(state="visible")
    page.get_by_label("Head name").fill(HEAD)
    page.wait_for_function("() => document.querySelector('#head-known').textContent.includes('new head')")
    assert page.get_by_label("Binary: a label or not").is_checked()
    page.get_by_label("Label of the “Like” images (the positive label)").fill(POSITIVE)
    page.get_by_label("Label of the “Unlike” images").fill(NEGATIVE)
    snap(page, shots, "teach-02-save-as-tag", full_page=False)
    page.get_by_role("button", name="Save examples").click()
    page.wait_for_url(lambda u: "view=head" in u)
    assert url_query(page) == {"view": ["head"], "name": [HEAD]}
    assert stored_examples(http, HEAD) == {i: [POSITIVE] for i in like} | {i: [NEGATIVE] for i in unlike}
    page.wait_for_function("n => document.querySelectorAll('.label-group .example').length === n", arg=3)
    assert shown_examples(page) == stored_examples(http, HEAD)
    assert page.locator("#head-summary").inner_text().endswith("not trained yet")

    # Suggestions: the API's, in its order; one labelled with the mouse...
    wait_for_suggestions(page)
    answer = http.get(f"/heads/{HEAD}/suggestions", params={"n": 12}).json()["suggestions"]
    assert suggestion_ids(page) == [s["image_id"] for s in answer]
    assert {s["reason"] for s in answer} == {"near examples"}  # no head yet: neighbours of the examples
    reasons = page.locator("#suggestions .suggestion .reason").all_inner_texts()
    assert reasons == [s["reason"] for s in answer]
    snap(page, shots, "teach-03-editor-new")
    clicked = answer[0]["image_id"]
    page.locator(f'#suggestions .suggestion[data-id="{clicked}"]').get_by_role(
        "button", name=home.label(clicked), exact=True
    ).click()
    page.locator(f'.label-group[data-label="{home.label(clicked)}"] .example[data-id="{clicked}"]').wait_for()
    assert stored_examples(http, HEAD)[clicked] == [home.label(clicked)]

    # ... then from the keyboard: number keys label the focused suggestion and move to the next,
    # x skips one (it is not stored).
    page.locator("#suggestions .suggestion .card-open").first.focus()
    for _ in range(4):
        image_id = focused_suggestion(page)
        assert image_id is not None
        label_by_key(page, home, image_id)
    skipped = focused_suggestion(page)
    page.keyboard.press("x")
    page.locator(f'#suggestions .suggestion[data-id="{skipped}"]').wait_for(state="detached")
    assert focused_suggestion(page) not in (None, skipped)
    stored = stored_examples(http, HEAD)
    assert skipped not in stored and len(stored) == 8
    assert all(labels == [home.label(i)] for i, labels in stored.items() if i not in unlike)
    assert shown_examples(page) == stored

    # Train (inline: the collection is small). The evaluation says what it rests on, the version
    # list holds version 1, and the search page's filters have the new head without a reload.
    page.get_by_role("button", name="Train").click()
    wait_for_version(page, 1)
    page.wait_for_function("() => document.querySelector('#view-head').dataset.training === 'done'")
    report = check_evaluation(page, http, HEAD)
    assert report["examples"] == len(stored)
    assert "version 1 is current" in page.locator("#head-summary").inner_text()
    first_counts = tag_counts(http, HEAD)
    assert set(first_counts) == {POSITIVE, NEGATIVE} and sum(first_counts.values()) == 40
    snap(page, shots, "teach-04-trained")

    page.get_by_role("link", name="Search").click()
    wait_for_grid(page, ids_of(examples_answer(http, like, unlike)))  # the last search, as it was
    wait_for_facets(page, HEAD, first_counts)
    page.get_by_role("button", name=f"Include {POSITIVE} ({HEAD})", exact=True).click()
    filtered = examples_answer(http, like, unlike, tag=f"{HEAD}:{POSITIVE}")
    assert all(any(t["head"] == HEAD and t["label"] == POSITIVE for t in r["tags"]) for r in filtered["results"])
    wait_for_grid(page, ids_of(filtered))
    assert page.evaluate("window.loadedOnce") is True

    # The person changes their mind: hats are accessories too. A tray of hats, saved into the same
    # head (its type and labels fixed by the head), more labels from the keyboard, version 2.
    hats = home.of("hat")
    page.goto(f"{server}/?" + "&".join(f"like={i}" for i in hats))
    wait_for_grid(page, ids_of(examples_answer(http, hats)))
    page.evaluate("window.loadedOnce = true")
    page.get_by_role("button", name="Save as tag…").click()
    page.get_by_label("Head name").fill(HEAD)
    page.wait_for_function("() => document.querySelector('#head-known').textContent.includes('existing binary head')")
    positive = page.get_by_label("Label of the “Like” images (the positive label)")
    assert positive.input_value() == POSITIVE and positive.get_attribute("readonly") is not None
    assert page.get_by_label("Multi-class: one label of several").is_disabled()
    page.get_by_role("button", name="Save examples").click()
    page.wait_for_url(lambda u: "view=head" in u)
    wait_for_suggestions(page)
    assert all(stored_examples(http, HEAD)[i] == [POSITIVE] for i in hats)  # relabelled where labelled before
    page.locator("#suggestions .suggestion .card-open").first.focus()
    for _ in range(4):
        label_by_key(page, home, focused_suggestion(page), accessories=("shoes", "hat"))
    now = stored_examples(http, HEAD)
    assert shown_examples(page) == now
    page.get_by_role("button", name="Train").click()
    wait_for_version(page, 2)
    check_evaluation(page, http, HEAD)
    second_counts = tag_counts(http, HEAD)
    assert [label_of(http, i) for i in hats] == [POSITIVE] * len(hats)  # hats are accessories now
    wait_for_facets(page, HEAD, second_counts)
    versions = {v["number"]: v for v in http.get(f"/heads/{HEAD}/versions").json()}
    assert sorted(versions) == [1, 2] and versions[2]["current"] and versions[2]["examples"] == len(now)
    for number, version in versions.items():
        row = page.locator(f'#head-versions tr[data-version="{number}"]')
        assert row.locator("td").nth(1).inner_text() == str(version["examples"])
        assert row.locator("td").nth(2).inner_text() == f"F1 {version['metrics']['f1']:.3f}"
    snap(page, shots, "teach-05-version-2")

    # Roll back, from the heads view's link to the head: version 1 is current again, and the tag
    # counts in the search page's filters change back to the API's.
    page.get_by_role("link", name="Heads", exact=True).click()
    page.locator(f'.head-card[data-head="{HEAD}"]').get_by_role("link", name=f"Teach {HEAD}").click()
    page.get_by_role("button", name="Make version 1 current").click()
    wait_for_version(page, 1)
    assert [v["number"] for v in http.get(f"/heads/{HEAD}/versions").json() if v["current"]] == [1]
    rolled_back = tag_counts(http, HEAD)
    assert rolled_back == first_counts  # the same weights tag the same images
    wait_for_facets(page, HEAD, rolled_back)
    assert "Version 1 is current" in page.locator("#head-progress-text").inner_text()
    check_evaluation(page, http, HEAD)
    snap(page, shots, "teach-06-rolled-back")
    page.get_by_role("link", name="Search").click()
    wait_for_grid(page, ids_of(examples_answer(http, hats)))
    assert page.evaluate("window.loadedOnce") is True


@pytest.fixture(scope="module")
def background_server(home, tmp_path_factory) -> Iterator[str]:
    """A second server on the home that re-tags in the background whatever the collection's size."""
    with serve(home, tmp_path_factory.mktemp("teach-bg") / "serve.log", LOOKALIKE_TRAIN_INLINE_MAX="0") as base:
        yield base


def test_training_in_the_background_shows_its_progress(browser, background_server, home, shots):
    base = background_server
    head = "headwear"
    with httpx.Client(base_url=base, timeout=120) as http:
        body = binary_body("hat", home.of("hat")[:3], home.of("pants")[:3])
        assert http.put(f"/heads/{head}/examples", json=body).status_code == 200
        page, watch = open_page(browser, base)
        seen = []  # responses to the training routes, in order (bodies read afterwards: reading one waits)

        def on_response(response) -> None:
            if response.url.split(base, 1)[-1].startswith(f"/heads/{head}/train"):
                seen.append(response)

        page.on("response", on_response)
        try:
            page.goto(f"{base}/?view=head&name={head}")
            wait_for_suggestions(page)
            # Every state the editor passes through, and whether its progress bar showed then.
            page.evaluate(
                """() => {
                    const view = document.querySelector('#view-head');
                    const bar = document.querySelector('#head-progress-bar');
                    const text = document.querySelector('#head-progress-text');
                    window.trainingStates = [];
                    const record = () =>
                        window.trainingStates.push([view.dataset.training, !bar.hidden, text.textContent]);
                    new MutationObserver(record).observe(view, { attributeFilter: ['data-training'] });
                }"""
            )
            page.get_by_role("button", name="Train").click()
            page.wait_for_function("() => document.querySelector('#view-head').dataset.training === 'done'")
            wait_for_version(page, 1)
            answers = [(f"{r.request.method} {r.url.split(base, 1)[-1]}", r.status, r.json()) for r in seen]
            job = http.get(f"/heads/{head}/training").json()
            assert job["state"] == "done" and job["progress"]["done"] == job["progress"]["total"] == 40
            # POST answered 202 at once, and the page followed GET .../training until it said done.
            assert answers[0][:2] == (f"POST /heads/{head}/train", 202), answers
            polls = [a for a in answers if a[0] == f"GET /heads/{head}/training"]
            assert polls and polls[-1][2]["state"] == "done"
            # The bar shows from the click to the end, and every answer that said "running" was shown
            # as it came: "Training…" before the re-tagging, then how far the re-tagging had got.
            states = page.evaluate("window.trainingStates")
            assert states[0][:2] == ["running", True], states
            assert states[-1] == ["done", False, "Trained. Re-tagged 40 of 40 images."], states
            shown = [text for state, bar, text in states if state == "running" and bar]
            for _, _, poll in polls:
                if poll["state"] == "running":
                    done, total = poll["progress"]["done"], poll["progress"]["total"]
                    assert (f"Training: re-tagged {done} of {total} images." if total else "Training…") in shown, states
            wait_for_facets(page, head, http.get("/tags").json()[head])
            check_evaluation(page, http, head)
            snap(page, shots, "teach-07-background-training", full_page=False)
        finally:
            page.context.close()
        watch.check()


def test_heads_view_new_head_and_delete(watched, server, http, home):
    page = watched.page
    page.goto(f"{server}/?view=heads")
    page.locator(".head-card").first.wait_for()
    assert page.locator('.head-card[data-head="imagenet"] .teach-link').count() == 0  # built-in: not taught
    # Every plot a card lists loads (they load lazily: each is scrolled to). A version made
    # current again once listed its predecessor's plots, which are gone.
    plots = page.locator(".head-card .plots img")
    for at in range(plots.count()):
        plots.nth(at).scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=plots.nth(at).element_handle())

    # "New head…": the editor of a head that exists nowhere yet, with its labels from the form.
    page.get_by_role("button", name="New head…").click()
    page.get_by_label("Head name").fill("season")
    page.get_by_label("Multi-class: one label of several").check()
    page.get_by_label("Labels, separated by commas").fill("summer, winter")
    page.get_by_role("button", name="Create and open").click()
    page.wait_for_url(lambda u: "name=season" in u)
    page.locator('.label-group[data-label="winter"]').wait_for()
    groups = page.eval_on_selector_all(".label-group", "gs => gs.map(g => g.dataset.label)")
    assert groups == ["summer", "winter"]
    assert page.get_by_role("button", name="Train").is_disabled()
    assert "Save as tag" in page.locator("#suggestions-status").inner_text()
    assert http.get("/heads/season/examples").status_code == 404  # nothing stored until examples are

    # An example set made elsewhere, deleted from its editor.
    assert http.put("/heads/scratch/examples", json=binary_body("skirt", home.of("skirt")[:2])).status_code == 200
    page.goto(f"{server}/?view=head&name=scratch")
    page.locator('.label-group[data-label="skirt"] .example').first.wait_for()
    page.get_by_role("button", name="Delete head…").click()
    page.locator("#delete-dialog").get_by_role("button", name="Delete").click()
    page.wait_for_url(lambda u: "view=heads" in u)
    assert http.get("/heads/scratch/examples").status_code == 404
    page.locator(".head-card").first.wait_for()
    assert page.locator('.head-card[data-head="scratch"]').count() == 0


@pytest.fixture(scope="module")
def keyed_server(home, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("teach-keyed") / "serve.log"
    with serve(home, log, LOOKALIKE_API_KEYS=API_KEY, LOOKALIKE_ADMIN_KEYS=ADMIN_KEY) as base:
        yield base


def test_a_write_asks_for_an_admin_key(browser, keyed_server, home):
    base = keyed_server
    page, watch = open_page(browser, base)
    try:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        body = binary_body("hat", home.of("hat")[:2])
        assert httpx.put(f"{base}/heads/keyed/examples", json=body, headers=admin, timeout=60).status_code == 200
        page.goto(f"{base}/?view=head&name=keyed")
        key_dialog = page.locator("#key-dialog")
        key_dialog.wait_for(state="visible")
        assert page.locator("#key-title").inner_text() == "API key required"
        page.get_by_label("API key", exact=True).fill(API_KEY)
        page.get_by_role("button", name="Use this key").click()
        wait_for_suggestions(page)

        # Labelling is a write: the ordinary key gets a 403, the page asks for an admin key, and
        # the same label goes through with it.
        target = suggestion_ids(page)[0]
        suggestion = page.locator(f'#suggestions .suggestion[data-id="{target}"]')
        suggestion.get_by_role("button", name="hat", exact=True).click()
        key_dialog.wait_for(state="visible")
        assert page.locator("#key-title").inner_text() == "Admin key required"
        page.get_by_label("API key", exact=True).fill(ADMIN_KEY)
        page.get_by_role("button", name="Use this key").click()
        page.locator(f'.label-group[data-label="hat"] .example[data-id="{target}"]').wait_for()
        stored = httpx.get(f"{base}/heads/keyed/examples", headers=admin, timeout=60).json()
        assert {e["image_id"]: e["labels"] for e in stored["examples"]}[target] == ["hat"]
        assert page.evaluate("sessionStorage.getItem('lookalike.apiKey')") == ADMIN_KEY
    finally:
        page.context.close()
    assert watch.errors == [] and watch.foreign == []
    assert all("401" in m or "403" in m for m in watch.console_errors), watch.console_errors


def test_phone_viewport_tray_and_editor(browser, server, http, home, shots):
    assert http.put("/heads/pocket/examples", json=binary_body("shirt", home.of("shirt")[2:4])).status_code == 200
    page, watch = open_page(browser, server, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        like, unlike = home.of("shirt")[:2], home.of("shoes")[:1]
        page.goto(f"{server}/?like={like[0]}&like={like[1]}&unlike={unlike[0]}")
        wait_for_grid(page, ids_of(examples_answer(http, like, unlike)))
        widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert widths[0] <= widths[1] == 390, widths
        snap(page, shots, "teach-08-phone-tray", full_page=False)
        page.goto(f"{server}/?view=head&name=pocket")
        wait_for_suggestions(page)
        widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert widths[0] <= widths[1] == 390, widths
        # One column, the suggestions right below the labels.
        tops = page.evaluate(
            "['.editor-labels', '.editor-suggestions', '.editor-eval']"
            ".map(s => Math.round(document.querySelector(s).getBoundingClientRect().top))"
        )
        assert tops == sorted(tops), tops
        snap(page, shots, "teach-09-phone-editor", full_page=False)
    finally:
        page.context.close()
    watch.check()
