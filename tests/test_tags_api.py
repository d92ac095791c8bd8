"""Tags over HTTP: filtered search routes, /tags, /heads, and tags in the export.

One real index (80 clothing photos and a cat, two trained heads plus the built-in ImageNet head)
served by the real FastAPI app; the routes must agree with the Python search functions and with
what the database holds.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

import cli
import databases
from conftest import SAMPLES
from indexer import store
from indexer.filters import TagFilter
from indexer.heads import labels as label_io
from indexer.heads.training import TrainOptions
from indexer.heads.workflow import train
from indexer.library import Library
from indexer.models import HeadRow, ImageRow, TagRow
from indexer.pipeline import index_folders
from indexer.search import search_image, search_similar
from indexer.settings import Settings
from service.app import create_app

CAT = Path(__file__).resolve().parent / "data" / "cat" / "chelsea.png"
pytestmark = pytest.mark.storage

CLASSES = sorted(p.name for p in SAMPLES.iterdir() if p.is_dir())


@dataclass
class Served:
    settings: Settings
    photos: list[Path]
    ids_by_path: dict[str, int]
    tags: dict[int, list[tuple[str, str, float]]]  # image id -> sorted (head, label, score)
    library: Library  # the test's own, for the Python search functions


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_cache):
    root = tmp_path_factory.mktemp("tags-api")
    shutil.copytree(SAMPLES, root / "images")
    shutil.copy2(SAMPLES.parent / "labels.csv", root / "labels.csv")
    (root / "cat").mkdir()
    shutil.copy2(CAT, root / "cat" / "chelsea.png")
    photos = sorted((root / "images").rglob("*.jpg"))
    footwear_csv = root / "footwear.csv"
    footwear_csv.write_text(
        "path,labels\n" + "".join(f"{p},{'shoes' if p.parent.name == 'shoes' else 'other'}\n" for p in photos)
    )
    settings = databases.home_settings(root / "home", model_cache=model_cache)
    library = Library(settings)
    assert index_folders(library, [str(root / "images"), str(root / "cat")]).added == 81
    train(library, "clothes", label_io.finalise(label_io.read_csv(root / "labels.csv", "multiclass")), TrainOptions())
    footwear = label_io.finalise(label_io.read_csv(footwear_csv, "binary"), positive="shoes")
    train(library, "footwear", footwear, TrainOptions())
    with library.sessions() as session:
        ids_by_path = {p: i for i, p in session.execute(select(ImageRow.id, ImageRow.path))}
        tags: dict[int, list] = {i: [] for i in ids_by_path.values()}
        for image_id, head, label, score in session.execute(
            select(TagRow.image_id, HeadRow.name, TagRow.label, TagRow.score).join(
                HeadRow, HeadRow.id == TagRow.head_id
            )
        ):
            tags[image_id].append((head, label, score))
    library.close()
    library = Library(settings)  # fresh: nothing cached from the writes
    yield Served(settings, photos, ids_by_path, {i: sorted(t) for i, t in tags.items()}, library)
    library.close()


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served.settings)) as test_client:
        yield test_client


def _params(tag_filter: TagFilter, **extra) -> list[tuple[str, str]]:
    params = [("tag", t) for t in tag_filter.all_of]
    params += [("any_tag", t) for t in tag_filter.any_of]
    params += [("not_tag", t) for t in tag_filter.none_of]
    if tag_filter.min_score:
        params.append(("min_score", str(tag_filter.min_score)))
    return params + [(key, str(value)) for key, value in extra.items()]


FILTERS = [
    TagFilter(),
    TagFilter(("clothes:shoes",)),
    TagFilter(("shoes",)),  # a bare label: either head
    TagFilter(none_of=("footwear:shoes",)),
    TagFilter(("footwear:other",), ("clothes:dress", "clothes:skirt", "clothes:shorts"), min_score=0.2),
    TagFilter(any_of=("hat", "pants"), none_of=("clothes:pants",)),
    TagFilter(("footwear:other",), none_of=("clothes:t-shirt", "clothes:shirt"), min_score=0.6),
    TagFilter(("no-such-label",)),
]


def _assert_results_carry_tags(served: Served, results: list[dict]) -> None:
    for item in results:
        assert item["tags"], item
        assert all(set(t) == {"head", "label", "score"} for t in item["tags"])
        assert sorted((t["head"], t["label"], t["score"]) for t in item["tags"]) == served.tags[item["id"]]


def _assert_filter_holds(results: list[dict], tag_filter: TagFilter) -> None:
    """Each result, judged by its own tags, passes the filter."""
    for item in results:
        have = set()
        for t in item["tags"]:
            if t["score"] >= tag_filter.min_score:
                have |= {f"{t['head']}:{t['label']}", t["label"]}
        assert all(term in have for term in tag_filter.all_of), item
        assert not tag_filter.any_of or any(term in have for term in tag_filter.any_of), item
        assert not any(term in have for term in tag_filter.none_of), item


@pytest.mark.parametrize("which", range(len(FILTERS)))
def test_search_by_upload_matches_python(served, client, which):
    tag_filter = FILTERS[which]
    for path in (served.photos[12], CAT):
        data = path.read_bytes()
        response = client.post("/search", params=_params(tag_filter, k=15), files={"file": (path.name, data)})
        assert response.status_code == 200, response.text
        payload = response.json()
        expected = search_image(served.library, data, 15, tag_filter)
        assert [r["id"] for r in payload["results"]] == [r.id for r in expected.results]
        assert [r["score"] for r in payload["results"]] == pytest.approx([r.score for r in expected.results])
        assert payload["strategy"] == expected.strategy
        _assert_results_carry_tags(served, payload["results"])
        _assert_filter_holds(payload["results"], tag_filter)
        if tag_filter.all_of == ("no-such-label",):
            assert payload["results"] == [] and payload["strategy"] == "empty"
        elif tag_filter.is_empty():
            assert len(payload["results"]) == 15 and payload["strategy"] == "unfiltered"
        else:
            assert payload["results"] and payload["strategy"] in ("overfetch", "subset")


@pytest.mark.parametrize("which", range(len(FILTERS)))
def test_similar_images_match_python(served, client, which):
    tag_filter = FILTERS[which]
    for path in (served.photos[3], served.photos[60]):
        image_id = served.ids_by_path[str(path)]
        response = client.get(f"/images/{image_id}/similar", params=_params(tag_filter, k=20))
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        expected = search_similar(served.library, image_id, 20, tag_filter)
        assert [r["id"] for r in results] == [r.id for r in expected.results]
        assert image_id not in [r["id"] for r in results]
        _assert_results_carry_tags(served, results)
        _assert_filter_holds(results, tag_filter)


def test_both_strategies_are_served(served, client):
    data = served.photos[0].read_bytes()
    wide = client.post("/search", params=_params(TagFilter(none_of=("clothes:hat",)), k=5), files={"file": data})
    narrow = client.post("/search", params=_params(TagFilter(("clothes:hat",)), k=5), files={"file": data})
    assert wide.json()["strategy"] == "overfetch" and narrow.json()["strategy"] == "subset"
    assert len(wide.json()["results"]) == 5 and len(narrow.json()["results"]) == 5


def test_bad_filter_parameters_are_refused(served, client):
    image_id = served.ids_by_path[str(served.photos[0])]
    for params in ([("min_score", "1.5")], [("min_score", "-0.1")], [("min_score", "high")]):
        response = client.get(f"/images/{image_id}/similar", params=params)
        assert response.status_code == 422, response.text
    too_many = [("tag", f"t{i}") for i in range(51)]
    assert client.get(f"/images/{image_id}/similar", params=too_many).status_code == 422


def test_tag_counts(served, client):
    response = client.get("/tags")
    assert response.status_code == 200
    counts = response.json()
    expected: dict[str, Counter] = {}
    for tags in served.tags.values():
        for head, label, _ in tags:
            expected.setdefault(head, Counter())[label] += 1
    assert counts == {head: dict(c) for head, c in expected.items()}
    assert set(counts) == {"clothes", "footwear", "imagenet"}
    assert sum(counts["clothes"].values()) == 81 and sum(counts["footwear"].values()) == 81  # one tag each
    assert set(counts["clothes"]) <= set(CLASSES) and set(counts["footwear"]) == {"shoes", "other"}
    assert counts["footwear"]["shoes"] >= 8


def test_heads_routes(served, client):
    response = client.get("/heads")
    assert response.status_code == 200
    heads = {h["name"]: h for h in response.json()}
    assert set(heads) == {"clothes", "footwear", "imagenet"}
    trained = {"builtin": False, "trained": True, "version": 1, "examples": 0}  # from label files: no stored examples
    assert heads["clothes"] == {"name": "clothes", "type": "multiclass", "labels": CLASSES, **trained}
    assert heads["footwear"] == {"name": "footwear", "type": "binary", "labels": ["other", "shoes"], **trained}
    assert heads["imagenet"]["builtin"] and len(heads["imagenet"]["labels"]) == 1000

    clothes = client.get("/heads/clothes").json()
    assert clothes["type"] == "multiclass" and clothes["labels"] == CLASSES
    report = clothes["metrics"]
    assert report["metrics"]["accuracy"] > 0.3 and report["examples"] == 80
    assert report["initial_loss"] == pytest.approx(report["expected_initial_loss"], abs=0.02)
    assert Path(clothes["report_dir"], "report.json").is_file()
    footwear = client.get("/heads/footwear").json()
    assert len(footwear["thresholds"]) == 1 and footwear["thresholds"][0] == report_threshold(footwear)
    assert footwear["metrics"]["metrics"]["positive"] == "shoes"
    imagenet = client.get("/heads/imagenet").json()
    assert imagenet["builtin"] and "ImageNet" in imagenet["metrics"]["source"]

    missing = client.get("/heads/no-such-head")
    assert missing.status_code == 404 and missing.json() == {"detail": "no head named 'no-such-head'"}


def report_threshold(head: dict) -> float:
    return head["metrics"]["metrics"]["threshold"]


def test_export_carries_tags(served, tmp_path):
    runner = CliRunner()
    out = tmp_path / "export.parquet"
    args = ["export", str(out), "--home", str(served.settings.home)]
    result = runner.invoke(cli.app, args, catch_exceptions=False, env=databases.cli_env(args))
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert "tags" in table.column_names and table.num_rows == 81
    tag_type = table.schema.field("tags").type
    assert pa.types.is_list(tag_type) and pa.types.is_struct(tag_type.value_type)
    assert [tag_type.value_type.field(i).name for i in range(3)] == ["head", "label", "score"]
    for image_id, tags in zip(table.column("id").to_pylist(), table.column("tags").to_pylist()):
        got = sorted((t["head"], t["label"], t["score"]) for t in tags)
        want = served.tags[image_id]
        assert [(h, lab) for h, lab, _ in got] == [(h, lab) for h, lab, _ in want]
        assert np.allclose([s for *_, s in got], [s for *_, s in want], atol=1e-6)  # stored as float32

    npz = tmp_path / "export.npz"
    args = ["export", str(npz), "--home", str(served.settings.home)]
    result = runner.invoke(cli.app, args, catch_exceptions=False, env=databases.cli_env(args))
    assert result.exit_code == 0, result.output
    with np.load(npz) as data:
        for image_id, tags in zip(data["id"].tolist(), data["tags"].tolist()):
            assert sorted((t["head"], t["label"], t["score"]) for t in json.loads(tags)) == served.tags[image_id]


def test_embedded_vectors_back_the_tags(served):
    """The tags served are what the stored heads compute from the stored vectors (no drift)."""
    from indexer.heads.storage import load_heads, predict

    with served.library.sessions() as session:
        backbone = store.backbone_in_use(session)
        heads = load_heads(session, backbone.id)
        for ids, vectors, norms in store.iter_vectors(session, backbone.id, norms=True):
            for stored in heads:
                for image_id, tags in zip(ids.tolist(), predict(stored, vectors, norms)):
                    mine = sorted((lab, s) for h, lab, s in served.tags[image_id] if h == stored.head.name)
                    assert [lab for lab, _ in mine] == sorted(lab for lab, _ in tags)
