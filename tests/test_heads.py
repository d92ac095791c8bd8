"""Classification heads on real photos: training, metrics, reports, thresholds, tags, errors.

The 80 shipped CC0 clothing photos (10 classes x 8) and one CC0 cat photo are indexed once per
module with the real ONNX model; every test works on its own copy of that home folder, trains
through the real `lookalike heads ...` commands (in-process) and checks the stored heads and
tags against what the stored weights compute from the stored embeddings.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from sklearn.model_selection import train_test_split
from sqlalchemy import delete, func, select
from typer.testing import CliRunner

import cli
import databases
from conftest import SAMPLES
from indexer import store
from indexer.backbones import imagenet_labels
from indexer.errors import BackboneMismatch
from indexer.heads.model import BINARY, Head
from indexer.heads.storage import StoredHead, load_heads, predict, save_head
from indexer.library import Library
from indexer.models import BackboneRow, HeadRow, ImageRow, TagRow
from indexer.pipeline import index_folders

CAT = Path(__file__).resolve().parent / "data" / "cat" / "chelsea.png"
CLASSES = sorted(p.name for p in SAMPLES.iterdir() if p.is_dir())
CAT_CLASSES = {"tabby", "tiger cat", "persian cat", "siamese cat", "egyptian cat"}
SANITY = re.compile(r"initial loss (\d+\.\d+), expected (\d+\.\d+) \(([^)]*)\)")

pytestmark = pytest.mark.storage

runner = CliRunner()


# -- fixtures and helpers ----------------------------------------------------------------------------


@dataclass
class Corpus:
    root: Path  # images/<class>/*.jpg, labels.csv (the shipped one), cat/chelsea.png
    template: Path  # a home folder with all 81 photos indexed (never written to by tests)
    model_cache: Path

    @property
    def photos(self) -> list[Path]:
        return sorted((self.root / "images").rglob("*.jpg"))

    @property
    def cat(self) -> Path:
        return self.root / "cat" / "chelsea.png"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, model_cache) -> Corpus:
    root = tmp_path_factory.mktemp("heads-corpus")
    shutil.copytree(SAMPLES, root / "images")
    shutil.copy2(SAMPLES.parent / "labels.csv", root / "labels.csv")  # paths relative to the CSV
    (root / "cat").mkdir()
    shutil.copy2(CAT, root / "cat" / "chelsea.png")
    library = Library(databases.home_settings(root / "template", model_cache=model_cache))
    report = index_folders(library, [str(root / "images"), str(root / "cat")])
    library.close()
    assert report.added == 81 and not report.failed
    return Corpus(root, root / "template", model_cache)


@pytest.fixture
def home(corpus, tmp_path) -> Path:
    """A private copy of the indexed home folder (the same path LOOKALIKE_HOME points at)."""
    return databases.copy_home(corpus.template, tmp_path / "home")


def invoke(*args: str):
    return runner.invoke(cli.app, [str(a) for a in args], catch_exceptions=False)


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def fails(*args: str) -> str:
    """Run a command that must fail cleanly; return its error output."""
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return result.stderr


def sanity(stderr: str) -> tuple[float, float, str]:
    match = SANITY.search(stderr)
    assert match, stderr
    return float(match[1]), float(match[2]), match[3]


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "path,labels") -> Path:
    with open(path, "w", newline="") as fh:
        fh.write(header + "\n")
        csv.writer(fh).writerows(rows)
    return path


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 200, (path, img.size)
        low, high = img.convert("L").getextrema()
        assert high - low > 100, f"{path} is blank"


@dataclass
class Snapshot:
    """Everything stored about the indexed images, read straight from the database."""

    ids: np.ndarray
    vectors: np.ndarray
    norms: np.ndarray
    paths: dict[int, str]
    tags: dict[int, dict[str, list[tuple[str, float]]]]  # image id -> head -> [(label, score)]
    heads: dict[str, StoredHead]

    def row(self, image_id: int) -> int:
        return int(np.flatnonzero(self.ids == image_id)[0])

    def id_of(self, path: Path) -> int:
        return next(i for i, p in self.paths.items() if p == str(path))

    def expected_tags(self, name: str) -> dict[int, list[tuple[str, float]]]:
        """What the stored head computes for every stored vector."""
        stored = self.heads[name]
        return dict(zip(self.ids.tolist(), predict(stored, self.vectors, self.norms)))


def snapshot(home: Path, model_cache: Path) -> Snapshot:
    library = Library(databases.home_settings(home, model_cache=model_cache))
    try:
        with library.sessions() as session:
            backbone = store.backbone_in_use(session)
            parts = list(store.iter_vectors(session, backbone.id, norms=True))
            ids = np.concatenate([p[0] for p in parts])
            vectors = np.concatenate([p[1] for p in parts])
            norms = np.concatenate([p[2] for p in parts])
            paths = dict(session.execute(select(ImageRow.id, ImageRow.path)).all())
            tags: dict[int, dict[str, list[tuple[str, float]]]] = {int(i): {} for i in ids}
            rows = session.execute(
                select(TagRow.image_id, HeadRow.name, TagRow.label, TagRow.score).join(
                    HeadRow, HeadRow.id == TagRow.head_id
                )
            )
            for image_id, head, label, score in rows:
                tags.setdefault(image_id, {}).setdefault(head, []).append((label, score))
            heads = {h.head.name: h for h in load_heads(session, backbone.id)}
    finally:
        library.close()
    return Snapshot(ids, vectors, norms, paths, tags, heads)


def assert_tags_follow_head(snap: Snapshot, name: str) -> None:
    """Every image's stored tags from head `name` are exactly what its stored weights decide."""
    expected = snap.expected_tags(name)
    for image_id, want in expected.items():
        got = sorted(snap.tags[image_id].get(name, []))
        assert [label for label, _ in got] == sorted(label for label, _ in want), (image_id, got, want)
        for (_, score), (_, want_score) in zip(got, sorted(want)):
            assert score == pytest.approx(want_score, abs=1e-5)


