"""Duplicates across the collection: tiers found by the real scan on real photos, keep rules,
decisions that survive re-scans, plan / apply / undo through the CLI, and the HTTP routes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps
from sqlalchemy import select

from conftest import SAMPLES, assert_index_matches_db, cli_command
from indexer.duplicates import groups as groups_module
from indexer.duplicates import scan
from indexer.duplicates.decisions import choose_keep, mark_distinct
from indexer.duplicates.groups import list_groups
from indexer.library import Library
from indexer.models import DuplicateLinkRow, ImageRow
from indexer.pipeline import index_folders
from service.app import create_app

HARD_NEGATIVES = Path(__file__).parent / "data" / "caltech101"


def _jpeg(img: Image.Image, path: Path, quality: int = 95, exif: bytes | None = None) -> None:
    img.convert("RGB").save(path, "JPEG", quality=quality, **({"exif": exif} if exif else {}))


def plant_collection(folder: Path) -> dict[str, Path]:
    """Distinct photos (clothing and look-alike motorbikes and airplanes) plus copies of one photo."""
    folder.mkdir(parents=True)
    photos = sorted(SAMPLES.rglob("*.jpg"))[::8] + sorted(HARD_NEGATIVES.glob("*.jpg"))
    for i, src in enumerate(photos):
        shutil.copy2(src, folder / f"photo{i:02d}.jpg")
    original = folder / "photo03.jpg"
    img = ImageOps.exif_transpose(Image.open(original)).convert("RGB")
    w, h = img.size
    copies = folder / "copies"
    copies.mkdir()
    planted = {
        "original": original,
        "identical": copies / "same-bytes.jpg",
        "half": copies / "half.jpg",
        "png": copies / "converted.png",
        "exif": copies / "rotated-by-exif.jpg",
        "crop": copies / "cropped.jpg",
    }
    shutil.copy2(original, planted["identical"])
    _jpeg(img.resize((w // 2, h // 2), Image.Resampling.BICUBIC), planted["half"])
    img.save(planted["png"], "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to display: undoes the quarter turn of the pixels
    _jpeg(img.transpose(Image.Transpose.ROTATE_90), planted["exif"], exif=exif.tobytes())
    dx, dy = round(w * 0.025), round(h * 0.025)
    _jpeg(img.crop((dx, dy, w - dx, h - dy)), planted["crop"])
    return planted


@pytest.fixture
def collection(tmp_path, settings):
    planted = plant_collection(tmp_path / "photos")
    library = Library(settings)
    report = index_folders(library, [str(tmp_path / "photos")])
    assert not report.failed
    with library.sessions() as session:
        ids = {Path(p): i for i, p in session.execute(select(ImageRow.id, ImageRow.path))}
    yield library, planted, {name: ids[path] for name, path in planted.items()}, ids
    library.close()


def _member_ids(group) -> set[int]:
    return {m.id for m in group.members}


def test_each_tier_groups_its_copies_and_leaves_distinct_photos_apart(collection):
    library, planted, id_of, ids = collection
    with library.sessions() as session:
        identical = list_groups(session, "identical")
        copy = list_groups(session, "copy")
        near = list_groups(session, "near")
    assert [_member_ids(g) for g in identical] == [{id_of["original"], id_of["identical"]}]
    assert identical[0].tier == "identical" and identical[0].links[0].score == 1.0
    # Resized, converted and EXIF-rotated copies share the frame; the crop does not.
    assert [_member_ids(g) for g in copy] == [{id_of[k] for k in ("original", "identical", "half", "png", "exif")}]
    assert copy[0].tier == "copy"
    assert all(link.tier in ("identical", "copy") for link in copy[0].links)
    assert all(link.score >= 0.99 for link in copy[0].links if link.tier == "copy")
    # Near-duplicates add the crop, and only it: the look-alike motorbikes and airplanes stay apart.
    assert [_member_ids(g) for g in near] == [set(id_of.values())]
    assert near[0].tier == "near"
    assert any(link.tier == "near" and id_of["crop"] in (link.a, link.b) for link in near[0].links)
    # The keep rule: full resolution first, then the original format (PNG over the JPEGs).
    assert copy[0].keep_id == id_of["png"]
    assert copy[0].keep_reason.startswith("original format")
    assert [m.keep for m in copy[0].members].count(True) == 1


def test_new_and_changed_images_are_checked_when_indexed(collection, tmp_path):
    library, planted, id_of, _ = collection
    with library.sessions() as session:
        assert len(scan.pending_images(session)[0]) == 0  # the first index run checked everything
    extra = tmp_path / "photos" / "copies" / "another-quality.jpg"
    _jpeg(ImageOps.exif_transpose(Image.open(planted["original"])), extra, quality=40)
    report = index_folders(library, [str(tmp_path / "photos")])
    assert report.duplicates is not None and report.duplicates.checked == 1
    with library.sessions() as session:
        new_id = session.scalar(select(ImageRow.id).where(ImageRow.path == str(extra)))
        (group,) = list_groups(session, "copy", image_id=new_id)
    assert id_of["original"] in _member_ids(group) and new_id in _member_ids(group)
    # The half-size copy becomes another photo: checked again, it leaves the group.
    shutil.copy2(sorted(SAMPLES.rglob("*.jpg"))[-1], planted["half"])
    report = index_folders(library, [str(tmp_path / "photos")])
    assert report.duplicates.checked == 1
    with library.sessions() as session:
        (group,) = list_groups(session, "copy", image_id=new_id)
        links = session.execute(select(DuplicateLinkRow.a_id, DuplicateLinkRow.b_id)).all()
    assert id_of["half"] not in _member_ids(group)
    assert not any(id_of["half"] in pair for pair in links)


def test_decisions_survive_rescans_and_a_new_member_reopens_a_resolved_group(collection, tmp_path):
    library, planted, id_of, _ = collection
    with library.sessions.begin() as session:
        mark_distinct(session, [id_of["original"], id_of["crop"]])
        group = choose_keep(session, id_of["exif"], "copy")
    assert group.keep_id == id_of["exif"] and group.keep_reason == "chosen by you" and group.resolved
    # A full re-scan (and a re-index) keeps both decisions.
    with library.write_lock(), library.sessions.begin() as session:
        scan.forget(session)
    scan.update(library)
    library.rebuild_index()
    with library.sessions() as session:
        assert list_groups(session, "copy") == []  # resolved: hidden
        (shown,) = list_groups(session, "copy", include_resolved=True)
        assert shown.keep_id == id_of["exif"]
        near = list_groups(session, "near", include_resolved=True)
    # The crop was only linked to the original... unless it links to another member too.
    assert all((link.a, link.b) != tuple(sorted((id_of["original"], id_of["crop"]))) for g in near for link in g.links)
    # A new copy joins: the group is listed again, still keeping the chosen member.
    _jpeg(ImageOps.exif_transpose(Image.open(planted["original"])), tmp_path / "photos" / "q50.jpg", quality=50)
    index_folders(library, [str(tmp_path / "photos")])
    with library.sessions() as session:
        (reopened,) = list_groups(session, "copy")
    assert reopened.keep_id == id_of["exif"] and not reopened.resolved


def test_plan_apply_and_undo_through_the_cli(collection, tmp_path):
    library, planted, id_of, _ = collection
    home = str(library.settings.resolved_home)
    library.close()
    listed = subprocess.run(
        cli_command("duplicates", "--tier", "copy", "--json", "--home", home), capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    (group,) = json.loads(listed.stdout)["groups"]
    assert group["tier"] == "copy" and len(group["members"]) == 5
    assert {"id", "path", "keep", "size", "width", "height", "format"} <= set(group["members"][0])
    assert all({"a", "b", "score"} <= set(link) for link in group["links"])
    plan_file = tmp_path / "plan.json"
    run = subprocess.run(
        cli_command("duplicates", "plan", str(plan_file), "--home", home), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    removals = json.loads(plan_file.read_text())["remove"]
    assert {r["id"] for r in removals} == {id_of[k] for k in ("original", "identical", "half", "exif")}
    assert all(Path(p).exists() for p in planted.values())  # a plan moves nothing
    quarantine = tmp_path / "quarantine"
    run = subprocess.run(
        cli_command("duplicates", "apply", str(plan_file), "--move-to", str(quarantine), "--home", home),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert not planted["half"].exists() and (quarantine / "photos" / "copies" / "half.jpg").is_file()
    assert planted["png"].exists() and planted["crop"].exists()
    reopened = Library(library.settings)
    assert_index_matches_db(reopened)
    with reopened.sessions() as session:
        paths = set(session.scalars(select(ImageRow.path)))
    assert str(planted["half"]) not in paths and str(planted["png"]) in paths
    reopened.close()
    (log,) = quarantine.glob("undo-*.jsonl")
    run = subprocess.run(cli_command("duplicates", "undo", str(log), "--home", home), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert all(Path(p).exists() for p in planted.values())
    reopened = Library(library.settings)
    with reopened.sessions() as session:
        (group,) = list_groups(session, "copy")
    assert len(group.members) == 5
    assert_index_matches_db(reopened)
    reopened.close()


def test_apply_skips_a_file_changed_after_the_plan(collection, tmp_path):
    from indexer.duplicates import plan

    library, planted, id_of, _ = collection
    with library.sessions() as session:
        removals = plan.plan(session, "copy")
    planted["half"].write_bytes(planted["half"].read_bytes() + b"\0")  # changed since the plan
    report = plan.apply_plan(library, removals, tmp_path / "q")
    assert (str(planted["half"]), "the file changed since the plan was written") in report.skipped
    assert planted["half"].exists() and len(report.moved) == len(removals) - 1
    assert_index_matches_db(library)


def test_http_routes_list_page_and_decide(collection):
    library, planted, id_of, _ = collection
    with TestClient(create_app(library.settings)) as client:
        listed = client.get("/duplicates", params={"tier": "copy"}).json()
        assert listed["total"] == 1 and listed["groups"][0]["size"] == 5
        assert client.get("/duplicates", params={"tier": "near", "page": 2, "page_size": 1}).json()["groups"] == []
        assert client.get("/duplicates", params={"tier": "everything"}).status_code == 422
        one = client.get(f"/images/{id_of['half']}/duplicates", params={"tier": "copy"}).json()
        assert one["group"]["keep"] == id_of["png"]
        assert client.get("/images/999999/duplicates").status_code == 404
        assert client.post("/duplicates/distinct", json={"ids": [id_of["crop"]]}).status_code == 422
        assert client.post("/duplicates/distinct", json={"ids": [id_of["crop"], 999999]}).status_code == 404
        kept = client.post("/duplicates/keep", json={"image_id": id_of["half"], "tier": "copy"}).json()
        assert kept["keep"] == id_of["half"] and kept["keep_reason"] == "chosen by you"
        assert client.get("/duplicates", params={"tier": "copy"}).json()["total"] == 0
        assert client.get("/duplicates", params={"tier": "copy", "resolved": True}).json()["total"] == 1
        assert client.delete(f"/duplicates/keep/{id_of['half']}").status_code == 204
        assert client.get("/duplicates", params={"tier": "copy"}).json()["total"] == 1


def _badges(client, image_id: int) -> dict[int, dict | None]:
    answer = client.get(f"/images/{image_id}/similar", params={"k": 100})
    assert answer.status_code == 200, answer.text
    return {hit["id"]: hit["duplicates"] for hit in answer.json()["results"]}


def _expected_badge(session, image_id: int) -> dict | None:
    """What the listing says: the image's copy group if any, else its near-duplicate group."""
    for tier in ("copy", "near"):
        groups = list_groups(session, tier, include_resolved=True, image_id=image_id)
        if groups:
            return {"tier": groups[0].tier, "size": len(groups[0].members)}
    return None


