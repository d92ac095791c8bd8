"""Train a head on its stored examples, re-tag the collection, and follow the work while it runs.

The training is `lookalike heads train`'s (indexer/heads/training.py) on the stored vectors of the
examples; the head and its new tags commit together (indexer/heads/tagging.py). A server runs it
inside the request for collections up to `inline_max` images and in a background thread above,
with its progress readable meanwhile (`Trainings`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from indexer.errors import BadExamples, Conflict, LookalikeError
from indexer.heads.examples import ExampleSet, example_vectors, get_examples, training_set
from indexer.heads.plots import new_plot_set, save_plot_inputs
from indexer.heads.tagging import Progress, backbone_id_of, make_current, save_and_tag
from indexer.heads.training import TrainOptions, train_head
from indexer.heads.workflow import training_report, write_json
from indexer.library import Library

MISTAKES_SHOWN = 100
log = logging.getLogger("lookalike")


def train_from_examples(
    library: Library, name: str, options: TrainOptions | None = None, *, progress: Progress | None = None
) -> dict:
    """Train head `name` on its stored examples, store it as a new version and re-tag; returns its report."""
    started = time.perf_counter()
    with library.sessions() as session:
        found = get_examples(session, name)
    if not found.examples:
        raise BadExamples(f"head {name!r} has no stored examples to train on")
    labelled = training_set(found)
    vectors = example_vectors(library, backbone_id_of(library), labelled.ids)
    result = train_head(name, found.kind, labelled.names, vectors, labelled.targets, options or TrainOptions())
    trained = time.perf_counter()
    report = training_report(name, found.kind, labelled.names, labelled.dropped, len(labelled.ids), result)
    report["source"] = "stored examples"
    report["mistakes"] = _mistakes(found, labelled.ids, result)
    report_dir = library.home / "heads" / name
    report["plot_set"], plots = new_plot_set(report_dir)
    report["plots"] = save_plot_inputs(plots, name, result.history, result.metrics, labelled.names)
    write_json(report_dir / "report.json", report)
    plotted = time.perf_counter()
    tagged = save_and_tag(library, result.head, metrics=report, report_dir=str(report_dir), progress=progress)
    done = time.perf_counter()
    report["tagged"] = tagged
    report["seconds"] = {
        "train": round(trained - started, 3),
        "report": round(plotted - trained, 3),
        "tag": round(done - plotted, 3),
        "total": round(done - started, 3),
    }
    return report


def _mistakes(found: ExampleSet, ids: np.ndarray, result) -> list[dict]:
    """Examples whose held-out decision (out of fold, or on the validation split) disagrees with their labels."""
    decided = result.head.decide(result.held_out_probabilities)
    out = []
    for row, tags in zip(result.held_out_rows, decided):
        image_id = int(ids[row])
        wanted = found.examples[image_id]
        predicted = sorted(label for label, _ in tags)
        if found.kind == "multilabel":
            wanted = sorted(label for label in wanted if label in result.head.labels)
        if predicted != sorted(wanted):
            scores = {label: round(float(score), 4) for label, score in tags}
            out.append({"image_id": image_id, "labels": wanted, "predicted": predicted, "scores": scores})
    return out[:MISTAKES_SHOWN]


# -- work that a server follows ------------------------------------------------------------------


@dataclass
class Training:
    head: str
    action: str | None  # "train" or "activate N"; None when idle
    state: str = "running"  # running | done | failed (idle: nothing started)
    done: int = 0
    total: int = 0
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    finished_at: str | None = None
    error: str | None = None
    report: dict | None = None
    exception: BaseException | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {
            "head": self.head,
            "action": self.action,
            "state": self.state,
            "progress": {"done": self.done, "total": self.total},
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "report": self.report,
        }


class Trainings:
    """One training (or version change) per head at a time; large collections go to a thread."""

    def __init__(self, library: Library, inline_max: int):
        self.library = library
        self.inline_max = inline_max
        self._lock = threading.Lock()
        self._latest: dict[str, Training] = {}

    def latest(self, head: str) -> Training | None:
        return self._latest.get(head)

    def train(self, head: str) -> tuple[Training, bool]:
        return self._start(head, "train", lambda progress: train_from_examples(self.library, head, progress=progress))

    def activate(self, head: str, number: int) -> tuple[Training, bool]:
        def work(progress) -> dict:
            tagged = make_current(self.library, head, number, progress=progress)
            return {"head": head, "version": number, "tagged": tagged}

        return self._start(head, f"activate {number}", work)

    def _start(self, head: str, action: str, work: Callable[[Progress], dict]) -> tuple[Training, bool]:
        """Run `work`; returns the Training and whether it is finished (False: it runs in the background)."""
        with self._lock:
            running = self._latest.get(head)
            if running is not None and running.state == "running":
                raise Conflict(f"head {head!r} is already being {running.action.split()[0]}ed; wait for it")
            job = self._latest[head] = Training(head, action)
        if len(self.library.index()) <= self.inline_max:
            self._run(job, work)
            if job.exception is not None:
                raise job.exception
            return job, True
        threading.Thread(target=self._run, args=(job, work), name=f"train-{head}", daemon=True).start()
        return job, False

    @staticmethod
    def _run(job: Training, work: Callable[[Progress], dict]) -> None:
        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        try:
            job.report = work(progress)
            job.state = "done"
        except LookalikeError as exc:
            job.state, job.error, job.exception = "failed", str(exc), exc
        except Exception as exc:  # noqa: BLE001 - reported to whoever polls, and logged by the server
            job.state, job.error, job.exception = "failed", "internal error", exc
            log.exception("training head %r failed", job.head)
        finally:
            job.finished_at = datetime.now(UTC).isoformat()