def class_rows(corpus: Corpus, classes: set[str] | None = None, label=lambda c: c) -> list[tuple[str, str]]:
    """(absolute path, label) of the indexed photos of `classes` (all when None)."""
    return [(str(p), label(p.parent.name)) for p in corpus.photos if classes is None or p.parent.name in classes]


# -- multi-class -----------------------------------------------------------------------------------


def test_multiclass_on_all_ten_classes(home, corpus):
    labels_csv = corpus.root / "labels.csv"  # the shipped file: header path,labels, relative paths
    result = ok("heads", "train", "clothes", "--type", "multiclass", "--labels", labels_csv, "--folds", "5",
                "--json", "--home", home)  # fmt: skip
    report = json.loads(result.stdout)
    assert "80 labelled images (80 from stored embeddings, 0 embedded now), 10 labels" in result.stderr

    # The "know nothing" check: a near-zero head starts at ln 10.
    initial, expected, formula = sanity(result.stderr)
    assert formula == "ln 10" and expected == pytest.approx(math.log(10), abs=1e-4)
    assert abs(initial - expected) < 0.02
    assert report["initial_loss"] == pytest.approx(initial, abs=1e-4)

    # 5-fold cross-validation: every photo is a validation photo once. Measured 0.71-0.78 over
    # seeds 0-3 against a chance level of 0.1; 0.5 is five times chance.
    metrics = report["metrics"]
    assert metrics["split"] == "5-fold cross-validation" and metrics["n"] == 80
    assert metrics["chance_accuracy"] == pytest.approx(0.1)
    assert metrics["accuracy"] >= 0.5 and metrics["balanced_accuracy"] >= 0.5
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 80 and (matrix.sum(axis=1) == 8).all()
    assert np.trace(matrix) / 80 == pytest.approx(metrics["accuracy"])
    assert report["labels"] == CLASSES and report["dropped_labels"] == [] and report["type"] == "multiclass"

    # Report and plots on disk.
    report_dir = home / "heads" / "clothes"
    assert json.loads((report_dir / "report.json").read_text()) == report
    assert sorted(report["plots"]) == ["confusion_matrix.png", "loss.png"]
    for name in report["plots"]:
        assert_png(report_dir / "plots" / report["plot_set"] / name)

    # Stored: list and show.
    listing = ok("heads", "list", "--home", home).stdout
    assert re.search(r"^clothes\s+multiclass\s+10 labels$", listing, re.M), listing
    assert re.search(r"^imagenet\s+multiclass\s+1000 labels \(built in\)$", listing, re.M), listing
    shown = json.loads(ok("heads", "show", "clothes", "--home", home).stdout)
    assert shown["labels"] == CLASSES and shown["type"] == "multiclass" and not shown["builtin"]
    assert shown["metrics"]["metrics"]["accuracy"] == metrics["accuracy"]
    assert shown["report_dir"] == str(report_dir)

    # Tagged at train time: every indexed image (the cat too) gets exactly its top label.
    snap = snapshot(home, corpus.model_cache)
    head = snap.heads["clothes"].head
    probs = head.probabilities(snap.vectors)
    for row, image_id in enumerate(snap.ids.tolist()):
        (tag,) = snap.tags[image_id]["clothes"]
        assert tag[0] == CLASSES[int(probs[row].argmax())]
        assert tag[1] == pytest.approx(float(probs[row].max()), abs=1e-5)
    # The final head was fitted on all 80 photos: on them it is nearly always right.
    right = sum(snap.tags[snap.id_of(p)]["clothes"][0][0] == p.parent.name for p in corpus.photos)
    assert right >= 72, right

    # Evaluation of the stored head on a label file uses the same decision.
    evaluated = json.loads(ok("heads", "eval", "clothes", "--labels", labels_csv, "--json", "--home", home).stdout)
    assert evaluated["n"] == 80 and evaluated["accuracy"] == pytest.approx(right / 80)