@pytest.mark.parametrize("steps", [groups_module.BADGE_STEPS, 1])  # 1: the walk gives up, the full computation
def test_search_hits_carry_their_duplicate_group(collection, monkeypatch, steps):
    library, planted, id_of, ids = collection
    monkeypatch.setattr(groups_module, "BADGE_STEPS", steps)
    other = next(i for p, i in ids.items() if p.name == "photo10.jpg")
    with TestClient(create_app(library.settings)) as client:
        badges = _badges(client, other)
        assert len(badges) == len(ids) - 1  # every other image: the grouped ones and the rest
        copy = {"tier": "copy", "size": 5}
        for name in ("original", "identical", "half", "png", "exif"):
            assert badges[id_of[name]] == copy, name
        assert badges[id_of["crop"]] == {"tier": "near", "size": 6}  # only near: the crop is no copy
        assert [i for i, badge in badges.items() if badge] == [i for i in badges if i in id_of.values()]
        with library.sessions() as session:
            assert badges == {i: _expected_badge(session, i) for i in badges}
        # Cut every link but the identical pair's: two identical files, and nothing else grouped.
        rest = [id_of[k] for k in ("half", "png", "exif", "crop")]
        with library.sessions.begin() as session:
            mark_distinct(session, [id_of["original"], *rest])
            mark_distinct(session, [id_of["identical"], *rest])
        badges = _badges(client, other)
        assert badges[id_of["original"]] == badges[id_of["identical"]] == {"tier": "identical", "size": 2}
        pair = (id_of["original"], id_of["identical"])
        assert [i for i, badge in badges.items() if badge] == [i for i in badges if i in pair]
        with library.sessions() as session:
            assert badges == {i: _expected_badge(session, i) for i in badges}
        # Uploads and searches by several examples carry the field too.
        upload = client.post("/search", params={"k": 5}, files={"file": ("q.jpg", planted["half"].read_bytes())})
        hits = upload.json()["results"]
        with library.sessions() as session:
            assert [hit["duplicates"] for hit in hits] == [_expected_badge(session, hit["id"]) for hit in hits]
        assert {"tier": "identical", "size": 2} in [hit["duplicates"] for hit in hits]


