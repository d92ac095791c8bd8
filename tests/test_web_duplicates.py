"""The duplicates view of the web page, end to end: Debian's Chromium, driven by Playwright, against a
real `lookalike serve` (issue 13, "The page").

One home folder per module: 16 of the shipped CC0 photos, and planted copies of four of them
(a half-size copy and a JPEG quality-30 copy of one, the same bytes under another name of a
second, a half-size copy of a third, a 5% crop of a fourth), indexed with the real pipeline,
which runs the duplicate scan. Every group, pick and score the page shows is compared with the
API's own answer, fetched separately over HTTP, and the downloaded plan with the listing: its
removals are exactly the non-kept members of the chosen groups as GET /duplicates lists them.

The tests run in file order: the ones that change decisions put them back ("Keep this one", then
"Let the rule decide") or come last ("Not duplicates"). Screenshots go to the test's temporary
folder and to test-output/web/.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageOps
from playwright.sync_api import Page
from sqlalchemy import select
from web_page import Watched, snap, url_query, wait_for_grid, wait_for_images, watched_page

import databases
from conftest import SAMPLES
from indexer.duplicates.plan import read_plan
from indexer.library import Library
from indexer.models import ImageRow
from indexer.pipeline import index_folders
from indexer.settings import Settings
from live_server import running_server


@dataclass
class Home:
    settings: Settings
    ids: dict[str, int]  # file name -> image id
    planted: dict[str, set[int]]  # group name -> the ids planted together


def _jpeg(img: Image.Image, path: Path, quality: int = 95) -> None:
    img.convert("RGB").save(path, "JPEG", quality=quality)


@pytest.fixture(scope="module")
def home(tmp_path_factory, model_cache) -> Iterator[Home]:
    with pytest.MonkeyPatch.context() as mp:
        databases.clear_settings(mp)
        root = tmp_path_factory.mktemp("dups")
        photos = root / "photos"
        photos.mkdir()
        for i, src in enumerate(sorted(SAMPLES.rglob("*.jpg"))[::5]):
            shutil.copy2(src, photos / f"photo{i:02d}.jpg")
        copies = photos / "copies"
        copies.mkdir()

        def frame(name: str) -> Image.Image:
            return ImageOps.exif_transpose(Image.open(photos / name)).convert("RGB")

        a = frame("photo03.jpg")
        _jpeg(a.resize((a.width // 2, a.height // 2), Image.Resampling.BICUBIC), copies / "a-half.jpg")
        _jpeg(a, copies / "a-q30.jpg", quality=30)
        shutil.copy2(photos / "photo07.jpg", copies / "b-same-bytes.jpg")
        c = frame("photo11.jpg")
        _jpeg(c.resize((c.width // 2, c.height // 2), Image.Resampling.BICUBIC), copies / "c-half.jpg")
        d = frame("photo14.jpg")
        dx, dy = round(d.width * 0.025), round(d.height * 0.025)
        _jpeg(d.crop((dx, dy, d.width - dx, d.height - dy)), copies / "d-crop.jpg")

        settings = databases.home_settings(root / "home", model_cache=model_cache)
        library = Library(settings)
        try:
            report = index_folders(library, [str(photos)])
            assert report.added == 21 and not report.failed
            with library.sessions() as session:
                ids = {Path(p).name: i for p, i in session.execute(select(ImageRow.path, ImageRow.id))}
        finally:
            library.close()
        planted = {
            "a": {ids["photo03.jpg"], ids["a-half.jpg"], ids["a-q30.jpg"]},
            "b": {ids["photo07.jpg"], ids["b-same-bytes.jpg"]},
            "c": {ids["photo11.jpg"], ids["c-half.jpg"]},
            "d": {ids["photo14.jpg"], ids["d-crop.jpg"]},
        }
        yield Home(settings, ids, planted)


@pytest.fixture(scope="module")
def server(home, tmp_path_factory) -> Iterator[str]:
    settings = home.settings
    log = tmp_path_factory.mktemp("dups-server") / "serve.log"
    with running_server(settings.home, model_cache=settings.model_cache, log=log) as base:
        yield base


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dups-screenshots")


@pytest.fixture
def watched(browser, server) -> Iterator[Watched]:
    yield from watched_page(browser, server, accept_downloads=True)


# -- helpers -----------------------------------------------------------------------------------------


def listing(http: httpx.Client, tier: str, **params) -> dict:
    response = http.get("/duplicates", params={"tier": tier, **params})
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_view(page: Page) -> None:
    page.wait_for_function("() => document.body.dataset.duplicates === 'done'")


def open_view(page: Page, server: str, query: str = "") -> None:
    page.goto(f"{server}/?view=duplicates{query}")
    wait_for_view(page)


def shown_groups(page: Page) -> list[dict]:
    """What the page shows of each group: members (in order), the kept one, the links' scores."""
    return page.eval_on_selector_all(
        "#dup-groups .dup-group",
        """cards => cards.map(card => ({
            members: [...card.querySelectorAll('.dup-member')].map(li => Number(li.dataset.id)),
            keep: Number(card.dataset.keep),
            kept: [...card.querySelectorAll('.dup-member.is-kept')].map(li => Number(li.dataset.id)),
            reason: card.querySelector('.dup-reason-text').textContent,
            links: [...card.querySelectorAll('.dup-links li')].map(li =>
                [Number(li.dataset.a), Number(li.dataset.b), li.querySelector('.score').textContent]),
            tier: card.dataset.tier,
        }))""",
    )


