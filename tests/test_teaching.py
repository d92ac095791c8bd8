"""Teaching heads: stored examples, training on them, versions, suggestions, over HTTP and the CLI.

One real index of the clothing photos the repo ships, served by the real FastAPI app; every answer
is checked against what the database holds (SQLite, and PostgreSQL in the storage pass).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

import cli
import databases
from conftest import SAMPLES
from indexer.filters import TagIndex
from indexer.heads import suggestions, tagging
from indexer.heads.examples import put_examples
from indexer.heads.tagging import backbone_id_of
from indexer.heads.teach import train_from_examples
from indexer.library import Library
from indexer.models import ExampleRow, HeadRow, HeadVersionRow, ImageRow, TagRow
from indexer.pipeline import index_folders
from indexer.settings import Settings
from service.app import create_app

pytestmark = pytest.mark.storage


@dataclass
class Home:
    settings: Settings
    by_class: dict[str, list[int]]  # clothing class -> image ids, in id order

    def ids(self, label: str, count: int, start: int = 0) -> list[int]:
        return self.by_class[label][start : start + count]


@pytest.fixture(scope="module")
def home(tmp_path_factory, model_cache):
    root = tmp_path_factory.mktemp("teaching")
    shutil.copytree(SAMPLES, root / "images")
    settings = databases.home_settings(root / "home", model_cache=model_cache)
    library = Library(settings)
    assert index_folders(library, [str(root / "images")]).embedded == 80
    by_class: dict[str, list[int]] = {}
    with library.sessions() as session:
        for image_id, path in session.execute(select(ImageRow.id, ImageRow.path).order_by(ImageRow.id)):
            by_class.setdefault(Path(path).parent.name, []).append(image_id)
    library.close()
    return Home(settings, by_class)


@pytest.fixture(scope="module")
def client(home):
    with TestClient(create_app(home.settings)) as test_client:
        yield test_client


def db_tags(settings: Settings, head: str) -> dict[int, list[tuple[str, float]]]:
    library = Library(settings)
    try:
        with library.sessions() as session:
            rows = session.execute(
                select(TagRow.image_id, TagRow.label, TagRow.score)
                .join(HeadRow, HeadRow.id == TagRow.head_id)
                .where(HeadRow.name == head)
                .order_by(TagRow.image_id, TagRow.label)
            )
            out: dict[int, list] = {}
            for image_id, label, score in rows:
                out.setdefault(image_id, []).append((label, score))
            return out
    finally:
        library.close()


def put(client, name: str, kind: str, examples: dict[int, list[str]], **extra):
    body = {"type": kind, "examples": [{"image_id": i, "labels": labels} for i, labels in examples.items()], **extra}
    return client.put(f"/heads/{name}/examples", json=body)


def test_bad_examples_are_refused_and_change_nothing(home, client):
    shoes, hats = home.ids("shoes", 2), home.ids("hat", 2)
    assert put(client, "style", "multiclass", {shoes[0]: ["shoes"], hats[0]: ["hat"]}).status_code == 200
    before = client.get("/heads/style/examples").json()
    assert before["counts"] == {"hat": 1, "shoes": 1}

    def refused(response, status: int, words: str) -> None:
        assert response.status_code == status, response.text
        assert words in json.dumps(response.json()["detail"]), response.json()
        assert client.get("/heads/style/examples").json() == before  # nothing written

    refused(put(client, "style", "multiclass", {shoes[1]: ["shoes", "hat"]}), 422, "exactly one label")
    refused(put(client, "style", "multiclass", {shoes[1]: ["shoes"], 987654: ["hat"]}), 404, "987654")
    refused(put(client, "style", "binary", {shoes[1]: ["shoes"]}, positive="shoes"), 422, "is multiclass")
    refused(put(client, "style", "multiclass", {shoes[1]: ["shoes"]}, positive="shoes"), 422, "binary head")
    refused(put(client, "style", "multiclass", {shoes[1]: ["shoes"], hats[1]: [""]}), 422, "label is 1 to")
    too_many = {"type": "multiclass", "examples": [{"image_id": shoes[1], "labels": ["shoes"]}] * 1001}
    refused(client.put("/heads/style/examples", json=too_many), 422, "1000")
    refused(put(client, "imagenet", "multiclass", {shoes[1]: ["shoes"]}), 422, "built-in")
    assert put(client, "new-binary", "binary", {shoes[1]: ["shoes"]}).status_code == 422  # which label is positive?
    assert put(client, "a:b", "binary", {shoes[1]: ["shoes"]}, positive="shoes").status_code == 422
    two = put(client, "pair", "binary", {shoes[0]: ["shoes"], hats[0]: ["hat"]}, positive="shoes")
    assert two.status_code == 200, two.text
    three = put(client, "pair", "binary", {hats[1]: ["other"]})
    assert three.status_code == 422 and "two labels" in three.json()["detail"]
    assert client.get("/heads/nope/examples").status_code == 404
    assert client.delete(f"/heads/style/examples/{shoes[1]}").status_code == 404  # not an example
    assert client.delete(f"/heads/style/examples/{shoes[0]}").status_code == 204
    assert client.get("/heads/style/examples").json()["counts"] == {"hat": 1}
    # Too few examples to train: said plainly, nothing stored.
    refused_training = client.post("/heads/style/train")
    assert refused_training.status_code == 422 and "two labels" in refused_training.json()["detail"]
    listed = {h["name"]: h for h in client.get("/heads").json()}
    assert listed["style"]["trained"] is False and listed["style"]["examples"] == 1
    assert listed["imagenet"]["trained"] is True


def test_four_examples_train_a_binary_head_that_tags_and_filters(home, client):
    shoes, others = home.ids("shoes", 2), home.ids("dress", 1) + home.ids("pants", 1)
    examples = {i: ["shoes"] for i in shoes} | {i: ["other"] for i in others}
    assert put(client, "footwear", "binary", examples, positive="shoes").status_code == 200
    trained = client.post("/heads/footwear/train")
    assert trained.status_code == 200, trained.text
    report = trained.json()
    assert report["examples"] == 4 and report["labels"] == ["other", "shoes"]
    assert any("rough" in warning for warning in report["warnings"]), report["warnings"]
    tags = db_tags(home.settings, "footwear")
    assert report["tagged"] == sum(len(t) for t in tags.values()) == sum(len(v) for v in home.by_class.values())
    # The server's filters see the new tags at once, with the counts the database holds.
    counts = client.get("/tags").json()["footwear"]
    assert counts == dict(Counter(label for t in tags.values() for label, _ in t))
    tagged_shoes = {i for i, t in tags.items() if t[0][0] == "shoes"}
    assert set(home.by_class["shoes"][:2]) <= tagged_shoes
    hits = client.get(f"/images/{home.by_class['dress'][3]}/similar", params={"tag": "footwear:shoes", "k": 50}).json()
    assert {r["id"] for r in hits["results"]} == tagged_shoes - {home.by_class["dress"][3]}
    listed = {h["name"]: h for h in client.get("/heads").json()}
    assert listed["footwear"]["version"] == 1 and listed["footwear"]["examples"] == 4
    # The plots are rendered when first asked for, from what the training stored.
    assert report["plots"] == ["loss.png", "confusion_matrix.png", "precision_recall.png"]
    for name in report["plots"]:
        plot = client.get(f"/heads/footwear/plots/{name}")
        assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG"), name


def test_versions_are_kept_and_an_earlier_one_made_current_restores_its_tags(home, client):
    first = {i: [label] for label in ("shoes", "hat", "pants") for i in home.ids(label, 2)}
    assert put(client, "kind", "multiclass", first).status_code == 200
    assert client.post("/heads/kind/train").status_code == 200
    v1 = db_tags(home.settings, "kind")
    more = {i: [label] for label in ("shoes", "hat", "pants", "dress") for i in home.ids(label, 3, start=2)}
    assert put(client, "kind", "multiclass", more).status_code == 200
    report = client.post("/heads/kind/train").json()
    assert report["examples"] == 6 + 12 and report["labels"] == ["dress", "hat", "pants", "shoes"]
    v2 = db_tags(home.settings, "kind")
    assert {label for t in v2.values() for label, _ in t} >= {"dress"} and v2 != v1
    versions = client.get("/heads/kind/versions").json()
    assert [(v["number"], v["current"], v["examples"]) for v in versions] == [(1, False, 6), (2, True, 18)]
    second_set = client.get("/heads/kind").json()["metrics"]["plot_set"]
    second_loss = client.get("/heads/kind/plots/loss.png")
    assert second_loss.status_code == 200
    back = client.post("/heads/kind/versions/1/activate")
    assert back.status_code == 200, back.text
    # Version 1's own plots again; a page still showing version 2's report gets version 2's.
    first_set = client.get("/heads/kind").json()["metrics"]["plot_set"]
    assert first_set != second_set
    first_loss = client.get("/heads/kind/plots/loss.png")
    assert first_loss.status_code == 200 and first_loss.content.startswith(b"\x89PNG")
    assert first_loss.content != second_loss.content
    assert client.get(f"/heads/kind/plots/loss.png?set={first_set}").content == first_loss.content
    assert client.get(f"/heads/kind/plots/loss.png?set={second_set}").content == second_loss.content
    assert client.get("/heads/kind/plots/loss.png?set=..%2F..%2Fetc").status_code == 404
    assert client.get(f"/heads/kind/plots/loss.png?set={'0' * 16}").status_code == 404  # no such training
    assert db_tags(home.settings, "kind") == v1
    assert client.get("/tags").json()["kind"] == dict(Counter(label for t in v1.values() for label, _ in t))
    assert [v["current"] for v in client.get("/heads/kind/versions").json()] == [True, False]
    assert client.post("/heads/kind/versions/7/activate").status_code == 404
    assert db_tags(home.settings, "kind") == v1


def test_multilabel_examples_may_carry_no_label(home, client):
    upper = {i: ["upper", "top"] for i in home.ids("t-shirt", 3) + home.ids("shirt", 2)}
    lower = {i: ["lower"] for i in home.ids("pants", 3) + home.ids("shorts", 2)}
    few = client.put(
        "/heads/few-labels/examples",
        json={
            "type": "multilabel",
            "examples": [{"image_id": i, "labels": ["hat"]} for i in home.ids("hat", 3)]
            + [{"image_id": i, "labels": ["pants"]} for i in home.ids("pants", 2)],
        },
    )
    assert few.status_code == 200
    assert client.post("/heads/few-labels/train").status_code == 200  # as many folds as its rarest side allows
    nothing = {i: [] for i in home.ids("hat", 3)}
    assert put(client, "body", "multilabel", upper | lower | nothing).status_code == 200
    report = client.post("/heads/body/train").json()
    assert set(report["labels"]) == {"lower", "top", "upper"}, report
    tags = db_tags(home.settings, "body")
    assert all(label in {"lower", "top", "upper"} for t in tags.values() for label, _ in t)


def test_suggestions_come_from_the_unlabelled_images_with_their_reasons(home, client):
    examples = {i: ["shoes"] for i in home.ids("shoes", 2)} | {i: ["other"] for i in home.ids("skirt", 2)}
    assert put(client, "pick", "binary", examples, positive="shoes").status_code == 200
    before = client.get("/heads/pick/suggestions", params={"n": 6}).json()["suggestions"]
    assert len(before) == 6 and {s["reason"] for s in before} == {"near examples"}
    assert not {s["image_id"] for s in before} & set(examples)
    assert client.post("/heads/pick/train").status_code == 200
    # A head on four examples: the two images nearest the shoes, then coverage picks (its doubts
    # say little yet).
    cold = client.get("/heads/pick/suggestions", params={"n": 12}).json()["suggestions"]
    ids = [s["image_id"] for s in cold]
    assert len(ids) == 12 == len(set(ids)) and not set(ids) & set(examples)
    assert [s["reason"] for s in cold] == ["near examples"] * 2 + ["diverse"] * 10 and all(s["detail"] for s in cold)
    assert set(ids[:2]) <= set(home.ids("shoes", 8)), cold
    # Six shoes and eight others: uncertain picks, and the two images nearest the shoes (the rarer label).
    examples |= {i: ["shoes"] for i in home.ids("shoes", 4, start=2)}
    examples |= {i: ["other"] for i in home.ids("skirt", 2, start=2) + home.ids("hat", 2) + home.ids("pants", 2)}
    assert put(client, "pick", "binary", examples, positive="shoes").status_code == 200
    assert client.post("/heads/pick/train").status_code == 200
    after = client.get("/heads/pick/suggestions", params={"n": 12}).json()["suggestions"]
    ids = [s["image_id"] for s in after]
    assert len(ids) == 12 == len(set(ids)) and not set(ids) & set(examples)
    assert {s["reason"] for s in after} <= {"uncertain", "likely wrong", "diverse", "near examples"}
    assert "uncertain" in {s["reason"] for s in after} and all(s["detail"] for s in after)
    near = [s["image_id"] for s in after if s["reason"] == "near examples"]
    assert sorted(near) == sorted(home.ids("shoes", 2, start=6)), after
    tags = db_tags(home.settings, "pick")
    filtered = client.get("/heads/pick/suggestions", params={"n": 5, "tag": "pick:shoes"}).json()["suggestions"]
    assert filtered and all(tags[s["image_id"]][0][0] == "shoes" for s in filtered)
    assert client.get("/heads/nope/suggestions").status_code == 404
    assert client.get("/heads/pick/suggestions", params={"n": 0}).status_code == 422


def test_a_rare_labels_nearest_images_are_suggested_from_a_collection_larger_than_the_sample(home, client, monkeypatch):
    """A large collection is reduced to its least certain images and a uniform sample before
    picking; the images nearest the rarer label's examples are added to those, or a sample would
    miss them. Here the reduction is shrunk to 12 of the 66 unlabelled images."""
    monkeypatch.setattr(suggestions, "UNIFORM_SAMPLE", 8)
    monkeypatch.setattr(suggestions, "MIN_UNCERTAIN_POOL", 4)
    monkeypatch.setattr(suggestions, "UNCERTAIN_POOL", 1)
    others = home.ids("skirt", 4) + home.ids("hat", 2) + home.ids("pants", 2)
    examples = {i: ["bag"] for i in home.ids("shoes", 6)} | {i: ["other"] for i in others}
    assert put(client, "rare", "binary", examples, positive="bag").status_code == 200
    assert client.post("/heads/rare/train").status_code == 200
    picks = client.get("/heads/rare/suggestions", params={"n": 4}).json()["suggestions"]
    near = sorted(s["image_id"] for s in picks if s["reason"] == "near examples")
    assert near == sorted(home.ids("shoes", 2, start=6)), picks
    assert client.delete("/heads/rare").status_code == 204


def test_deleting_a_head_takes_its_examples_versions_and_tags(home, client):
    examples = {i: ["hat"] for i in home.ids("hat", 2)} | {i: ["other"] for i in home.ids("shoes", 2)}
    assert put(client, "gone", "binary", examples, positive="hat").status_code == 200
    assert client.post("/heads/gone/train").status_code == 200
    assert "gone" in client.get("/tags").json()
    assert client.delete("/heads/gone").status_code == 204
    assert client.get("/heads/gone/examples").status_code == 404
    assert "gone" not in client.get("/tags").json()
    library = Library(home.settings)
    with library.sessions() as session:
        assert session.scalar(select(HeadRow).where(HeadRow.name == "gone")) is None
        assert not session.scalars(select(HeadVersionRow)).all() or all(
            v.head_id in set(session.scalars(select(HeadRow.id))) for v in session.scalars(select(HeadVersionRow))
        )
        assert session.scalars(select(ExampleRow.image_id)).all()  # other heads' examples stay
    library.close()
    assert client.delete("/heads/gone").status_code == 404


def test_a_large_collection_trains_in_the_background_with_progress(home, tmp_path):
    settings = home.settings.model_copy(update={"train_inline_max": 0})
    with TestClient(create_app(settings)) as client:
        examples = {i: ["pants"] for i in home.ids("pants", 3)} | {i: ["other"] for i in home.ids("hat", 3)}
        assert put(client, "legs", "binary", examples, positive="pants").status_code == 200
        idle = client.get("/heads/legs/training").json()
        assert idle["state"] == "idle" and idle["action"] is None
        assert client.get("/heads/nope/training").status_code == 404
        started = client.post("/heads/legs/train")
        assert started.status_code == 202, started.text
        assert started.headers["location"] == "/heads/legs/training"
        state = wait_for_training(client, "legs")
        assert state["state"] == "done", state
        assert state["progress"]["done"] == state["progress"]["total"] == 80
        assert state["report"]["tagged"] == sum(len(t) for t in db_tags(settings, "legs").values())
        assert "legs" in client.get("/tags").json()
        # A second one starts, and a third while it runs is refused (or it had already finished).
        assert client.post("/heads/legs/train").status_code == 202
        third = client.post("/heads/legs/train")
        assert third.status_code in (202, 409), third.text
        if third.status_code == 409:
            assert "already" in third.json()["detail"]
        assert wait_for_training(client, "legs")["state"] == "done"


def wait_for_training(client, head: str) -> dict:
    deadline = time.monotonic() + 120
    while (state := client.get(f"/heads/{head}/training").json())["state"] == "running":
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    return state


def test_readers_see_the_old_tags_until_the_new_ones_are_all_written(home, monkeypatch):
    library = Library(home.settings)
    try:
        shirts = [(i, ["shirt"]) for i in home.ids("shirt", 3)] + [(i, ["other"]) for i in home.ids("shoes", 3)]
        with library.sessions.begin() as session:
            put_examples(session, "atomic", "binary", shirts, positive="shirt", backbone_id=backbone_id_of(library))
        train_from_examples(library, "atomic")
        old = db_tags(home.settings, "atomic")
        more = [(i, ["shirt"]) for i in home.ids("t-shirt", 4)] + [(i, ["shirt"]) for i in home.ids("longsleeve", 4)]
        with library.sessions.begin() as session:
            put_examples(session, "atomic", "binary", more, backbone_id=backbone_id_of(library))
        seen = []

        def check(point: str) -> None:
            # Every new tag is written and the transaction is still open: another connection reads
            # the old tags, all of them, and a fresh TagIndex holds exactly those.
            if point != "tag":
                return
            seen.append(point)
            assert db_tags(home.settings, "atomic") == old
            reader = Library(home.settings)
            with reader.sessions() as session:
                postings = TagIndex.load(session).postings
            reader.close()
            got = {label: set(ids.tolist()) for (head, label), (ids, _) in postings.items() if head == "atomic"}
            want: dict[str, set[int]] = {}
            for image_id, tags in old.items():
                for label, _ in tags:
                    want.setdefault(label, set()).add(image_id)
            assert got == want

        monkeypatch.setattr(tagging, "checkpoint", check)
        report = train_from_examples(library, "atomic")
        assert seen == ["tag"]
        new = db_tags(home.settings, "atomic")
        assert new != old and sum(len(t) for t in new.values()) == report["tagged"] == 80
        # The postings this process serves are the new ones, without a reload.
        served = library.tag_index().postings
        assert {label: set(ids.tolist()) for (head, label), (ids, _) in served.items() if head == "atomic"} == {
            label: {i for i, t in new.items() if t[0][0] == label} for label in ("other", "shirt")
        }
    finally:
        library.close()


def test_cli_examples_train_suggest_versions(home, tmp_path):
    runner = CliRunner()
    env = databases.home_env(home.settings.home)
    base = ["--home", str(home.settings.home)]

    def run(*args: str):
        result = runner.invoke(cli.app, [*args, *base], env=env)
        return result

    shoes, others = home.ids("shoes", 3, start=4), home.ids("outwear", 3)
    added = run(
        "heads",
        "examples",
        "cli-shoes",
        "add",
        *map(str, shoes),
        "--label",
        "shoes",
        "--type",
        "binary",
        "--positive",
        "shoes",
    )
    assert added.exit_code == 0, added.output
    assert run("heads", "examples", "cli-shoes", "add", *map(str, others), "--label", "other").exit_code == 0
    listed = run("heads", "examples", "cli-shoes", "list", "--json")
    assert json.loads(listed.stdout)["counts"] == {"other": 3, "shoes": 3}
    bad = run("heads", "examples", "cli-shoes", "add", str(shoes[0]), "--label", "shoes", "--label", "other")
    assert bad.exit_code == 1 and "exactly one label" in bad.output
    trained = run("heads", "train", "cli-shoes", "--json")
    assert trained.exit_code == 0, trained.output
    report = json.loads(trained.stdout)
    assert report["examples"] == 6 and report["tagged"] == sum(
        len(t) for t in db_tags(home.settings, "cli-shoes").values()
    )
    suggested = run("heads", "suggest", "cli-shoes", "-n", "4", "--json")
    picks = json.loads(suggested.stdout)["suggestions"]
    assert len(picks) == 4 and not {p["image_id"] for p in picks} & set(shoes + others)
    assert run("heads", "examples", "cli-shoes", "remove", str(others[0])).exit_code == 0
    assert json.loads(run("heads", "examples", "cli-shoes", "list", "--json").stdout)["counts"]["other"] == 2
    versions = run("heads", "versions", "cli-shoes")
    assert versions.exit_code == 0 and versions.stdout.strip().startswith("*   1")
    assert run("heads", "activate", "cli-shoes", "9").exit_code == 1