def test_plan_route_answers_the_plan_of_the_chosen_groups_only(collection, tmp_path):
    from dataclasses import asdict

    from indexer.duplicates import plan

    library, planted, id_of, ids = collection
    with TestClient(create_app(library.settings)) as client:
        answer = client.post("/duplicates/plan", json={"tier": "copy", "image_ids": [id_of["half"]]})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["tier"] == "copy"
        assert {r["id"] for r in body["remove"]} == {id_of[k] for k in ("original", "identical", "half", "exif")}
        assert all(r["keep_id"] == id_of["png"] for r in body["remove"])
        with library.sessions() as session:
            assert body["remove"] == [asdict(r) for r in plan.plan(session, "copy")]
        # The file the page downloads is one `apply` reads.
        (tmp_path / "plan.json").write_text(answer.text)
        assert [r.id for r in plan.read_plan(tmp_path / "plan.json")] == [r["id"] for r in body["remove"]]
        # Images in no group plan nothing; the near tier adds the crop's group, with its own pick.
        lone = next(i for p, i in ids.items() if p.name == "photo10.jpg")
        assert client.post("/duplicates/plan", json={"tier": "copy", "image_ids": [lone]}).json()["remove"] == []
        near = client.post("/duplicates/plan", json={"tier": "near", "image_ids": [lone, id_of["crop"]]}).json()
        assert len(near["remove"]) == 5 and {r["tier"] for r in near["remove"]} == {"near"}
        # A person's choice is what the plan keeps.
        client.post("/duplicates/keep", json={"image_id": id_of["half"], "tier": "copy"})
        kept = client.post("/duplicates/plan", json={"tier": "copy", "image_ids": [id_of["png"]]}).json()
        assert {r["id"] for r in kept["remove"]} == {id_of[k] for k in ("original", "identical", "png", "exif")}
        assert {r["reason"] for r in kept["remove"]} == {"chosen by you"}
        assert client.post("/duplicates/plan", json={"tier": "copy", "image_ids": []}).status_code == 422
        assert all(Path(p).exists() for p in planted.values())  # nothing moved