def as_shown(group: dict) -> dict:
    """The API's group as shown_groups reads it from the page."""
    return {
        "members": [m["id"] for m in group["members"]],
        "keep": group["keep"],
        "kept": [group["keep"]],
        "reason": group["keep_reason"],
        "links": [[link["a"], link["b"], f"{link['score']:.3f}"] for link in group["links"]],
        "tier": group["tier"],
    }


def group_card(page: Page, member_id: int):
    return page.locator("#dup-groups .dup-group", has=page.locator(f'.dup-member[data-id="{member_id}"]'))


def wait_until_shown(page: Page, expected: list[dict]) -> None:
    try:
        page.wait_for_function(
            """n => document.body.dataset.duplicates === 'done' &&
                document.querySelectorAll('#dup-groups .dup-group').length === n""",
            arg=len(expected),
        )
    except Exception:
        pass  # the assertion below says what the page shows instead
    assert shown_groups(page) == expected


# -- tests ---------------------------------------------------------------------------------------------


def test_the_planted_copies_are_found(http, home):
    """The fixture's premise, straight from the API: what each tier groups."""

    def groups(tier: str) -> list[list[int]]:
        return sorted(sorted(m["id"] for m in g["members"]) for g in listing(http, tier)["groups"])

    p = home.planted
    assert groups("identical") == [sorted(p["b"])]
    assert groups("copy") == sorted(sorted(p[k]) for k in "abc")
    assert groups("near") == sorted(sorted(p[k]) for k in "abcd")


def test_each_tier_lists_the_groups_the_api_lists_and_pages(watched, server, http, home, shots):
    page = watched.page
    page.goto(server + "/")
    page.get_by_role("link", name="Duplicates", exact=True).click()
    page.wait_for_url(lambda url: "view=duplicates" in url)
    wait_for_view(page)
    assert page.get_by_role("link", name="Duplicates", exact=True).get_attribute("aria-current") == "page"
    # The default tier is copies; each tier's link shows that tier's groups, as the API lists them.
    assert page.locator('.dup-tiers a[aria-current="page"]').inner_text() == "Copies"
    tiers = (
        ("Copies", "copy", "Copies"),
        ("Identical", "identical", "Identical files"),
        ("Near-duplicates", "near", "Near-duplicates"),
    )
    for name, tier, title in tiers:
        page.locator(".dup-tiers").get_by_role("link", name=name, exact=True).click()
        page.wait_for_url(lambda url, tier=tier: f"tier={tier}" in url)
        answer = listing(http, tier)
        wait_until_shown(page, [as_shown(g) for g in answer["groups"]])
        total = answer["total"]
        assert page.locator("#dup-status").inner_text().startswith(f"{total} group{'s' if total > 1 else ''} of")
        assert page.title() == f"{title} · Duplicates · lookalike"
    # Each member: its path, dimensions, size and format; the kept one says why.
    answer = listing(http, "copy")
    page.locator(".dup-tiers").get_by_role("link", name="Copies", exact=True).click()
    wait_until_shown(page, [as_shown(g) for g in answer["groups"]])
    group = answer["groups"][0]
    card = group_card(page, group["members"][0]["id"])
    for member in group["members"]:
        item = card.locator(f'.dup-member[data-id="{member["id"]}"]')
        text = item.inner_text()
        assert member["path"] in text and f"{member['width']} × {member['height']}" in text
        assert member["format"] in text and ("kB" in text or "MB" in text)
        assert (item.locator(".dup-keep").count() == 0) == member["keep"]
    assert card.locator(".dup-member.is-kept").inner_text().count("Kept") == 1
    kept = next(m for m in group["members"] if m["keep"])
    assert card.locator(".dup-reason").inner_text() == f"Keeps {Path(kept['path']).name}: {group['keep_reason']}"
    wait_for_images(page, "#dup-groups .card-open img")
    snap(page, shots, "20-duplicates")

    # Pages as the server pages them: two groups a page, then the rest on the next one.
    open_view(page, server, "&tier=near&page_size=2")
    first, second = listing(http, "near", page_size=2), listing(http, "near", page_size=2, page=2)
    assert first["total"] == 4 and len(second["groups"]) == 2
    wait_until_shown(page, [as_shown(g) for g in first["groups"]])
    assert page.locator("#dup-page").inner_text() == "Page 1 of 2"
    assert page.locator("#dup-prev").is_disabled()
    page.locator("#dup-next").click()
    page.wait_for_url(lambda url: "page=2" in url)
    wait_until_shown(page, [as_shown(g) for g in second["groups"]])
    assert page.locator("#dup-next").is_disabled() and page.locator("#dup-page").inner_text() == "Page 2 of 2"
    assert url_query(page) == {"view": ["duplicates"], "tier": ["near"], "page": ["2"], "page_size": ["2"]}
    page.go_back()
    wait_until_shown(page, [as_shown(g) for g in first["groups"]])


