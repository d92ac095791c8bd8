"""Teaching heads by examples: active learning against random picks, and the time to train and re-tag.

    python bench/teach.py                    # both parts: ~22 min on two cores (learning: ~14 min)
    python bench/teach.py --part learning    # active learning only (the shared photo sets)
    python bench/teach.py --part learning --tasks shirt kangaroo --seeds 0 1   # a quick subset
    python bench/teach.py --part timing --sizes 10000 100000

Active learning (targets: suggestions at least as good as random at every round, and at least 3
points better on average over rounds 2-6). Tasks built from ../shared/datasets: one-vs-rest binary
tasks and multi-class ones (the mean against the target is theirs), and a multi-label one (COCO's
five commonest objects; measured, not in that mean, held to the first target too). Each set is
split once per seed into a pool (70%) and a held-out test set (30%). A run starts from 2
labelled pool images per label, then adds rounds of 8 labels up to 64 labelled images, answered
from the ground truth (a simulated labeller):
- suggestions: the head trained on what is labelled so far (`train_head`, the code the server
  runs), then `indexer.heads.suggestions.suggest` picks the next 8 among the unlabelled pool;
- random: 8 unlabelled pool images drawn uniformly (the baseline), same start, same seeds.
Reported per round: held-out accuracy (binary: balanced accuracy of the stored decision, since
one-vs-rest tasks are imbalanced; multi-class: accuracy; multi-label: mean average precision over
the labels, as the head's report gives it: with ~5 held-out positives a label, a rank measure
moves less by chance than F1 at one threshold), mean and spread over seeds, and a plot.

Timing (target: from 1,000 examples, trained and 100k images re-tagged in <= 2 s): a fresh home
of N imported vectors (bench/ann_options.py's variants of the dataset photos' real embeddings,
`lookalike import`), 1,000 of them stored as examples of a binary and of a 10-class head (labels
of the photos they vary), then `train_from_examples` (what POST /heads/{name}/train runs) twice:
the first in a fresh process pays for importing the trainer's libraries, the second is the figure.
Baseline measured in the same run: re-tagging the same head with `tag_all`, what `lookalike tag`
and, before this, `heads train` ran (chunks of 2,000 images, each its own transaction that first
deletes those images' tags).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from ann_options import variant_maker
from benchlib import (
    LOOKALIKE,
    MODEL_CACHE,
    dataset_embeddings,
    load_line,
    lookalike_env,
    machine_load,
    pyplot,
    read_labels,
    remove,
    scratch_dir,
    write_json,
)
from million import write_shards
from sklearn.metrics import accuracy_score, average_precision_score, balanced_accuracy_score

from indexer.heads.model import BINARY, MULTICLASS, MULTILABEL
from indexer.heads.suggestions import Labelled, suggest
from indexer.heads.training import TrainOptions, train_head

# 40 seeds: with 5, the spread over seeds (7-10 points on shirt) hid what a variant was worth (the
# method chosen on seeds 0-4 gained +2.4 points there and +0.1 on seeds 5-9), and the binary
# batch chosen on seeds 0-19 (shirt +4.7 there) gained +2.9 on seeds 20-39, as BADGE did.
SEEDS = tuple(range(40))
# The multi-label set is small (198 photos, ~60 held out): over 40 seeds, two draws of the start
# examples moved its first round's gain from +1.4 to -2.7 points; over 160, strategies that
# differed by 2 points on 40 seeds came within 0.1 of each other.
SMALL_SET_SEEDS = tuple(range(160))
SMALL_SET = 400  # images
START_PER_LABEL = 2
ROUND = 8
LAST = 64
TARGET_POINTS = 3.0
TIMING_TARGET_S = 2.0
TIMING_EXAMPLES = 1000

# (name, dataset, type, positive labels for a one-vs-rest binary task, the labels of a multi-label one)
TASKS = [
    ("leopards vs rest", "caltech101-10class", BINARY, {"leopards"}),
    ("kangaroo vs rest", "caltech101-10class", BINARY, {"kangaroo"}),
    ("shirt vs rest", "clothing10", BINARY, {"shirt"}),
    ("airplane vs motorbike", "caltech101-airplane-motorbike", BINARY, {"airplane"}),
    ("caltech 10 classes", "caltech101-10class", MULTICLASS, None),
    ("clothing 10 classes", "clothing10", MULTICLASS, None),
    # 198 photos: the labels with 15 or more (person 109, dining table 19, car 18, cup 17, chair 15).
    ("coco 5 objects", "coco128-multilabel", MULTILABEL, {"person", "dining table", "car", "cup", "chair"}),
]


# -- active learning -----------------------------------------------------------------------------


def task_data(dataset: str, kind: str, positives, path_to_row, vectors):
    rows = read_labels(dataset)
    x = vectors[[path_to_row[p] for p, _ in rows]].astype(np.float32)
    if kind == BINARY:
        names = ["rest", "+".join(sorted(positives))]
        y = np.array([int(labels[0] in positives) for _, labels in rows])
    elif kind == MULTILABEL:  # an image may carry none of them: a negative for every label
        names = sorted(positives)
        y = np.array([[int(name in labels) for name in names] for _, labels in rows])
    else:
        names = sorted({labels[0] for _, labels in rows})
        y = np.array([names.index(labels[0]) for _, labels in rows])
    return x, y, names


def split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    # Multi-label: stratified by the rarest label an image carries (each keeps ~70% in the pool).
    strata = y if y.ndim == 1 else np.where(y.any(axis=1), np.argmin(np.where(y, y.sum(axis=0), 1 << 30), axis=1), -1)
    return train_test_split(idx, test_size=0.3, random_state=seed, stratify=strata)


def held_out_score(kind, names, x, y, labelled, test, seed) -> tuple[float, object]:
    result = train_head("bench", kind, names, x[labelled], y[labelled], TrainOptions(seed=seed))
    if kind == MULTILABEL:
        probs = result.head.probabilities(x[test])
        per_label = [average_precision_score(y[test, j], probs[:, j]) for j in range(len(names))]
        return float(np.mean(per_label)), result.head
    decided = result.head.decide(result.head.probabilities(x[test]))
    predicted = np.array([names.index(tags[0][0]) if tags else -1 for tags in decided])
    if kind == BINARY:
        return float(balanced_accuracy_score(y[test], predicted)), result.head
    return float(accuracy_score(y[test], predicted)), result.head


def run_learning(kind, names, x, y, seed: int, strategy: str) -> list[float]:
    pool, test = split(y, seed)
    rng = np.random.default_rng(seed)
    labelled = []
    for label in range(len(names)):
        carries = y[pool] == label if y.ndim == 1 else y[pool, label] == 1
        members = pool[carries]
        members = members[~np.isin(members, labelled)]  # multi-label: an image counts once (pool order kept)
        labelled += rng.choice(members, START_PER_LABEL, replace=False).tolist()
    scores = []
    while True:
        score, head = held_out_score(kind, names, x, y, np.array(labelled), test, seed)
        scores.append(score)
        if len(labelled) >= LAST:
            return scores
        count = min(ROUND, LAST - len(labelled))
        unlabelled = np.setdiff1d(pool, labelled)
        if strategy == "random":
            picks = rng.choice(unlabelled, count, replace=False).tolist()
        else:
            known = Labelled(np.array(labelled), x[labelled], [label_names(names, y[i]) for i in labelled])
            chosen = suggest(head, known, unlabelled, x[unlabelled], count, seed=seed)
            picks = [s.image_id for s in chosen]
        labelled += picks


def label_names(names: list[str], row) -> list[str]:
    """An image's labels as a labeller gives them (a class index, or a multi-label 0/1 row)."""
    return [names[row]] if np.ndim(row) == 0 else [name for name, on in zip(names, row) if on]