def test_a_label_too_rare_is_dropped_with_a_warning(home, corpus, tmp_path):
    # Three classes, one of which has only 3 photos: below the default --min-examples 5.
    rows = class_rows(corpus, {"shoes", "hat"}) + class_rows(corpus, {"dress"})[:3]
    labels_csv = write_csv(tmp_path / "rare.csv", rows)
    result = ok("heads", "train", "kinds", "--type", "multiclass", "--labels", labels_csv, "--json", "--home", home)
    assert "warning: label 'dress' has only 3 example(s) (fewer than 5); dropped" in result.stderr
    report = json.loads(result.stdout)
    assert report["labels"] == ["hat", "shoes"] and report["dropped_labels"] == ["dress"]
    assert report["examples"] == 16
    initial, expected, formula = sanity(result.stderr)
    assert formula == "ln 2" and abs(initial - expected) < 0.02


# -- binary ------------------------------------------------------------------------------------------


def _binary_folder(corpus: Corpus, tmp_path: Path) -> Path:
    """bin/shoes and bin/t-shirt: copies of the 16 photos at paths the index does not know."""
    folder = tmp_path / "bin"
    for path in corpus.photos:
        if path.parent.name in ("shoes", "t-shirt"):
            (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, folder / path.parent.name / path.name)
    return folder


def test_binary_from_two_folders(home, corpus, tmp_path):
    folder = _binary_folder(corpus, tmp_path)
    result = ok("heads", "train", "footwear", "--type", "binary", "--from-folders", folder, "--positive", "shoes",
                "--folds", "4", "--json", "--home", home)  # fmt: skip
    # Not indexed under these paths: decoded and embedded now, like the index would.
    assert "16 labelled images (0 from stored embeddings, 16 embedded now), 2 labels" in result.stderr
    report = json.loads(result.stdout)
    initial, expected, formula = sanity(result.stderr)
    assert formula == "ln 2 per label" and expected == pytest.approx(math.log(2), abs=1e-4)
    assert abs(initial - expected) < 0.02

    # Shoes and t-shirts are easy: measured 1.0 on all 16 (4-fold) for seeds 0-3; chance is 0.5.
    metrics = report["metrics"]
    assert report["labels"] == ["t-shirt", "shoes"] and metrics["positive"] == "shoes"
    assert metrics["n"] == 16 and metrics["chance_accuracy"] == pytest.approx(0.5)
    assert metrics["accuracy"] >= 0.85 and metrics["roc_auc"] >= 0.9
    report_dir = home / "heads" / "footwear"
    assert sorted(report["plots"]) == ["confusion_matrix.png", "loss.png", "precision_recall.png"]
    for name in report["plots"]:
        assert_png(report_dir / "plots" / report["plot_set"] / name)

    # The threshold is stored and is the one applied: shoes exactly when p(shoes) >= threshold.
    snap = snapshot(home, corpus.model_cache)
    stored = snap.heads["footwear"].head
    assert stored.kind == BINARY and stored.labels == ["t-shirt", "shoes"]
    (threshold,) = stored.thresholds
    assert threshold == pytest.approx(metrics["threshold"]) and report["thresholds"] == [threshold]
    shown = json.loads(ok("heads", "show", "footwear", "--home", home).stdout)
    assert shown["thresholds"] == [threshold]
    p_shoes = stored.probabilities(snap.vectors)[:, 0]
    for p, image_id in zip(p_shoes, snap.ids.tolist()):
        (tag,) = snap.tags[image_id]["footwear"]  # one tag per image, never zero or two
        if p >= threshold:
            assert tag == ("shoes", pytest.approx(float(p), abs=1e-5))
        else:
            assert tag == ("t-shirt", pytest.approx(float(1 - p), abs=1e-5))
    # Both labels occur, and the indexed originals of the training photos are tagged right.
    for path in corpus.photos:
        if path.parent.name in ("shoes", "t-shirt"):
            assert snap.tags[snap.id_of(path)]["footwear"][0][0] == path.parent.name, path

    # --positive names the positive class, so "has shoes" and "not a t-shirt" are the same filter.
    def search_ids(*filters: str) -> list[int]:
        out = ok("search", str(corpus.photos[0]), "-k", "100", "--json", *filters, "--home", home).stdout
        return [r["id"] for r in json.loads(out)["results"]]

    with_shoes = search_ids("--tag", "footwear:shoes")
    assert sorted(with_shoes) == sorted(i for i in snap.ids.tolist() if snap.tags[i]["footwear"][0][0] == "shoes")
    assert search_ids("--not-tag", "footwear:t-shirt") == with_shoes
    assert search_ids("--tag", "shoes") == with_shoes  # a bare label: no other head has "shoes"
    assert set(search_ids("--tag", "t-shirt")).isdisjoint(with_shoes)