def test_badges_on_search_results_lead_to_the_group(watched, server, http, home, shots):
    page = watched.page
    query = home.ids["photo03.jpg"]
    answer = http.get(f"/images/{query}/similar", params={"k": 24}).json()
    expected = [r["id"] for r in answer["results"]]
    page.goto(f"{server}/?similar={query}")
    wait_for_grid(page, expected)
    badges = page.eval_on_selector_all(
        "#results > li.card",
        "cards => cards.map(c => c.querySelector('.dup-badge')?.textContent ?? null)",
    )
    grouped = set().union(*home.planted.values())
    texts = {"identical": "{} identical", "copy": "{} copies", "near": "near ×{}"}
    assert badges == [
        texts[r["duplicates"]["tier"]].format(r["duplicates"]["size"]) if r["duplicates"] else None
        for r in answer["results"]
    ]
    # The API's answer itself: grouped images carry their group, and only they.
    assert {r["id"] for r in answer["results"] if r["duplicates"]} == grouped & set(expected) - {query}
    assert next(r for r in answer["results"] if r["id"] == home.ids["a-half.jpg"])["duplicates"] == {
        "tier": "copy",
        "size": 3,
    }
    assert next(r for r in answer["results"] if r["id"] == home.ids["d-crop.jpg"])["duplicates"] == {
        "tier": "near",
        "size": 2,
    }
    assert "photo00.jpg" in home.ids and home.ids["photo00.jpg"] in expected  # an ungrouped photo is listed...
    ungrouped = page.locator(f'#results > li.card[data-id="{home.ids["photo00.jpg"]}"]')
    assert ungrouped.locator(".dup-badge").count() == 0  # ...without a badge
    wait_for_images(page, "#results .card-open img")
    snap(page, shots, "21-duplicate-badges")
    # A click opens that image's group in the duplicates view.
    crop = home.ids["d-crop.jpg"]
    page.locator(f'#results > li.card[data-id="{crop}"] .dup-badge').click()
    page.wait_for_url(lambda url: "view=duplicates" in url)
    assert url_query(page) == {"view": ["duplicates"], "tier": ["near"], "image": [str(crop)]}
    group = http.get(f"/images/{crop}/duplicates", params={"tier": "near"}).json()["group"]
    wait_until_shown(page, [as_shown(group)])
    # Back to the search, and the same grid.
    page.go_back()
    wait_for_grid(page, expected)


def test_keep_this_one_changes_the_pick(watched, server, http, home):
    page = watched.page
    a = home.planted["a"]
    before = http.get(f"/images/{min(a)}/duplicates", params={"tier": "copy"}).json()["group"]
    chosen = next(m for m in before["members"] if not m["keep"])
    open_view(page, server, "&tier=copy")
    card = group_card(page, chosen["id"])
    card.get_by_role("button", name=f"Keep this one: {Path(chosen['path']).name}").click()
    page.wait_for_function(
        "id => document.querySelector(`.dup-member.is-kept[data-id='${id}']`) !== null", arg=chosen["id"]
    )
    card = group_card(page, chosen["id"])
    kept = card.locator(".dup-member.is-kept")
    assert kept.count() == 1 and int(kept.get_attribute("data-id")) == chosen["id"]
    assert "chosen by you" in kept.inner_text() and "chosen by you" in card.locator(".dup-reason").inner_text()
    assert card.locator(".badge", has_text="resolved").count() == 1
    # The API agrees: that member is the pick, the group is resolved and leaves the plain listing.
    after = http.get(f"/images/{chosen['id']}/duplicates", params={"tier": "copy"}).json()["group"]
    assert after["keep"] == chosen["id"] and after["keep_reason"] == "chosen by you" and after["resolved"]
    assert a not in [{m["id"] for m in g["members"]} for g in listing(http, "copy")["groups"]]
    # "Show resolved groups" brings it back, with the person's pick.
    page.reload()
    wait_for_view(page)
    assert group_card(page, chosen["id"]).count() == 0
    page.locator("#dup-resolved").check()
    page.wait_for_url(lambda url: "resolved=1" in url)
    wait_until_shown(page, [as_shown(g) for g in listing(http, "copy", resolved=True)["groups"]])
    assert int(group_card(page, chosen["id"]).get_attribute("data-keep")) == chosen["id"]
    # "Let the rule decide" undoes the choice: the rule's pick again, on the page and in the API.
    group_card(page, chosen["id"]).get_by_role("button", name="Let the rule decide").click()
    page.wait_for_function(
        "id => document.querySelector(`.dup-member.is-kept[data-id='${id}']`) !== null", arg=before["keep"]
    )
    again = http.get(f"/images/{chosen['id']}/duplicates", params={"tier": "copy"}).json()["group"]
    assert again["keep"] == before["keep"] and not again["resolved"]


