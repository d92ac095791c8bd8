"""A lookalike home folder opened for use: database, backbone, FAISS index, write lock.

The database is the source of truth; the FAISS bundle is a cache of the stored embeddings.
Opening the index checks the two against each other and repairs the index from the stored
vectors when they differ (after a crash, a kill, or a damaged file).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from indexer import background_compaction, index_maintenance, store
from indexer.backbones import DEFAULT_BACKBONE, Backbone, load_backbone
from indexer.database import checkpoint_sqlite, make_engine, session_factory, upgrade
from indexer.device import resolve_device
from indexer.errors import BackboneMismatch, IndexBusy
from indexer.faults import checkpoint
from indexer.filters import TagIndex
from indexer.settings import Settings
from indexer.vector_index import IndexCorrupt, VectorIndex, read_manifest

# A background maintainer marks the lock file so that writers wait for it rather than fail: it
# holds the lock only for seconds, to take a snapshot and to swap.
MAINTAINER_MARK = " maintain"
MAINTAINER_HOLD = 120.0
# A holder writes its pid just after taking the lock and clears it just before letting go, so a
# busy lock can name no live holder for a moment (or name a killed one). That moment is waited
# out rather than taken for a writer that refuses: it could be the maintainer, which is waited for.
UNNAMED_HOLD = 2.0
TAGS_STAMP = "tags.stamp"  # touched whenever tags change, so servers reload their postings

Notify = Callable[[str], None]


def _ignore(_: str) -> None:
    pass


class Library:
    def __init__(self, settings: Settings, *, notify: Notify = _ignore, batch: bool = False):
        """`batch`: the model serves long runs that share the cores with decoder processes (indexing),
        rather than single queries where every millisecond of latency counts (serving)."""
        self.settings = settings
        self.batch = batch
        self.home = settings.resolved_home
        self.home.mkdir(parents=True, exist_ok=True)
        self.notify = notify
        self.engine = make_engine(settings.resolved_database_url)
        upgrade(self.engine)
        self.sessions = session_factory(self.engine)
        self._backbone: Backbone | None = None
        self._backbone_lock = threading.Lock()
        self._index: VectorIndex | None = None
        self._tags: TagIndex | None = None
        self._tags_lock = threading.Lock()
        self._tags_mark = _mtime_ns(self.index_dir / TAGS_STAMP)
        self._lock_held = False
        # Every image's pixel signature, for the duplicate check of a few new images (loaded by
        # the first one; indexer/duplicates/signature_codes.py).
        self.duplicate_signatures = None
        # The exactly searched vectors, projected, for the same check below the approximate
        # index's threshold (indexer/duplicates/embedding_codes.py).
        self.duplicate_embeddings = None

    @property
    def index_dir(self) -> Path:
        return self.home / "index"

    @property
    def model_cache_dir(self) -> Path:
        return self.settings.model_cache or self.home / "models"

    def close(self) -> None:
        """Release the database; on SQLite, leave no WAL behind for the next process to recover."""
        checkpoint_sqlite(self.engine)
        self.engine.dispose()

    # -- backbone ------------------------------------------------------------------------------

    def backbone_name(self) -> str:
        """The index's backbone; a different explicitly configured one is an error, never a mix."""
        with self.sessions() as session:
            row = store.backbone_in_use(session)
        wanted = self.settings.backbone
        if row is None:
            return wanted or DEFAULT_BACKBONE
        if wanted and wanted != row.name:
            raise BackboneMismatch(
                f"the index in {self.home} was built with backbone {row.name!r}; it cannot mix in {wanted!r}. "
                f"Use another --home for {wanted!r}."
            )
        return row.name

    def backbone(self) -> Backbone:
        """Load the model once per process (thread-safe); later calls reuse the same session."""
        with self._backbone_lock:
            if self._backbone is None:
                self._backbone = load_backbone(
                    self.backbone_name(),
                    runtime=self.settings.runtime,
                    cache_dir=self.model_cache_dir,
                    clip_weights=self.settings.clip_weights,
                    threads=self.settings.threads,
                    spin=not self.batch,
                    device=resolve_device(self.settings.device, self.settings.runtime),
                )
            return self._backbone

    # -- index ---------------------------------------------------------------------------------

    def index(self, *, repair_on_disk: bool = True) -> VectorIndex:
        """The verified in-memory index (loaded once); repaired from the database if needed."""
        if self._index is None:
            self._index = self._load_verified_index(save_repairs=repair_on_disk)
        return self._index

    def forget_index(self) -> None:
        """Drop the in-memory index: the next use loads and verifies the saved one."""
        self._index = None

    def _load_verified_index(self, *, save_repairs: bool, reuse: VectorIndex | None = None) -> VectorIndex:
        with self.sessions() as session:
            row = store.backbone_in_use(session)
            if row is None:
                return VectorIndex(dim=0)
            backbone_id, name, dim = row.id, row.name, row.dim
            fingerprint = store.embedded_fingerprint(session, backbone_id)
        try:
            index = self._load_saved(name, dim, reuse)
        except IndexCorrupt as exc:
            if fingerprint[0]:
                self.notify(f"index damaged or missing ({exc}); rebuilding from {fingerprint[0]} stored embeddings")
            index = VectorIndex(dim)
        if store.ids_fingerprint(index.ids()) == fingerprint:
            return index  # the same ids as the database: nothing to compare id by id
        changed = self.reconcile(index, backbone_id)
        if changed and save_repairs:
            try:
                with self.write_lock():
                    index.save(self.index_dir, name)
            except IndexBusy:
                pass  # the writer holding the lock will save its own, newer state
            except OSError as exc:  # disk full, read-only: serve the repaired copy from memory anyway
                self.notify(f"cannot save the repaired index ({exc.strerror or exc}); it is rebuilt again next time")
        return index

    def _load_saved(self, name: str, dim: int, reuse: VectorIndex | None) -> VectorIndex:
        """The saved bundle; read again if a writer replaced it while it was being read (the files a
        manifest names are removed once a newer one is saved), rather than rebuilt as if damaged."""
        for _ in range(3):
            before = _current_generation(self.index_dir)
            try:
                return VectorIndex.load(self.index_dir, name, dim, reuse=reuse)
            except IndexCorrupt:
                if _current_generation(self.index_dir) == before:
                    raise
        return VectorIndex.load(self.index_dir, name, dim, reuse=reuse)

    def save_index(self, index: VectorIndex, backbone_name: str) -> VectorIndex:
        """Save `index`, then do the maintenance due (the switch to an approximate index past
        Settings.ann_threshold, compaction, re-training); returns the index to use from now on.

        Compaction and re-training are left to a detached `lookalike maintain` when
        Settings.background_compaction says so: the saved index serves
        correctly meanwhile. A switch saves only its result: writing the whole exact index first
        would cost as much as the build. Should the build be killed, the database still holds
        every vector and the next open repairs the older saved index from it."""
        step = index_maintenance.due(index, self.settings)
        if step in index_maintenance.BACKGROUND_STEPS and self.settings.background_compaction:
            index.save(self.index_dir, backbone_name)
            self._index = index
            background_compaction.start(self.settings, self.notify)
            return index
        if not (index.ann is None and step == "build"):
            index.save(self.index_dir, backbone_name)
        current = index_maintenance.maintain(index, self.index_dir, backbone_name, self.settings, self.notify)
        self._index = current
        return current

    def loaded_index(self) -> VectorIndex | None:
        """The index this process serves, if it has loaded one (never loads it)."""
        return self._index

    def use_index(self, index: VectorIndex) -> None:
        """Serve `index` from now on: one just saved by this process."""
        self._index = index

    def reconcile(self, index: VectorIndex, backbone_id: int, stored_ids: np.ndarray | None = None) -> bool:
        """Make `index` hold exactly the stored embeddings' ids; True when anything changed."""
        with self.sessions() as session:
            if stored_ids is None:
                stored_ids = store.embedded_ids(session, backbone_id)
            in_index = index.ids()
            extra = np.setdiff1d(in_index, stored_ids, assume_unique=True)
            missing = np.setdiff1d(stored_ids, in_index, assume_unique=True)
            if len(extra) or len(missing):
                self.notify(
                    f"index and database disagree ({len(missing)} missing, {len(extra)} stale); "
                    "repairing from stored embeddings"
                )
            index.remove(extra)
            for ids, vectors in store.iter_vectors(session, backbone_id, ids=missing if len(missing) else []):
                index.add(ids, vectors)
        return bool(len(extra) or len(missing))

    def tag_index(self) -> TagIndex:
        """In-memory tag postings for filtered search (loaded once, dropped by tags_changed)."""
        tags = self._tags
        if tags is None:
            with self._tags_lock:  # one load (2-3 s for 1M images' tags), however many ask at once
                tags = self._tags
                if tags is None:
                    with self.sessions() as session:
                        tags = self._tags = TagIndex.load(session)
        return tags

    def tags_changed(self) -> None:
        """Drop the cached tag postings and tell other processes (a running server) to do so too."""
        self._tags = None
        stamp = self.index_dir / TAGS_STAMP
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(str(time.time_ns()))

    def head_retagged(self, head: str, postings: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """`head`'s tags were rewritten (in one transaction) by this process: serve them at once.

        The postings being served are replaced by a copy with the head's new ones, without a
        reload from the database; other processes reload theirs (the stamp)."""
        with self._tags_lock:
            if self._tags is not None:
                self._tags = self._tags.with_head(head, postings)
        stamp = self.index_dir / TAGS_STAMP
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(str(time.time_ns()))

    # -- live reload (servers) -----------------------------------------------------------------

    def refresh(self) -> list[str]:
        """Pick up what other processes saved: a new index generation, changed tags.

        The new generation is loaded and verified beside the one being served and swapped in
        with one assignment, so a request sees the old bundle or the new one, never a mix.
        """
        changed = []
        manifest = read_manifest(self.index_dir) or {}
        generation = int(manifest.get("generation", 0))
        if self._index is not None and generation != self._index.generation:
            self._index = self._load_verified_index(save_repairs=False, reuse=self._index)
            changed.append(f"index generation {generation}")
        tags_mark = _mtime_ns(self.index_dir / TAGS_STAMP)
        if tags_mark != self._tags_mark:
            self._tags_mark = tags_mark
            if self._tags is not None:
                # Loaded here, beside the postings being served, and swapped in: a filtered
                # query sees the old tags or the new ones, and never waits for the load.
                with self.sessions() as session:
                    self._tags = TagIndex.load(session)
            changed.append("tags")
        return changed

    def rebuild_index(self) -> VectorIndex:
        """Build a fresh index from every stored embedding and save it (lookalike reindex)."""
        with self.write_lock():
            with self.sessions() as session:
                row = store.backbone_in_use(session)
                if row is None:
                    return VectorIndex(dim=0)
                backbone_id, name, dim = row.id, row.name, row.dim
                index = VectorIndex(dim, generation=_current_generation(self.index_dir))
                for ids, vectors in store.iter_vectors(session, backbone_id):
                    index.add(ids, vectors)
            checkpoint("reindex")
            return self.save_index(index, name)

    # -- locking -------------------------------------------------------------------------------

    @contextmanager
    def write_lock(self, wait: float = 0.0, *, maintainer: bool = False) -> Iterator[None]:
        """One writer per home folder; a second one is refused rather than left to corrupt.

        With `wait` > 0, a busy lock is retried for up to that many seconds (saying so once)
        before IndexBusy is raised. A lock held by a background maintainer (`maintainer`) is
        always waited for up to MAINTAINER_HOLD seconds: it holds it only to take a snapshot
        and to swap.
        """
        if self._lock_held:
            yield
            return
        path = self.home / "write.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            started = time.monotonic()
            deadline = started + wait
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pid, by_maintainer = _lock_holder(fd)
                    if by_maintainer:
                        wait = max(wait, MAINTAINER_HOLD)
                        deadline = max(deadline, started + MAINTAINER_HOLD)
                    elif pid is None and time.monotonic() < started + UNNAMED_HOLD:
                        time.sleep(0.02)
                        continue
                    holder = pid or "another process"
                    if time.monotonic() >= deadline:
                        waited = f" (waited {wait:g} s)" if wait > 0 else ""
                        raise IndexBusy(
                            f"{self.home} is being written by pid {holder}{waited}; try again when it finishes"
                        ) from None
                    if not told:
                        self.notify(f"waiting up to {wait:g} s for pid {holder} to finish writing {self.home}")
                        told = True
                    time.sleep(0.1)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}{MAINTAINER_MARK if maintainer else ''}".encode(), 0)
            self._lock_held = True
            try:
                yield
            finally:
                self._lock_held = False
                os.ftruncate(fd, 0)  # still holding it: nobody reads this pid once it is gone
        finally:
            os.close(fd)  # closing releases the lock, also when the process is killed


def _lock_holder(fd: int) -> tuple[int | None, bool]:
    """The live pid a busy write lock names, and whether it is the background maintainer.

    (None, False) while the holder has not written its pid yet, or when the pid written is a
    killed holder's."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    by_maintainer = text.endswith(MAINTAINER_MARK)
    digits = text.removesuffix(MAINTAINER_MARK).strip()
    if not digits.isdigit():
        return None, False
    pid = int(digits)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None, False
    except PermissionError:
        pass  # alive, someone else's
    return pid, by_maintainer


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _current_generation(folder: Path) -> int:
    manifest = read_manifest(folder)
    return int(manifest.get("generation", 0)) if manifest else 0