def test_binary_from_one_folder_and_negatives(home, corpus, tmp_path):
    folder = _binary_folder(corpus, tmp_path)
    # The folder given to --from-folders holds the positives, whatever the names' order.
    result = ok("heads", "train", "shirts", "--type", "binary", "--from-folders", folder / "t-shirt",
                "--negatives", folder / "shoes", "--json", "--home", home)  # fmt: skip
    report = json.loads(result.stdout)
    assert report["labels"] == ["shoes", "t-shirt"] and report["metrics"]["positive"] == "t-shirt"
    result = ok("heads", "train", "footwear", "--type", "binary", "--from-folders", folder / "shoes",
                "--negatives", folder / "t-shirt", "--json", "--home", home)  # fmt: skip
    report = json.loads(result.stdout)
    assert report["labels"] == ["t-shirt", "shoes"] and report["metrics"]["positive"] == "shoes"
    initial, expected, _ = sanity(result.stderr)
    assert abs(initial - expected) < 0.02
    assert report["metrics"]["accuracy"] >= 0.75  # 4 validation photos; measured 1.0

    snap = snapshot(home, corpus.model_cache)
    for path in corpus.photos:
        if path.parent.name in ("shoes", "t-shirt"):
            assert snap.tags[snap.id_of(path)]["footwear"][0][0] == path.parent.name
            want = "t-shirt" if path.parent.name == "t-shirt" else "shoes"
            assert snap.tags[snap.id_of(path)]["shirts"][0][0] == want
    assert_tags_follow_head(snap, "footwear")
    assert_tags_follow_head(snap, "shirts")


def test_min_precision_threshold_reaches_the_target_on_validation(home, corpus, tmp_path):
    # Outerwear against everything else: 8 positives among 80, hard enough that the max-F1
    # threshold lets false positives through on some splits. --folds 1: one validation split.
    rows = class_rows(corpus, label=lambda c: "outwear" if c == "outwear" else "other")
    labels_csv = write_csv(tmp_path / "outwear.csv", rows)
    target = 0.9
    result = ok("heads", "train", "outer", "--type", "binary", "--labels", labels_csv, "--positive", "outwear",
                "--min-precision", str(target), "--folds", "1", "--json", "--home", home)  # fmt: skip
    report = json.loads(result.stdout)
    metrics = report["metrics"]
    assert metrics["precision"] >= target and metrics["recall"] > 0

    # Recompute it independently: the default split is scikit-learn's stratified 20% split with
    # the seed (0); the stored head (fitted on the other 80%) and stored threshold decide.
    snap = snapshot(home, corpus.model_cache)
    stored = snap.heads["outer"].head
    (threshold,) = stored.thresholds
    assert threshold == pytest.approx(metrics["threshold"])
    y = np.array([label == "outwear" for _, label in rows], dtype=int)
    _, val = train_test_split(np.arange(len(rows)), test_size=0.2, random_state=0, stratify=y)
    x_val = snap.vectors[[snap.row(snap.id_of(Path(rows[i][0]))) for i in val]]
    predicted = stored.probabilities(x_val)[:, 0] >= threshold
    assert predicted.sum() > 0
    precision = y[val][predicted].mean()
    assert precision >= target
    assert precision == pytest.approx(metrics["precision"])
    assert y[val][predicted].sum() / y[val].sum() == pytest.approx(metrics["recall"])

    # The stored images' tags follow that threshold.
    assert_tags_follow_head(snap, "outer")