def test_add_to_plan_and_download_it(watched, server, http, home, tmp_path):
    page = watched.page
    open_view(page, server, "&tier=copy")
    assert page.locator("#dup-plan-download").is_disabled()
    chosen = [home.planted["a"], home.planted["c"]]
    for members in chosen:
        toggle = group_card(page, min(members)).get_by_role("button", name="Add to plan")
        toggle.click()
        assert toggle.get_attribute("aria-pressed") == "true"
    assert "2 groups, 5 images" in page.locator("#dup-plan-count").inner_text()
    # The plan is kept in the browser: a reload (and another page of the view) still has it.
    page.reload()
    wait_for_view(page)
    assert "2 groups" in page.locator("#dup-plan-count").inner_text()
    pressed = page.locator('.dup-plan-toggle[aria-pressed="true"]')
    assert pressed.count() == 2
    with page.expect_download() as info:
        page.get_by_role("button", name="Download plan").click()
    download = info.value
    assert download.suggested_filename == "lookalike-plan-copy.json"
    path = tmp_path / download.suggested_filename
    download.save_as(path)
    plan = json.loads(path.read_text())
    # Exactly the non-kept members of the chosen groups, each with the member that stays.
    groups = {frozenset(m["id"] for m in g["members"]): g for g in listing(http, "copy", resolved=True)["groups"]}
    expected = {}
    for members in chosen:
        group = groups[frozenset(members)]
        for m in group["members"]:
            if not m["keep"]:
                expected[m["id"]] = (m["path"], group["keep"])
    assert plan["tier"] == "copy"
    assert {r["id"]: (r["path"], r["keep_id"]) for r in plan["remove"]} == expected
    assert len(plan["remove"]) == len(expected)
    assert [r.id for r in read_plan(path)] == [r["id"] for r in plan["remove"]]  # what `apply` reads
    assert all(Path(r["path"]).is_file() for r in plan["remove"])  # nothing moved
    page.wait_for_function("() => document.querySelector('#dup-status').textContent.includes('Downloaded')")
    assert "3 files would be moved" in page.locator("#dup-status").inner_text()
    # "Clear plan" empties it.
    page.get_by_role("button", name="Clear plan").click()
    assert page.locator('.dup-plan-toggle[aria-pressed="true"]').count() == 0
    assert page.locator("#dup-plan-download").is_disabled()


def test_not_duplicates_removes_the_group_for_good(watched, server, http, home):
    page = watched.page
    crop_group = home.planted["d"]
    open_view(page, server, "&tier=near")
    card = group_card(page, min(crop_group))
    assert card.count() == 1
    card.get_by_role("button", name="Not duplicates").click()
    # Once the page says so (the decision is stored by then), the list is the API's without the group.
    page.wait_for_function("() => document.querySelector('#dup-status').textContent.includes('not duplicates')")
    assert page.locator("#dup-status").inner_text().startswith("2 images marked as not duplicates.")
    answer = listing(http, "near")
    wait_until_shown(page, [as_shown(g) for g in answer["groups"]])
    assert crop_group not in [{m["id"] for m in g["members"]} for g in answer["groups"]]
    assert answer["total"] == 3
    # Gone for good: not among the resolved ones either, after a reload, nor as the crop's group.
    for group in listing(http, "near", resolved=True)["groups"]:
        assert not crop_group & {m["id"] for m in group["members"]}
    assert http.get(f"/images/{min(crop_group)}/duplicates", params={"tier": "near"}).json()["group"] is None
    page.reload()
    wait_for_view(page)
    assert group_card(page, min(crop_group)).count() == 0
    # Its members lose their badge on search results.
    hits = http.get(f"/images/{home.ids['photo03.jpg']}/similar", params={"k": 24}).json()["results"]
    assert all(r["duplicates"] is None for r in hits if r["id"] in crop_group)
