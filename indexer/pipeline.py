"""`lookalike index`: scan folders, decode in parallel, embed in batches, write, keep FAISS in step.

Decoder processes read each file once, hash it and decode it near model size (JPEG draft);
the main process batches their uint8 crops through the backbone and commits each batch of
rows and vectors in one transaction. The database is written before the in-memory index, and
the index file is saved atomically, so a kill at any moment leaves a state that the next
run's consistency check repairs: every image ends up indexed exactly once.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np

from indexer import store
from indexer.backbones import Preprocess
from indexer.decode import ImageInfo, decode_for_model
from indexer.errors import ImageRejected, LookalikeError
from indexer.faults import checkpoint
from indexer.heads.builtin import ensure_builtin_heads
from indexer.heads.storage import load_heads, write_tags
from indexer.library import Library
from indexer.scan import FoundFile, ScanFailure, escaped_path, is_utf8, scan_folder
from indexer.store import NewImage

ProgressFn = Callable[[int, int], None]  # (files done, files to process)

_CHUNK = 4  # files per decoder task: amortises inter-process overhead
_SAVE_EVERY_S = 60.0  # bound the repair work after a crash in a long run


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    embedded: int = 0  # images that went through the model (duplicates reuse a vector)
    failed: list[tuple[str, str]] = field(default_factory=list)
    previously_failed: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class _Task:
    path: str
    size: int
    mtime_ns: int
    replaces: int | None = None  # the image id this file had before it changed
    old_hash: str | None = None


@dataclass
class _Decoded:
    task: _Task
    content_hash: str | None = None
    pixels: np.ndarray | None = None  # None when the hash is already indexed, or on error
    info: ImageInfo | None = None
    error: str | None = None


# -- decoder processes -----------------------------------------------------------------------

_worker_state: dict = {}


def _init_worker(preprocess: Preprocess, max_pixels: int, max_bytes: int, known_hashes: frozenset[str]) -> None:
    _worker_state.update(preprocess=preprocess, max_pixels=max_pixels, max_bytes=max_bytes, known=known_hashes)
    threading.Thread(target=_exit_with_parent, daemon=True).start()


def _exit_with_parent() -> None:
    """A killed indexer (kill -9) cannot shut its pool down; its decoders must not linger as orphans."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()  # waits on the parent's sentinel: returns when the parent process is gone
        os._exit(1)


def _decode_chunk(tasks: list[tuple[_Task, bool]]) -> list[_Decoded]:
    """Decode (task, force) pairs; force skips the already-indexed shortcut."""
    return [_decode_one(task, force) for task, force in tasks]