def learning_part(task_words: list[str] | None = None, seeds=None) -> dict:
    """The tasks whose name contains one of `task_words` (all by default), over `seeds` (by
    default SEEDS, and SMALL_SET_SEEDS for a set of fewer than SMALL_SET images)."""
    path_to_row, vectors, _ = dataset_embeddings()
    out = {"tasks": {}, "seeds": list(seeds or SEEDS)}
    for name, dataset, kind, positives in TASKS:
        if task_words and not any(word in name for word in task_words):
            continue
        x, y, names = task_data(dataset, kind, positives, path_to_row, vectors)
        curves = {strategy: [] for strategy in ("suggestions", "random")}
        started = time.perf_counter()
        task_seeds = seeds or (SMALL_SET_SEEDS if len(y) < SMALL_SET else SEEDS)
        for seed in task_seeds:
            for strategy in curves:
                curves[strategy].append(run_learning(kind, names, x, y, seed, strategy))
        # What labelling the whole pool reaches: the most any choice of labels could gain.
        whole_pool = [held_out_score(kind, names, x, y, *split(y, seed), seed)[0] for seed in task_seeds]
        arrays = {s: np.array(c) for s, c in curves.items()}
        rounds = arrays["random"].shape[1]
        sizes = [START_PER_LABEL * len(names) + ROUND * r for r in range(rounds)]
        sizes = [min(s, LAST) for s in sizes]
        gain = arrays["suggestions"].mean(axis=0) - arrays["random"].mean(axis=0)
        # Paired by seed (same split, same start): the standard error of each round's mean gain.
        gain_se = (arrays["suggestions"] - arrays["random"]).std(axis=0, ddof=1) / np.sqrt(len(task_seeds))
        late = gain[2:7] if rounds > 2 else gain
        random_late = arrays["random"].mean(axis=0)[2:7] if rounds > 2 else arrays["random"].mean(axis=0)
        task = {
            "type": kind,
            "labels": len(names),
            "images": len(y),
            "seeds": len(task_seeds),
            "labelled_per_round": sizes,
            "suggestions_mean": arrays["suggestions"].mean(axis=0).round(4).tolist(),
            "suggestions_std": arrays["suggestions"].std(axis=0).round(4).tolist(),
            "random_mean": arrays["random"].mean(axis=0).round(4).tolist(),
            "random_std": arrays["random"].std(axis=0).round(4).tolist(),
            "gain_points": (100 * gain).round(2).tolist(),
            "gain_standard_error_points": (100 * gain_se).round(2).tolist(),
            "mean_gain_rounds_2_6_points": round(float(100 * late.mean()), 2),
            "whole_pool_mean": round(float(np.mean(whole_pool)), 4),
            "headroom_rounds_2_6_points": round(float(100 * (np.mean(whole_pool) - random_late.mean())), 2),
            "seconds": round(time.perf_counter() - started, 1),
        }
        out["tasks"][name] = task
        print(f"\n{name} ({kind}, {len(names)} labels, {len(y)} images, {len(task_seeds)} seeds; {task['seconds']} s)")
        print("  labelled     " + " ".join(f"{s:>6}" for s in sizes))
        print("  suggestions  " + " ".join(f"{v:6.3f}" for v in task["suggestions_mean"]))
        print("  random       " + " ".join(f"{v:6.3f}" for v in task["random_mean"]))
        print("  gain (pts)   " + " ".join(f"{v:6.1f}" for v in task["gain_points"]))
        print("  its s.e.     " + " ".join(f"{v:6.1f}" for v in task["gain_standard_error_points"]))
        print(
            f"  mean gain, rounds 2-6: {task['mean_gain_rounds_2_6_points']:+.1f} points; whole pool labelled: "
            f"{task['whole_pool_mean']:.3f}, {task['headroom_rounds_2_6_points']:.1f} points over random (headroom)"
        )
    # Rounds counted from 0 (the start): rounds 2-6 are the 2nd to 6th rounds of labels.
    never_worse = all(min(t["gain_points"][1:]) >= -0.5 for t in out["tasks"].values())
    targeted = [t for t in out["tasks"].values() if t["type"] != MULTILABEL]  # the tasks
    mean_gain = float(np.mean([t["mean_gain_rounds_2_6_points"] for t in targeted])) if targeted else float("nan")
    out["never_worse_than_random"] = never_worse
    out["mean_gain_rounds_2_6_points"] = round(mean_gain, 2)
    headroom = float(np.mean([t["headroom_rounds_2_6_points"] for t in targeted])) if targeted else float("nan")
    out["mean_headroom_rounds_2_6_points"] = round(headroom, 2)
    print(
        f"\nsuggestions never below random (by more than 0.5 pt) after the start: {never_worse}; "
        f"mean gain over rounds 2-6 (binary and multi-class tasks): {mean_gain:.1f} points "
        f"(target >= {TARGET_POINTS}); "
        f"headroom (whole pool labelled, over random): {headroom:.1f} points"
    )
    plot_learning(out)
    return out