def test_unreachable_min_precision_warns(home, corpus, tmp_path):
    # Long sleeves against the rest: on the seed-0 split the top-scored validation photos include
    # a negative, so no threshold reaches precision 0.9 (measured: the best is 2/3, at recall 1).
    rows = class_rows(corpus, label=lambda c: "longsleeve" if c == "longsleeve" else "other")
    labels_csv = write_csv(tmp_path / "longsleeve.csv", rows)
    result = ok("heads", "train", "sleeves", "--type", "binary", "--labels", labels_csv, "--positive", "longsleeve",
                "--min-precision", "0.9", "--folds", "1", "--json", "--home", home)  # fmt: skip
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["precision"] < 0.9, "this split now reaches the target: pick a harder case"
    assert (
        "warning: label 'longsleeve': no threshold reaches precision 0.90 on the validation images; "
        f"using the most precise one ({metrics['precision']:.2f})"
    ) in result.stderr
    # The fallback is the most precise threshold, not the highest one (whose single top-scored
    # photo is a false positive here: precision 0, every tag wrong).
    assert metrics["precision"] > 0.5 and metrics["recall"] > 0


# -- multi-label -------------------------------------------------------------------------------------


def _composites(corpus: Corpus, folder: Path, count: int, seed: int = 0) -> list[tuple[Path, list[str]]]:
    """Two photos of different classes side by side on a square white canvas (the model's centre
    crop keeps most of both); labels: both classes."""
    rng = random.Random(seed)
    by_class = {c: [p for p in corpus.photos if p.parent.name == c] for c in CLASSES}
    folder.mkdir(parents=True)
    size = 448
    out = []
    for i in range(count):
        a, b = rng.sample(CLASSES, 2)
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        for j, path in enumerate((rng.choice(by_class[a]), rng.choice(by_class[b]))):
            with Image.open(path) as img:
                img = img.convert("RGB")
                img.thumbnail((size // 2, size))
                canvas.paste(img, (j * size // 2 + (size // 2 - img.width) // 2, (size - img.height) // 2))
        dest = folder / f"pair{i:03d}.jpg"
        canvas.save(dest, quality=90)
        out.append((dest, sorted({a, b})))
    return out


def test_multilabel_on_pairs_of_photos(home, corpus, tmp_path):
    pairs = _composites(corpus, tmp_path / "pairs", 60)
    rows = [(str(path), "|".join(labels)) for path, labels in pairs]
    # The cat: one image with no label at all (allowed in a multi-label file), one with a label
    # too rare to learn, which is dropped and leaves that image with none.
    mirrored = tmp_path / "pairs" / "cat-mirrored.png"
    with Image.open(corpus.cat) as img:
        ImageOps.mirror(img).save(mirrored)
    rows += [(str(mirrored), ""), (str(corpus.cat), "cat")]
    labels_csv = write_csv(tmp_path / "pairs.csv", rows)

    result = ok("heads", "train", "outfit", "--type", "multilabel", "--labels", labels_csv, "--json", "--home", home)
    report = json.loads(result.stdout)
    assert "warning: label 'cat' has only 1 example(s) (fewer than 5); dropped" in result.stderr
    assert "62 labelled images (1 from stored embeddings, 61 embedded now), 10 labels" in result.stderr
    assert report["labels"] == CLASSES and report["dropped_labels"] == ["cat"]
    initial, expected, formula = sanity(result.stderr)
    assert formula == "ln 2 per label" and abs(initial - expected) < 0.02

    # Measured mAP 0.68-0.76 (seeds 0-2) where the labels' frequency, the AP of a random ranking,
    # is about 0.2: demand at least twice the chance level and 0.45.
    metrics = report["metrics"]
    assert 0.1 < metrics["chance_map"] < 0.3
    assert metrics["map"] >= max(0.45, 2 * metrics["chance_map"])
    assert metrics["micro_f1"] > 0.4
    report_dir = home / "heads" / "outfit"
    assert sorted(report["plots"]) == ["loss.png", "precision_recall.png"]
    for name in report["plots"]:
        assert_png(report_dir / "plots" / report["plot_set"] / name)

    # One threshold per label, stored and applied: a label exactly when p >= its threshold.
    snap = snapshot(home, corpus.model_cache)
    stored = snap.heads["outfit"].head
    assert len(stored.thresholds) == 10 and stored.thresholds == pytest.approx(report["thresholds"])
    probs = stored.probabilities(snap.vectors)
    for row, image_id in enumerate(snap.ids.tolist()):
        got = {label for label, _ in snap.tags[image_id].get("outfit", [])}
        assert got == {CLASSES[j] for j in range(10) if probs[row, j] >= stored.thresholds[j]}
    assert_tags_follow_head(snap, "outfit")

    # Evaluating the stored head on the same file keeps the empty rows (they mean "none").
    evaluated = json.loads(ok("heads", "eval", "outfit", "--labels", write_csv(tmp_path / "eval.csv", rows[:-1]),
                              "--json", "--home", home).stdout)  # fmt: skip
    assert evaluated["n"] == 61 and evaluated["map"] > metrics["chance_map"]


# -- tags at index time, re-tagging, deleting --------------------------------------------------------


def test_new_images_are_tagged_when_indexed(home, corpus, tmp_path):
    ok("heads", "train", "clothes", "--type", "multiclass", "--labels", corpus.root / "labels.csv", "--home", home)
    footwear = write_csv(tmp_path / "footwear.csv", class_rows(corpus, {"shoes", "t-shirt"}))
    ok("heads", "train", "footwear", "--type", "binary", "--labels", footwear, "--positive", "shoes", "--home", home)

    # New photos: mirror images of two photos per class (new bytes, so they are embedded).
    new = tmp_path / "new"
    for path in corpus.photos[::4]:
        dest = new / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            ImageOps.mirror(img).save(dest, quality=92)
    result = ok("index", new, "-q", "--home", home)
    assert "added 20," in result.stderr

    snap = snapshot(home, corpus.model_cache)
    new_ids = [snap.id_of(p) for p in sorted(new.rglob("*.jpg"))]
    assert len(snap.ids) == 101
    for name in ("clothes", "footwear", "imagenet"):
        assert_tags_follow_head(snap, name)
        assert all(name in snap.tags[i] for i in new_ids)
    for image_id in new_ids:
        assert len(snap.tags[image_id]["clothes"]) == 1 and len(snap.tags[image_id]["footwear"]) == 1
    # And the tags make sense: a mirrored photo mostly keeps its class.
    right = sum(snap.tags[snap.id_of(p)]["clothes"][0][0] == p.parent.name for p in sorted(new.rglob("*.jpg")))
    assert right >= 14, right
    shoes = [snap.id_of(p) for p in sorted((new / "shoes").glob("*.jpg"))]
    assert all(snap.tags[i]["footwear"][0][0] == "shoes" for i in shoes)


def test_retag_and_delete(home, corpus, tmp_path):
    footwear = write_csv(tmp_path / "footwear.csv", class_rows(corpus, {"shoes", "t-shirt"}))
    result = ok("heads", "train", "footwear", "--type", "binary", "--labels", footwear, "--positive", "shoes",
                "--home", home)  # fmt: skip
    assert "tagged 81 images with head 'footwear'" in result.stderr
    before = snapshot(home, corpus.model_cache)
    imagenet_before = {i: t["imagenet"] for i, t in before.tags.items()}

    # Lose the head's tags, then `lookalike tag --head` writes them again, and only them.
    library = Library(databases.home_settings(home, model_cache=corpus.model_cache))
    with library.sessions.begin() as session:
        head_id = session.scalar(select(HeadRow.id).where(HeadRow.name == "footwear"))
        session.execute(delete(TagRow).where(TagRow.head_id == head_id))
    library.close()
    assert all("footwear" not in t for t in snapshot(home, corpus.model_cache).tags.values())
    result = ok("tag", "--head", "footwear", "--home", home)
    assert "wrote 81 tags" in result.stderr
    after = snapshot(home, corpus.model_cache)
    assert after.tags == before.tags
    assert_tags_follow_head(after, "footwear")

    # All heads: one tag per image from each of the two, the cat's top-1 plus what passes 0.2.
    result = ok("tag", "--home", home)
    assert snapshot(home, corpus.model_cache).tags == before.tags

    # Deleting a head deletes its tags; the other heads keep theirs.
    result = ok("heads", "delete", "footwear", "--home", home)
    assert "deleted head 'footwear'" in result.stderr
    gone = snapshot(home, corpus.model_cache)
    assert "footwear" not in gone.heads
    assert all("footwear" not in t for t in gone.tags.values())
    assert {i: t["imagenet"] for i, t in gone.tags.items()} == imagenet_before
    library = Library(databases.home_settings(home, model_cache=corpus.model_cache))
    with library.sessions() as session:
        assert session.scalar(select(func.count()).select_from(TagRow).where(TagRow.head_id == head_id)) == 0
    library.close()
    assert "no head named 'footwear'" in fails("heads", "show", "footwear", "--home", home)
    assert "no head named 'footwear'" in fails("tag", "--head", "footwear", "--home", home)
    assert "no head named 'footwear'" in fails("heads", "delete", "footwear", "--home", home)
    out = ok("search", str(corpus.photos[0]), "--tag", "footwear:shoes", "--json", "--home", home).stdout
    assert json.loads(out)["results"] == []


# -- the built-in ImageNet head ----------------------------------------------------------------------


def test_imagenet_head_knows_the_cat(home, corpus):
    names = imagenet_labels()
    assert set(names[281:286]) == CAT_CLASSES
    snap = snapshot(home, corpus.model_cache)
    stored = snap.heads["imagenet"]
    assert stored.builtin and stored.scale_by_norm and len(stored.head.labels) == 1000
    cat_tags = snap.tags[snap.id_of(corpus.cat)]["imagenet"]
    top_label, _ = max(cat_tags, key=lambda t: t[1])
    assert top_label in CAT_CLASSES, cat_tags
    assert_tags_follow_head(snap, "imagenet")
    # Every image has its top-1 ImageNet class; none of the clothing photos is a cat.
    assert all(len(snap.tags[i]["imagenet"]) >= 1 for i in snap.ids.tolist())
    for path in corpus.photos:
        assert not {label for label, _ in snap.tags[snap.id_of(path)]["imagenet"]} & CAT_CLASSES
    shown = json.loads(ok("heads", "show", "imagenet", "--home", home).stdout)
    assert shown["builtin"] and "ImageNet" in shown["metrics"]["source"]


# -- bad label files ---------------------------------------------------------------------------------


def _bad_cases(corpus: Corpus, folder: Path) -> dict[str, tuple[list[str], str]]:
    shoes = class_rows(corpus, {"shoes"})
    hats = class_rows(corpus, {"hat"})
    dresses = class_rows(corpus, {"dress"})
    text_file = folder / "notes.jpg"
    text_file.write_text("this is not a picture\n")

    def labels(name, rows, header="path,labels"):
        return ["--labels", str(write_csv(folder / name, rows, header))]

    return {
        # name: (arguments after `heads train h`, expected message)
        "missing_path": (
            ["--type", "multiclass", *labels("missing.csv", shoes[:2] + [(str(folder / "gone.jpg"), "shoes")] + hats)],
            f"missing.csv:4: image not found: {folder / 'gone.jpg'}",
        ),
        "undecodable": (
            ["--type", "multiclass", *labels("text.csv", shoes + hats[:4] + [(str(text_file), "hat")] + hats[4:])],
            f"text.csv:14: cannot use {text_file}",
        ),
        "binary_class_too_small": (
            ["--type", "binary", *labels("few.csv", shoes + dresses[:1])],
            "few.csv:10: class 'dress' has only 1 example(s)",
        ),
        "multiclass_class_too_small": (
            ["--type", "multiclass", "--min-examples", "1", *labels("single.csv", shoes + dresses[:1] + hats)],
            "single.csv:10: class 'dress' has only 1 example(s)",
        ),
        "empty_multiclass_label": (
            ["--type", "multiclass", *labels("empty.csv", shoes + [(hats[0][0], "")] + hats[1:])],
            "empty.csv:10: empty label",
        ),
        "two_labels_multiclass": (
            ["--type", "multiclass", *labels("two.csv", shoes + [(hats[0][0], "hat|shoes")] + hats[1:])],
            "two.csv:10: 2 labels",
        ),
        "binary_three_classes": (
            ["--type", "binary", *labels("three.csv", shoes + hats + dresses)],
            "a binary head needs exactly two classes, found 3: dress (8), hat (8), shoes (8)",
        ),
        "wrong_header": (
            ["--type", "multiclass", *labels("header.csv", shoes + hats, header="file,class")],
            "header.csv:1: the header must be 'path,labels'",
        ),
        "negatives_for_multiclass": (
            [
                "--type",
                "multiclass",
                "--from-folders",
                str(corpus.root / "images" / "shoes"),
                "--negatives",
                str(corpus.root / "images" / "hat"),
            ],  # fmt: skip
            "--negatives is only for binary heads",
        ),
        "unknown_positive": (
            ["--type", "binary", "--positive", "boots", *labels("pos.csv", shoes + hats)],
            "--positive 'boots' is not one of the classes ['hat', 'shoes']",
        ),
        # SQLite would store it; PostgreSQL's text cannot hold NUL, so no database takes it.
        "nul_in_label": (
            ["--type", "multiclass", *labels("nul.csv", shoes + [(path, "h\x00at") for path, _ in hats])],
            "nul.csv:10: a NUL character in",
        ),
    }


BAD_CASES = [
    "missing_path",
    "undecodable",
    "binary_class_too_small",
    "multiclass_class_too_small",
    "empty_multiclass_label",
    "two_labels_multiclass",
    "binary_three_classes",
    "wrong_header",
    "negatives_for_multiclass",
    "unknown_positive",
    "nul_in_label",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_label_files_name_the_problem(home, corpus, tmp_path, case):
    args, message = _bad_cases(corpus, tmp_path)[case]
    stderr = fails("heads", "train", "h", *args, "--home", home)
    assert message in stderr, stderr
    # Nothing was stored, nothing tagged.
    snap = snapshot(home, corpus.model_cache)
    assert sorted(snap.heads) == ["imagenet"] and not (home / "heads" / "h").exists()


def test_empty_label_is_allowed_in_a_multilabel_file(home, corpus, tmp_path):
    # A multi-label row with no label is an image with none of the labels: it counts as a
    # negative for every label, so the validation set holds rows that are all zeros.
    rows = [(path, "shoes|footwear") for path, _ in class_rows(corpus, {"shoes"})]
    rows += [(path, "") for path, _ in class_rows(corpus, {"hat", "dress"})]
    labels_csv = write_csv(tmp_path / "ml.csv", rows)
    result = ok("heads", "train", "feet", "--type", "multilabel", "--labels", labels_csv, "--json", "--home", home)
    report = json.loads(result.stdout)
    assert report["labels"] == ["footwear", "shoes"] and report["examples"] == 24
    snap = snapshot(home, corpus.model_cache)
    assert_tags_follow_head(snap, "feet")
    # Empty rows are refused where a label is required.
    single = write_csv(tmp_path / "single.csv", [(p, "shoes" if labels else "") for p, labels in rows])
    stderr = fails("heads", "train", "h", "--type", "multiclass", "--labels", single, "--home", home)
    assert "single.csv:10: empty label" in stderr


# -- a head belongs to its backbone ------------------------------------------------------------------


def test_a_head_from_another_backbone_is_refused(home, corpus, tmp_path):
    # A head whose weights were made for another backbone's embeddings (EfficientNet-Lite2,
    # 1280-d as well, so the shapes alone would not catch it) sits in this database.
    library = Library(databases.home_settings(home, model_cache=corpus.model_cache))
    rng = np.random.default_rng(0)
    with library.sessions.begin() as session:
        current = store.backbone_in_use(session)
        other = BackboneRow(name="efficientnet-lite2", dim=1280)
        session.add(other)
        session.flush()
        foreign = Head("foreign", BINARY, ["no", "yes"], rng.normal(size=(1, 1280)).astype(np.float32),
                       np.zeros(1, np.float32), thresholds=[0.5])  # fmt: skip
        save_head(session, foreign, other.id, metrics={})
        current_id = current.id
    with library.sessions() as session:
        with pytest.raises(BackboneMismatch, match="efficientnet-lite2"):
            load_heads(session, current_id, ["foreign"])
        assert [h.head.name for h in load_heads(session, current_id, ["imagenet"])] == ["imagenet"]
    library.close()

    message = "head 'foreign' was trained on backbone 'efficientnet-lite2'; this index uses 'efficientnet-lite0'"
    assert message in fails("tag", "--head", "foreign", "--home", home)
    assert message in fails("tag", "--home", home)
    labels_csv = write_csv(tmp_path / "eval.csv", class_rows(corpus, {"shoes"}, label=lambda _: "yes"))
    assert message in fails("heads", "eval", "foreign", "--labels", labels_csv, "--home", home)
    # Nothing was tagged with it.
    snap_tags = snapshot_tags_of(home, corpus.model_cache, "foreign")
    assert snap_tags == 0


def snapshot_tags_of(home: Path, model_cache: Path, head: str) -> int:
    library = Library(databases.home_settings(home, model_cache=model_cache))
    with library.sessions() as session:
        count = session.scalar(
            select(func.count())
            .select_from(TagRow)
            .join(HeadRow, HeadRow.id == TagRow.head_id)
            .where(HeadRow.name == head)
        )
    library.close()
    return count