def _decode_one(task: _Task, force: bool) -> _Decoded:
    state = _worker_state
    try:
        if task.size > state["max_bytes"]:
            return _Decoded(task, error=f"file too large ({task.size} bytes > {state['max_bytes']})")
        with open(task.path, "rb") as fh:
            data = fh.read(state["max_bytes"] + 1)
    except OSError as exc:
        return _Decoded(task, error=_os_reason(exc))
    digest = hashlib.blake2b(data, digest_size=20).hexdigest()
    if not force and (digest in state["known"] or digest == task.old_hash):
        return _Decoded(task, content_hash=digest)
    # Testing hook: LOOKALIKE_FAULTS="decoder:NAME:1=kill" kills the decoder that reaches the file
    # named NAME, as a codec crashing on a hostile file would (see indexer/faults.py).
    checkpoint(f"decoder:{os.path.basename(task.path)}")
    try:
        pixels, info = decode_for_model(data, state["preprocess"], max_pixels=state["max_pixels"])
    except ImageRejected as exc:
        return _Decoded(task, content_hash=digest, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - e.g. MemoryError: one file must not stop the run
        return _Decoded(task, content_hash=digest, error=f"cannot decode image ({type(exc).__name__}: {exc})")
    return _Decoded(task, content_hash=digest, pixels=pixels, info=info)


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "file disappeared during the run"
    if isinstance(exc, IsADirectoryError):
        return "is a folder"
    return f"cannot read file ({exc.strerror or exc})"


# -- planning ------------------------------------------------------------------------------------


@dataclass
class _Plan:
    tasks: list[_Task] = field(default_factory=list)
    scan_failures: list[tuple[ScanFailure, int | None]] = field(default_factory=list)
    removed_ids: list[int] = field(default_factory=list)
    unchanged: int = 0
    previously_failed: int = 0


def _plan(library: Library, roots: list[str]) -> _Plan:
    plan = _Plan()
    with library.sessions() as session:
        for root in roots:
            known = store.files_under(session, root)
            seen: set[str] = set()
            for item in scan_folder(root):
                seen.add(item.path)
                previous = known.get(item.path)
                if isinstance(item, ScanFailure):
                    plan.scan_failures.append((item, previous.id if previous else None))
                elif previous and _unchanged(previous, item):
                    plan.unchanged += previous.status == store.STATUS_INDEXED
                    plan.previously_failed += previous.status == store.STATUS_FAILED
                else:
                    plan.tasks.append(_task(item, previous))
            plan.removed_ids.extend(k.id for path, k in known.items() if path not in seen)
    return plan


# Failures caused by the environment or the settings rather than the bytes: a chmod or a raised
# limit fixes them without changing size or mtime, so such files are tried again on every run.
# A decoder crash is retried too: it may have been a kill from outside, or a codec fixed since.
_RETRY_ERRORS = (
    "permission denied",
    "cannot read file",
    "file disappeared",
    "file too large",
    "decompression bomb",
    "decoder crashed",
)


def _unchanged(previous: store.KnownFile, item: FoundFile) -> bool:
    if (previous.size, previous.mtime_ns) != (item.size, item.mtime_ns):
        return False
    return not (previous.status == store.STATUS_FAILED and (previous.error or "").startswith(_RETRY_ERRORS))


def _task(item: FoundFile, previous: store.KnownFile | None) -> _Task:
    if previous is None:
        return _Task(item.path, item.size, item.mtime_ns)
    old_hash = previous.content_hash if previous.status == store.STATUS_INDEXED else None
    return _Task(item.path, item.size, item.mtime_ns, replaces=previous.id, old_hash=old_hash)


# -- the run -------------------------------------------------------------------------------------


def index_folders(library: Library, folders: Iterable[str], *, progress: ProgressFn | None = None) -> IndexReport:
    """Index every image below `folders`; files that vanished from them are removed."""
    roots = [os.path.abspath(f) for f in folders]
    for root in roots:
        if not is_utf8(root):  # paths are stored as UTF-8 text
            raise LookalikeError(f"folder name is not valid UTF-8: {escaped_path(root)} (rename it to index it)")
        if not os.path.isdir(root):
            raise LookalikeError(f"not a folder: {root}")
    return _index(library, roots, lambda: _plan(library, roots), progress)


def index_files(library: Library, paths: Iterable[str], *, progress: ProgressFn | None = None) -> IndexReport:
    """Index these image files (e.g. the labelled images of a head); nothing else is touched."""
    files = sorted({os.path.abspath(p) for p in paths})
    return _index(library, [], lambda: _plan_files(library, files), progress)


def _plan_files(library: Library, files: list[str]) -> _Plan:
    plan = _Plan()
    with library.sessions() as session:
        known = store.files_by_paths(session, files)
    for path in files:
        previous = known.get(path)
        try:
            st = os.stat(path)
        except OSError as exc:
            plan.scan_failures.append((ScanFailure(path, _os_reason(exc)), previous.id if previous else None))
            continue
        item = FoundFile(path, st.st_size, st.st_mtime_ns)
        if previous and _unchanged(previous, item):
            plan.unchanged += previous.status == store.STATUS_INDEXED
            plan.previously_failed += previous.status == store.STATUS_FAILED
        else:
            plan.tasks.append(_task(item, previous))
    return plan


def _index(library: Library, roots: list[str], make_plan, progress: ProgressFn | None) -> IndexReport:
    started = time.perf_counter()
    with library.write_lock():
        backbone = library.backbone()
        with library.sessions.begin() as session:
            backbone_id = store.ensure_backbone(session, backbone.name, backbone.dim).id
            store.add_roots(session, roots)
            ensure_builtin_heads(session, backbone, backbone_id)
        index = library.index()
        plan = make_plan()
        report = IndexReport(unchanged=plan.unchanged, previously_failed=plan.previously_failed)
        with library.sessions() as session:
            known_hashes = frozenset(store.indexed_hashes(session, backbone_id))
        writer = _BatchWriter(library, index, backbone, backbone_id, report)
        for failure, replaces in plan.scan_failures:
            writer.add_failure(_Task(failure.path, 0, 0, replaces=replaces), failure.reason)
        _run_decoders(library, plan.tasks, backbone.preprocess, known_hashes, writer, progress)
        writer.flush()  # scan failures when nothing needed decoding
        if plan.removed_ids:
            with library.sessions.begin() as session:
                store.delete_images(session, plan.removed_ids)
                checkpoint("commit")
            checkpoint("committed")
            index.remove(plan.removed_ids)
            report.removed = len(plan.removed_ids)
        if writer.dirty or plan.removed_ids or index.generation == 0:
            index.save(library.index_dir, backbone.name)
        library.tags_changed()
    report.seconds = time.perf_counter() - started
    return report


def _run_decoders(library, tasks, preprocess, known_hashes, writer, progress) -> None:
    settings = library.settings
    total = len(tasks)
    if progress:
        progress(0, total)
    if not tasks:
        return
    workers = settings.decode_workers or os.cpu_count() or 1
    chunks = deque([(t, False) for t in tasks[i : i + _CHUNK]] for i in range(0, total, _CHUNK))
    pool = _DecoderPool(workers, (preprocess, settings.max_image_pixels, settings.max_file_bytes, known_hashes))
    with pool:
        max_inflight = workers * 4  # bounded read-ahead keeps memory flat however large the folder
        done = 0
        while chunks or pool.inflight:
            while chunks and len(pool.inflight) < max_inflight and pool.submit(chunks[0]):
                chunks.popleft()
            retries = []
            for decoded in pool.next_results():
                checkpoint("decode")
                retries += writer.add(decoded)
                done += 1
            if not chunks and not pool.inflight:
                retries += writer.flush()
            # A file whose twin vanished or changed in this very run is decoded after all.
            done -= len(retries)
            chunks.extend([(t, True)] for t in retries)
            if progress:
                progress(done, total)


_Job = tuple[_Task, bool]  # (task, force)


class _DecoderPool:
    """Decoder processes that outlive a decoder's death.

    When a worker dies (a codec crashing on a hostile file, the OOM killer, a kill), the executor
    fails every chunk in flight with BrokenProcessPool. Those chunks are then decoded again one
    file at a time in a separate process, which pins the death on the file(s) that cause it; those
    are reported as failed ("decoder crashed (signal 11, SIGSEGV)") and the run carries on with a
    fresh pool. Spawned (not forked) workers: the parent may hold ONNX Runtime or torch thread pools.
    """

    def __init__(self, workers: int, initargs: tuple):
        self.workers = workers
        self.initargs = initargs
        self.inflight: deque[tuple[Future, list[_Job]]] = deque()
        self._pool: ProcessPoolExecutor | None = None
        self._isolated: _IsolatedDecoder | None = None

    def __enter__(self) -> _DecoderPool:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._isolated is not None:
            self._isolated.close()

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=get_context("spawn"),
                initializer=_init_worker,
                initargs=self.initargs,
            )
        return self._pool

    def _drop_broken_pool(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def submit(self, chunk: list[_Job]) -> bool:
        """False if the pool just broke: next_results() then sorts out the chunks in flight."""
        try:
            future = self._executor().submit(_decode_chunk, chunk)
        except BrokenProcessPool:
            if self.inflight:
                return False
            self._drop_broken_pool()  # a worker died with nothing to do: nothing to re-run
            future = self._executor().submit(_decode_chunk, chunk)
        self.inflight.append((future, chunk))
        return True

    def next_results(self) -> list[_Decoded]:
        """The oldest chunk's results; after a decoder died, those of every chunk that was in flight."""
        future, chunk = self.inflight.popleft()
        try:
            return future.result()
        except BrokenProcessPool:
            pass
        results, suspects = [], list(chunk)
        for future, chunk in self.inflight:
            try:
                results += future.result()  # finished before the death
            except BrokenProcessPool:
                suspects += chunk
        self.inflight.clear()
        self._drop_broken_pool()
        if self._isolated is None:
            self._isolated = _IsolatedDecoder(self.initargs)
        return results + [self._isolated.decode(job) for job in suspects]


class _IsolatedDecoder:
    """One decoder process fed one file at a time: if it dies, that file killed it."""

    def __init__(self, initargs: tuple):
        self.initargs = initargs
        self.proc = None
        self.conn = None

    def _start(self) -> None:
        ctx = get_context("spawn")
        self.conn, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=_isolated_worker, args=(child_end, self.initargs), daemon=True)
        self.proc.start()
        child_end.close()
        try:
            self.conn.recv()  # "ready": it imported everything and ran the initializer
        except (EOFError, OSError):
            self.proc.join()
            raise LookalikeError(f"decoder processes cannot start ({_death(self.proc.exitcode)})") from None

    def decode(self, job: _Job) -> _Decoded:
        if self.proc is None:
            self._start()
        try:
            self.conn.send(job)
            return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join()
            reason = f"decoder crashed ({_death(self.proc.exitcode)})"
            self.conn.close()
            self.proc = self.conn = None
            return _Decoded(job[0], error=reason)

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
            self.conn.close()
            self.proc = self.conn = None


