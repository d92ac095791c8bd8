"""Compaction and re-training in a process of their own (`lookalike maintain`), so that the writer
that made them due returns once its rows are saved, and the next writer is not kept waiting for
a build of minutes.

The maintainer holds the home's write lock twice, briefly. First to take a snapshot of the index:
the segment it was built on, the growing segment and the tombstones. Then to swap. In between it
builds the new segment from the snapshot in `index/building/`, a folder no save cleans. At the swap
it reads the index as writers have left it since and carries their changes over. Vectors added or
re-embedded since the snapshot stay in the growing segment and tombstone their older copies in
the new segment. Images deleted since become tombstones. If the segment it started from was
replaced meanwhile (a reindex, a switch back to exact), its work is dropped.

A kill at any moment leaves the previous generation whole. The next maintainer removes what is in
`building/`. The next save removes files moved into the index folder that no manifest names yet.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from indexer import index_maintenance, store
from indexer.ann import AnnSegment
from indexer.errors import LookalikeError
from indexer.faults import checkpoint
from indexer.settings import Settings
from indexer.vector_index import VectorIndex
from indexer.vector_store import fsync_path

LOCK_FILE = "maintain.lock"  # held by the one maintainer of a home for its whole run
LOG_FILE = "maintain.log"  # a detached maintainer's output, appended
BUILDING = "building"  # under the index folder: a segment being built, not yet named by a manifest
ROUNDS = 3  # writers may make the next compaction due while one runs: do it too, a few times
# How long the maintainer waits for a writer's lock: an index or tag run holds it for its whole
# run. Past that it gives up; the writer's own save starts a new maintainer when it is done.
WRITER_WAIT = 600.0

Notify = Callable[[str], None]


# A detached maintainer inherits the lock its parent took for it (this names the descriptor), so
# the home counts as being maintained from the moment it is started, not once it has imported.
INHERITED_LOCK_ENV = "LOOKALIKE_MAINTAINER_LOCK_FD"


def _take_lock(home: Path) -> int | None:
    """A descriptor holding the home's maintainer lock, or None when another process holds it."""
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def _maintainer_lock(home: Path) -> Iterator[bool]:
    """True when this process is now the home's maintainer (until the block ends), else False."""
    inherited = os.environ.pop(INHERITED_LOCK_ENV, None)
    fd = int(inherited) if inherited is not None else _take_lock(home)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def running(home: Path) -> bool:
    """Whether a maintainer is working on `home` now (or has been started and is starting)."""
    if not (home / LOCK_FILE).exists():
        return False
    fd = os.open(home / LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def start(settings: Settings, notify: Notify) -> bool:
    """Start a detached `lookalike maintain` on the home unless one runs; True when started.

    The child gets the settings that decide what it does through its environment, and its output
    goes to HOME/maintain.log. It outlives this process (its own session)."""
    home = settings.resolved_home
    fd = _take_lock(home)
    if fd is None:
        return False  # one is running; it goes on while compaction is due
    try:
        env = dict(os.environ)
        env.update(
            LOOKALIKE_HOME=str(home),
            LOOKALIKE_DATABASE_URL=settings.resolved_database_url,
            LOOKALIKE_ANN_THRESHOLD=str(settings.ann_threshold),
            LOOKALIKE_ANN_RECALL_TARGET=str(settings.ann_recall_target),
            LOOKALIKE_COMPACT_AT=str(settings.compact_at),
            **{INHERITED_LOCK_ENV: str(fd)},
        )
        with open(home / LOG_FILE, "ab") as log:
            subprocess.Popen(
                [sys.executable, "-c", "import cli; cli.main()", "maintain", "--home", str(home)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                pass_fds=(fd,),
            )
    finally:
        os.close(fd)  # the child's copy of the descriptor keeps the lock
    notify(f"compaction runs in the background (log: {home / LOG_FILE}); searches see the new images already")
    return True


def run(library, notify: Notify) -> str:
    """What `lookalike maintain` does: the maintenance due, until none is; says what was done."""
    home = library.settings.resolved_home
    with _maintainer_lock(home) as mine:
        if not mine:
            return "another maintainer is running on this home"
        building = library.index_dir / BUILDING
        shutil.rmtree(building, ignore_errors=True)  # a killed maintainer's half-built segment
        done = []
        for _ in range(ROUNDS):
            step = _one_round(library, building, notify)
            if step is None:
                break
            done.append(step)
        shutil.rmtree(building, ignore_errors=True)
        return ", ".join(done) if done else "nothing was due"


def _one_round(library, building: Path, notify: Notify) -> str | None:
    settings = library.settings
    with library.write_lock(wait=WRITER_WAIT, maintainer=True):
        library.forget_index()
        snapshot = library.index()
        step = index_maintenance.due(snapshot, settings)
        backbone = _backbone_name(library)
        if step is not None and step not in index_maintenance.BACKGROUND_STEPS:
            # The switch to the approximate layout and back: quick enough, and they replace the
            # layout itself; done under the lock, as a writer does.
            library.save_index(snapshot, backbone)
            return step
    if step is None:
        return None
    name = f"segment-{snapshot.generation + 1:06d}-{os.getpid()}"
    building.mkdir(parents=True, exist_ok=True)
    segment = index_maintenance.new_segment(snapshot, step, building, name, settings, notify)
    with library.write_lock(wait=WRITER_WAIT, maintainer=True):
        library.forget_index()
        current = library.index()
        if current.ann is None or _base(current) != _base(snapshot):
            notify("the index was rebuilt while compacting: this compaction is dropped")
            return step
        _adopt(segment, building, library.index_dir)
        merged = carry_over(snapshot, current, segment)
        checkpoint("ann-swap", library.index_dir)
        merged.save(library.index_dir, backbone)
        library.use_index(merged)
    notify(f"{step}: {len(merged)} vectors, {merged.growing} added meanwhile kept in the growing segment")
    return step


def _base(index: VectorIndex) -> tuple:
    """What identifies the segment an index was built on (a restored home may reuse a name)."""
    return index.ann.params.get("ivf_file"), index.ann.params.get("ivf_digest")


def _backbone_name(library) -> str:
    with library.sessions() as session:
        row = store.backbone_in_use(session)
    if row is None:
        raise LookalikeError("this home has no embeddings yet")
    return row.name


def _adopt(segment: AnnSegment, building: Path, index_dir: Path) -> None:
    """Move the built files beside the index (same file system: renames). Open maps stay valid."""
    for name in segment.files():
        os.replace(building / name, index_dir / name)
    fsync_path(index_dir)
    segment.folder = index_dir


def carry_over(snapshot: VectorIndex, current: VectorIndex, segment: AnnSegment) -> VectorIndex:
    """`segment` (built from `snapshot`'s live vectors) plus what writers changed since, such that
    the result holds exactly `current`'s ids and vectors.

    Both indexes share one base segment. The growing segment only gains vectors, except removals,
    so a vector of `current`'s growing segment identical to the snapshot's under the same id was
    folded into `segment`; every other one stays growing (adding it tombstones an older copy)."""
    snap_ids, snap_vectors = snapshot.growing_vectors()
    cur_ids, cur_vectors = current.growing_vectors()
    folded = np.zeros(len(cur_ids), dtype=bool)
    if len(snap_ids):
        order = np.argsort(snap_ids)
        rows = order[np.minimum(np.searchsorted(snap_ids, cur_ids, sorter=order), len(snap_ids) - 1)]
        folded = (snap_ids[rows] == cur_ids) & np.all(snap_vectors[rows] == cur_vectors, axis=1)
    live_now = current.ids()
    deleted = np.setdiff1d(np.asarray(segment.store.ids), live_now, assume_unique=True)
    merged = VectorIndex(current.dim, generation=current.generation, ann=segment, tombstones=deleted)
    merged.add(cur_ids[~folded], cur_vectors[~folded])
    if not np.array_equal(merged.ids(), live_now):
        raise RuntimeError("carrying writers' changes over to the compacted index lost or added vectors")
    return merged