def plot_learning(out: dict) -> None:
    plt = pyplot()
    tasks = out["tasks"]
    cols = 3
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, task) in zip(axes.flat, tasks.items()):
        sizes = task["labelled_per_round"]
        for strategy, colour in (("suggestions", "tab:blue"), ("random", "tab:grey")):
            mean, std = np.array(task[f"{strategy}_mean"]), np.array(task[f"{strategy}_std"])
            ax.plot(sizes, mean, marker="o", color=colour, label=strategy)
            ax.fill_between(sizes, mean - std, mean + std, color=colour, alpha=0.15)
        ax.set_title(f"{name} ({task.get('seeds', len(out['seeds']))} seeds)", fontsize=10)
        ax.set_xlabel("labelled images")
        ax.set_ylabel({BINARY: "balanced accuracy", MULTILABEL: "mean average precision"}.get(task["type"], "accuracy"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.suptitle("Active learning vs random picks (held-out, mean ± std over seeds)")
    fig.tight_layout()
    path = Path(__file__).resolve().parent / "out" / "teach_active_learning.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


# -- timing --------------------------------------------------------------------------------------


def timing_part(sizes: list[int]) -> dict:
    path_to_row, real, _ = dataset_embeddings()
    rows = read_labels("caltech101-10class")
    parent_rows = np.array([path_to_row[p] for p, _ in rows])
    parent_labels = [labels[0] for _, labels in rows]
    out = {}
    for n in sizes:
        out[str(n)] = timing_at(n, real.astype(np.float32), parent_rows, parent_labels)
    return out


def timing_at(n: int, real, parent_rows, parent_labels) -> dict:
    rng = np.random.default_rng(0)
    make, scale, _ = variant_maker(real, rng)
    # The first 1,000 vary the caltech photos (their labels are known); the rest vary any photo.
    parents = rng.integers(0, len(real), n)
    labelled_parent = rng.integers(0, len(parent_rows), TIMING_EXAMPLES)
    parents[:TIMING_EXAMPLES] = parent_rows[labelled_parent]
    x = np.concatenate([make(parents[s : s + 50_000], scale) for s in range(0, n, 50_000)])
    home = scratch_dir(f"teach-{n}")
    shards = write_shards(home / "shards", x, 0, "item")
    env = lookalike_env(LOOKALIKE_HOME=str(home / "home"))
    started = time.perf_counter()
    subprocess.run([str(LOOKALIKE), "import", *map(str, shards), "-q"], env=env, check=True, capture_output=True)
    imported = time.perf_counter() - started
    labels = [parent_labels[i] for i in labelled_parent]
    paths = [f"/catalogue/item/{i:08d}.jpg" for i in range(TIMING_EXAMPLES)]
    result = {"images": n, "examples": TIMING_EXAMPLES, "import_seconds": round(imported, 1)}
    for kind, head_labels in (
        (BINARY, [["leopards" if lbl == "leopards" else "other"] for lbl in labels]),
        (MULTICLASS, [[lbl] for lbl in labels]),
    ):
        positive = "leopards" if kind == BINARY else None
        result[kind] = time_training(home, env, kind, paths, head_labels, positive)
        baseline = result[kind]["baseline_tag_all"]
        print(
            f"{n:>8} images, {kind:<10}: train {result[kind]['train']:.2f} s + report {result[kind]['report']:.2f} s "
            f"+ tag {result[kind]['tag']:.2f} s = {result[kind]['total']:.2f} s "
            f"(first, cold: {result[kind]['cold_total']:.2f} s); "
            f"baseline re-tag by tag_all: {baseline:.2f} s  [target <= {TIMING_TARGET_S} s at 100k]"
        )
    remove(home)
    return result


TIMING_SCRIPT = r"""
import json, sys, time
from indexer.heads.examples import put_examples
from indexer.heads.tagging import backbone_id_of
from indexer.heads.teach import train_from_examples
from indexer.library import Library
from indexer.settings import Settings
from indexer import store
home, kind, positive, rows = sys.argv[1], sys.argv[2], sys.argv[3] or None, json.loads(sys.stdin.read())
library = Library(Settings(home=home, model_cache=sys.argv[4]))
library.tag_index()  # a server holds its postings: the new head's are swapped into them
library.index()  # and its index, whose vectors the re-tag reads
with library.sessions.begin() as session:
    ids = store.ids_by_path(session, [p for p, _ in rows])
    put_examples(session, "h-" + kind, kind, [(ids[p], labels) for p, labels in rows], positive=positive,
                 backbone_id=backbone_id_of(library))
out = {}
for attempt in ("cold", "warm"):
    started = time.perf_counter()
    report = train_from_examples(library, "h-" + kind)
    out[attempt] = {**report["seconds"], "wall": time.perf_counter() - started, "tagged": report["tagged"]}
from indexer.heads.workflow import tag_all
started = time.perf_counter()
tag_all(library, ["h-" + kind])
out["tag_all"] = time.perf_counter() - started
print(json.dumps(out))
"""


def time_training(home: Path, env: dict, kind: str, paths, labels, positive) -> dict:
    rows = json.dumps([[p, lbl] for p, lbl in zip(paths, labels)])
    proc = subprocess.run(
        [sys.executable, "-c", TIMING_SCRIPT, str(home / "home"), kind, positive or "", str(MODEL_CACHE)],
        input=rows,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    warm = got["warm"]
    return {
        "train": round(warm["train"], 3),
        "report": round(warm["report"], 3),
        "tag": round(warm["tag"], 3),
        "total": round(warm["wall"], 3),
        "cold_total": round(got["cold"]["wall"], 3),
        "tagged": warm["tagged"],
        "baseline_tag_all": round(got["tag_all"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("learning", "timing", "both"), default="both")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--tasks", nargs="+", help="learning: only the tasks whose name contains one of these words")
    parser.add_argument("--seeds", type=int, nargs="+", help="learning: these seeds only (default: 40, small sets 160)")
    args = parser.parse_args()
    load = machine_load()
    print(load_line(load))
    out = {"machine_load": load}
    if args.part in ("learning", "both"):
        out["active_learning"] = learning_part(args.tasks, args.seeds)
    if args.part in ("timing", "both"):
        out["timing"] = timing_part(args.sizes)
    print(f"results: {write_json('teach', out)}")


if __name__ == "__main__":
    main()