def _isolated_worker(conn, initargs: tuple) -> None:
    _init_worker(*initargs)
    conn.send("ready")
    while (job := conn.recv()) is not None:
        conn.send(_decode_one(*job))


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {-exitcode}, {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class _BatchWriter:
    """Collects decoded files, embeds full batches, and commits rows and vectors together."""

    def __init__(self, library: Library, index, backbone, backbone_id: int, report: IndexReport):
        self.library = library
        self.index = index
        self.backbone = backbone
        self.backbone_id = backbone_id
        self.report = report
        self.batch_size = library.settings.batch_size
        with library.sessions() as session:
            self.heads = load_heads(session, backbone_id)  # every head tags every new image
        self.to_embed: list[_Decoded] = []
        self.ready: list[tuple[_Task, NewImage]] = []  # failures: rows needing no vector
        self.reuse: list[_Decoded] = []  # bytes already indexed or in this batch: no model call
        self.touched: dict[int, tuple[int, int]] = {}
        self.hash_to_id: dict[str, int] = {}  # content embedded earlier in this run
        self.dirty = False
        self.last_save = time.monotonic()

    def add_failure(self, task: _Task, reason: str) -> None:
        self.ready.append((task, NewImage(task.path, task.size, task.mtime_ns, error=reason)))
        self.report.failed.append((task.path, reason))

    def add(self, decoded: _Decoded) -> list[_Task]:
        task = decoded.task
        if decoded.error:
            self.add_failure(task, decoded.error)
        elif decoded.pixels is None and decoded.content_hash == task.old_hash:
            self.touched[task.replaces] = (task.size, task.mtime_ns)  # touched, same bytes
            self.report.unchanged += 1
        elif decoded.pixels is None or decoded.content_hash in self.hash_to_id or self._in_batch(decoded):
            decoded.pixels = None
            self.reuse.append(decoded)
        else:
            self.to_embed.append(decoded)
        if len(self.to_embed) >= self.batch_size or len(self.ready) + len(self.reuse) >= 4 * self.batch_size:
            return self.flush()
        return []

    def _in_batch(self, decoded: _Decoded) -> bool:
        return any(d.content_hash == decoded.content_hash for d in self.to_embed)

    def flush(self) -> list[_Task]:
        """Embed, write one transaction, then update the in-memory index. Returns tasks to retry."""
        items = list(self.ready)
        batch_vectors: dict[str, tuple[np.ndarray, float]] = {}
        if self.to_embed:
            checkpoint("embed")
            vectors, norms = self.backbone.embed_with_norms(np.stack([d.pixels for d in self.to_embed]))
            self.report.embedded += len(self.to_embed)
            for decoded, vector, norm in zip(self.to_embed, vectors, norms):
                items.append((decoded.task, _row(decoded, vector, float(norm))))
                batch_vectors[decoded.content_hash] = (vector, float(norm))
        reused, retries = self._resolve_reused(batch_vectors)
        items += reused
        if items or self.touched:
            self._commit(items)
        self.to_embed, self.ready, self.reuse, self.touched = [], [], [], {}
        return retries

    def _commit(self, items: list[tuple[_Task, NewImage]]) -> None:
        rows = [row for _, row in items]
        replaced = [task.replaces for task, _ in items if task.replaces is not None]
        with self.library.sessions.begin() as session:
            ids = store.write_images(session, rows, self.backbone_id, replaced)
            store.touch_images(session, self.touched)
            tagged = [(image_id, row) for image_id, row in zip(ids, rows) if row.vector is not None]
            if tagged and self.heads:  # tags land in the same transaction as their images
                write_tags(
                    session,
                    self.heads,
                    np.array([i for i, _ in tagged]),
                    np.stack([r.vector for _, r in tagged]),
                    np.array([np.nan if r.norm is None else r.norm for _, r in tagged], dtype=np.float32),
                )
            checkpoint("commit")
        checkpoint("committed")
        # The database is committed; only now mirror it in memory.
        self.index.remove(replaced)
        indexed = [(image_id, row) for image_id, row in zip(ids, rows) if row.vector is not None]
        if indexed:
            self.index.add(np.array([i for i, _ in indexed]), np.stack([r.vector for _, r in indexed]))
        for image_id, row in indexed:
            self.hash_to_id.setdefault(row.content_hash, image_id)
        for task, row in items:
            if row.vector is not None:
                self.report.added += task.replaces is None
                self.report.updated += task.replaces is not None
        self.dirty = True
        if time.monotonic() - self.last_save > _SAVE_EVERY_S:
            self.index.save(self.library.index_dir, self.backbone.name)
            self.last_save = time.monotonic()

    def _resolve_reused(self, batch_vectors: dict[str, np.ndarray]):
        """Vectors for files whose bytes were embedded before: from this batch, this run or the database."""
        if not self.reuse:
            return [], []
        with self.library.sessions() as session:
            stored = store.vectors_by_hash(session, [d.content_hash for d in self.reuse], self.backbone_id)
        items, retries = [], []
        for decoded in self.reuse:
            digest = decoded.content_hash
            twin = stored.get(digest)
            if twin is not None:
                decoded.info = ImageInfo(twin.width, twin.height, twin.format)
                vector, norm = twin.vector, twin.norm
            elif digest in batch_vectors:
                vector, norm = batch_vectors[digest]
                decoded.info = next(d.info for d in self.to_embed if d.content_hash == digest)
            else:
                retries.append(decoded.task)  # its twin was removed or changed in this very run
                continue
            items.append((decoded.task, _row(decoded, vector, norm)))
        return items, retries


def _row(decoded: _Decoded, vector: np.ndarray | None, norm: float | None = None) -> NewImage:
    task, info = decoded.task, decoded.info
    return NewImage(
        task.path,
        task.size,
        task.mtime_ns,
        content_hash=decoded.content_hash,
        width=info.width if info else None,
        height=info.height if info else None,
        format=info.format if info else None,
        vector=vector,
        norm=norm,
    )
