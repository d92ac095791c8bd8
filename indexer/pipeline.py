"""`lookalike index`: scan folders, decode in parallel, embed in batches, write, keep FAISS in step.

Decoder processes read each file once, hash it, decode it near model size (JPEG draft) and
embed it with the exported model (see `indexer.decode_worker`); the main process commits each
batch of rows, vectors and tags in one transaction. The database is written before the in-memory index, and
the index file is saved atomically, so a kill at any moment leaves a state that the next
run's consistency check repairs: every image ends up indexed exactly once.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from indexer import store
from indexer.backbones import OnnxBackbone
from indexer.cluster import ClusterDecoders
from indexer.decode import ImageInfo
from indexer.decode_worker import (
    CHUNK_FILES,
    READ_AHEAD_CHUNKS,
    Decoded,
    DecodeOptions,
    DecoderPool,
    Task,
    adopt,
    decoder_count,
    embed_threads,
    file_key,
    os_reason,
    write_known_hashes,
)
from indexer.duplicates import scan as duplicate_scan
from indexer.errors import LookalikeError
from indexer.faults import checkpoint
from indexer.heads.builtin import ensure_builtin_heads
from indexer.heads.storage import load_heads, write_tags
from indexer.library import Library
from indexer.scan import FoundFile, ScanFailure, escaped_path, is_utf8, scan_folder
from indexer.store import NewImage

ProgressFn = Callable[[int, int], None]  # (files done, files to process)

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
    duplicates: duplicate_scan.ScanReport | None = None


# -- planning ------------------------------------------------------------------------------------


@dataclass
class _Plan:
    tasks: list[Task] = field(default_factory=list)
    scan_failures: list[tuple[ScanFailure, int | None]] = field(default_factory=list)
    removed_ids: list[int] = field(default_factory=list)
    unchanged: int = 0
    previously_failed: int = 0

    def add(self, item: FoundFile, previous: store.KnownFile | None) -> None:
        """A file found on disk, with its row from an earlier run if it has one."""
        if not (previous and _unchanged(previous, item)):
            self.tasks.append(_task(item, previous))
        elif previous.status == store.STATUS_INDEXED and not previous.has_signature:
            self.tasks.append(replace(_task(item, previous), signature_only=True))
        else:
            self.unchanged += previous.status == store.STATUS_INDEXED
            self.previously_failed += previous.status == store.STATUS_FAILED


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
                else:
                    plan.add(item, previous)
            # Imported rows were never files here: one missing from the folder has not vanished.
            plan.removed_ids.extend(
                k.id for path, k in known.items() if path not in seen and k.status != store.STATUS_IMPORTED
            )
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


def _task(item: FoundFile, previous: store.KnownFile | None) -> Task:
    if previous is None:
        return Task(item.path, item.size, item.mtime_ns)
    old_hash = previous.content_hash if previous.status == store.STATUS_INDEXED else None
    return Task(item.path, item.size, item.mtime_ns, replaces=previous.id, old_hash=old_hash)


# -- the run -------------------------------------------------------------------------------------


def index_folders(
    library: Library,
    folders: Iterable[str],
    *,
    progress: ProgressFn | None = None,
    decoders: DecoderPool | ClusterDecoders | None = None,
) -> IndexReport:
    """Index every image below `folders`; files that vanished from them are removed.

    `decoders`: a pool the caller started early (see `indexer.decode_worker`), or the decoders
    of a Ray cluster (`indexer.cluster`); closed here."""
    roots = [os.path.abspath(f) for f in folders]
    for root in roots:
        if not is_utf8(root):  # paths are stored as UTF-8 text
            raise LookalikeError(f"folder name is not valid UTF-8: {escaped_path(root)} (rename it to index it)")
        if not os.path.isdir(root):
            raise LookalikeError(f"not a folder: {root}")
    return _index(library, roots, lambda: _plan(library, roots), progress, decoders)


def index_files(
    library: Library,
    paths: Iterable[str],
    *,
    progress: ProgressFn | None = None,
    decoders: DecoderPool | None = None,
) -> IndexReport:
    """Index these image files (e.g. the labelled images of a head); nothing else is touched."""
    files = sorted({os.path.abspath(p) for p in paths})
    return _index(library, [], lambda: _plan_files(library, files), progress, decoders)


def decoder_pool(settings) -> DecoderPool:
    return DecoderPool(decoder_count(settings))


def _plan_files(library: Library, files: list[str]) -> _Plan:
    plan = _Plan()
    with library.sessions() as session:
        known = store.files_by_paths(session, files)
    for path in files:
        previous = known.get(path)
        try:
            st = os.stat(path)
        except OSError as exc:
            plan.scan_failures.append((ScanFailure(path, os_reason(exc)), previous.id if previous else None))
            continue
        plan.add(FoundFile(path, st.st_size, st.st_mtime_ns), previous)
    return plan


def _index(library: Library, roots: list[str], make_plan, progress, decoders: DecoderPool | None) -> IndexReport:
    started = time.perf_counter()
    pool = decoders or decoder_pool(library.settings)
    # The decoders own the cores. BLAS threads here (tagging) would spin against them: on two
    # busy cores the ImageNet head took 1.5 ms an image with two OpenBLAS threads.
    with pool, library.write_lock(), threadpool_limits(limits=1, user_api="blas"):
        backbone = library.backbone()
        with library.sessions.begin() as session:
            backbone_id = store.ensure_backbone(session, backbone.name, backbone.dim).id
            store.add_roots(session, roots)
            ensure_builtin_heads(session, backbone, backbone_id)
        index = library.index()
        plan = make_plan()
        # Whether a run killed before its duplicate check left images unchecked (then every
        # image is asked about; else only this run's new ones).
        unchecked_before = bool(plan.tasks) and duplicate_scan.expect_new_images(library)
        report = IndexReport(unchanged=plan.unchanged, previously_failed=plan.previously_failed)
        writer = _BatchWriter(library, index, backbone, backbone_id, report)
        for failure, replaces in plan.scan_failures:
            writer.add_failure(Task(failure.path, 0, 0, replaces=replaces), failure.reason)
        if plan.tasks:
            pool.options, known = _decode_options(
                library, backbone, backbone_id, on_cluster=isinstance(pool, ClusterDecoders)
            )
            _run_decoders(pool, plan.tasks, writer, progress, known)
        elif progress:
            progress(0, 0)
        writer.flush()  # scan failures when nothing needed decoding
        if plan.removed_ids:
            with library.sessions.begin() as session:
                store.delete_images(session, plan.removed_ids)
                checkpoint("commit")
            checkpoint("committed")
            index.remove(plan.removed_ids)
            report.removed = len(plan.removed_ids)
        if writer.dirty or plan.removed_ids or index.generation == 0:
            library.save_index(index, backbone.name)
        library.tags_changed()
        if plan.tasks:  # the new images' duplicates are known when the run ends
            written = None if unchecked_before else writer.written
            report.duplicates = duplicate_scan.update(library, images=written)
    report.seconds = time.perf_counter() - started
    return report


def _decode_options(
    library: Library, backbone, backbone_id: int, *, on_cluster: bool = False
) -> tuple[DecodeOptions, frozenset[str]]:
    """The decoders' settings, with the content already indexed written where they can read it."""
    settings = library.settings
    scratch = settings.resolved_home / "tmp"
    for stale in scratch.glob("known-hashes-*.bin"):  # left by a killed run; we hold the write lock
        stale.unlink(missing_ok=True)
    with library.sessions() as session:
        known = frozenset(store.indexed_hashes(session, backbone_id))
    known_file = None
    if known:
        known_file = scratch / f"known-hashes-{os.getpid()}.bin"
        write_known_hashes(known_file, known)
    # Decoders embed with the ONNX model file on their CPU; the torch runtime, and a model on a
    # GPU, embed their pixels here (in batch_size batches).
    # A Ray cluster gets the model file whatever this machine has: its nodes have their own devices.
    onnx = isinstance(backbone, OnnxBackbone) and (backbone.device == "cpu" or on_cluster)
    options = DecodeOptions(
        backbone.preprocess,
        settings.max_image_pixels,
        settings.max_file_bytes,
        str(known_file) if known_file else None,
        model_file=str(backbone.model_path) if onnx else None,
        model_runtime=settings.runtime,
        model_threads=embed_threads(settings),
    )
    return options, known


def _run_decoders(pool: DecoderPool, tasks: list[Task], writer: _BatchWriter, progress, known) -> None:
    total = len(tasks)
    if progress:
        progress(0, total)
    try:
        if isinstance(pool, ClusterDecoders):
            _run_on_cluster(pool, tasks, writer, progress)
        else:
            _run_locally(pool, tasks, writer, progress, known)
    finally:
        if pool.options.known_hashes_file:
            Path(pool.options.known_hashes_file).unlink(missing_ok=True)


def _run_locally(pool: DecoderPool, tasks: list[Task], writer: _BatchWriter, progress, known) -> None:
    total = len(tasks)
    remaining, prefetched = pool.claim_prefetched(tasks)
    # Signature-only files are decoded although their bytes are indexed (force), for the signature.
    chunks = deque(
        [(t, t.signature_only) for t in remaining[i : i + CHUNK_FILES]] for i in range(0, len(remaining), CHUNK_FILES)
    )
    max_inflight = pool.workers * READ_AHEAD_CHUNKS
    done = 0
    while chunks or pool.inflight or prefetched:
        while chunks and len(pool.inflight) + len(prefetched) < max_inflight and pool.submit(chunks[0]):
            chunks.popleft()
        if prefetched:
            results = _prefetched_results(prefetched.popleft(), known, chunks)
        else:
            results = pool.next_results()
        retries = []
        for decoded in results:
            checkpoint("decode")
            retries += writer.add(decoded)
            done += 1
        if not chunks and not pool.inflight and not prefetched:
            retries += writer.flush()
        # A file whose twin vanished or changed in this very run is decoded after all.
        done -= len(retries)
        chunks.extend([(t, True)] for t in retries)
        if progress:
            progress(done, total)


def _run_on_cluster(cluster: ClusterDecoders, tasks: list[Task], writer: _BatchWriter, progress) -> None:
    """The same writer fed by a Ray cluster's decoders (see indexer.cluster)."""
    total, done = len(tasks), 0
    jobs = [(t, t.signature_only) for t in tasks]
    while jobs:
        retries = []
        for results in cluster.decode(jobs):
            for decoded in results:
                checkpoint("decode")
                retries += writer.add(decoded)
                done += 1
            if progress:
                progress(done, total)
        retries += writer.flush()
        done -= len(retries)  # a file whose twin vanished or changed in this very run: decoded after all
        jobs = [(t, True) for t in retries]


def _prefetched_results(claimed, known: frozenset[str], chunks: deque) -> list[Decoded]:
    future, mapping = claimed
    try:
        results = future.result()
    except BrokenProcessPool:  # a decoder died: decode these the usual way, which isolates the culprit
        chunks.append([(task, task.signature_only) for task in mapping.values()])
        return []
    return [adopt(d, mapping[file_key(d.task)], known) for d in results if file_key(d.task) in mapping]


class _BatchWriter:
    """Collects decoded (and mostly embedded) files, and commits full batches of rows and vectors together."""

    def __init__(self, library: Library, index, backbone, backbone_id: int, report: IndexReport):
        self.library = library
        self.index = index
        self.backbone = backbone
        self.backbone_id = backbone_id
        self.report = report
        self.batch_size = library.settings.batch_size
        with library.sessions() as session:
            self.heads = load_heads(session, backbone_id)  # every head tags every new image
        self.to_embed: list[Decoded] = []
        self.ready: list[tuple[Task, NewImage]] = []  # failures: rows needing no vector
        self.reuse: list[Decoded] = []  # bytes already indexed or in this batch: no model call
        self.touched: dict[int, tuple[int, int]] = {}
        self.signatures: dict[int, bytes] = {}  # for rows indexed before there were signatures
        self.hash_to_id: dict[str, int] = {}  # content embedded earlier in this run
        self.dirty = False
        self.written: list[int] = []  # ids of the rows this run wrote: the duplicate check's
        self.last_save = time.monotonic()

    def add_failure(self, task: Task, reason: str) -> None:
        self.ready.append((task, NewImage(task.path, task.size, task.mtime_ns, error=reason)))
        self.report.failed.append((task.path, reason))

    def add(self, decoded: Decoded) -> list[Task]:
        task = decoded.task
        if decoded.error:
            self.add_failure(task, decoded.error)
        elif task.signature_only and decoded.content_hash == task.old_hash:
            if decoded.info is not None and decoded.info.signature is not None:
                self.signatures[task.replaces] = decoded.info.signature
            self.report.unchanged += 1
        elif not decoded.has_content and decoded.content_hash == task.old_hash:
            self.touched[task.replaces] = (task.size, task.mtime_ns)  # touched, same bytes
            self.report.unchanged += 1
        elif not decoded.has_content or decoded.content_hash in self.hash_to_id or self._in_batch(decoded):
            decoded.drop_content()
            self.reuse.append(decoded)
        else:
            self.to_embed.append(decoded)
        waiting = len(self.ready) + len(self.reuse) + len(self.signatures)
        if len(self.to_embed) >= self.batch_size or waiting >= 4 * self.batch_size:
            return self.flush()
        return []

    def _in_batch(self, decoded: Decoded) -> bool:
        return any(d.content_hash == decoded.content_hash for d in self.to_embed)

    def flush(self) -> list[Task]:
        """Embed, write one transaction, then update the in-memory index. Returns tasks to retry."""
        items = list(self.ready)
        batch_vectors: dict[str, tuple[np.ndarray, float]] = {}
        if self.to_embed:
            checkpoint("embed")
            self._embed_pixels()
            self.report.embedded += len(self.to_embed)
            for decoded in self.to_embed:
                items.append((decoded.task, _row(decoded, decoded.vector, decoded.norm)))
                batch_vectors[decoded.content_hash] = (decoded.vector, decoded.norm)
        reused, retries = self._resolve_reused(batch_vectors)
        items += reused
        if items or self.touched or self.signatures:
            self._commit(items)
        self.to_embed, self.ready, self.reuse, self.touched, self.signatures = [], [], [], {}, {}
        return retries

    def _embed_pixels(self) -> None:
        """Embed what the decoders sent as pixels (the torch runtime; a decoder whose model failed)."""
        todo = [d for d in self.to_embed if d.vector is None]
        if todo:
            vectors, norms = self.backbone.embed_with_norms(np.stack([d.pixels for d in todo]))
            for decoded, vector, norm in zip(todo, vectors, norms):
                decoded.vector, decoded.norm, decoded.pixels = vector, float(norm), None

    def _commit(self, items: list[tuple[Task, NewImage]]) -> None:
        rows = [row for _, row in items]
        replaced = [task.replaces for task, _ in items if task.replaces is not None]
        with self.library.sessions.begin() as session:
            ids = store.write_images(session, rows, self.backbone_id, replaced)
            self.written.extend(ids)
            store.touch_images(session, self.touched)
            store.set_signatures(session, self.signatures)
            tagged = [(image_id, row) for image_id, row in zip(ids, rows) if row.vector is not None]
            if tagged and self.heads:  # tags land in the same transaction as their images
                write_tags(
                    session,
                    self.heads,
                    np.array([i for i, _ in tagged]),
                    np.stack([r.vector for _, r in tagged]),
                    np.array([np.nan if r.norm is None else r.norm for _, r in tagged], dtype=np.float32),
                    new_ids=True,
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
        self.dirty = self.dirty or bool(items)  # new sizes, times or signatures leave FAISS as it was
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
                decoded.info = ImageInfo(twin.width, twin.height, twin.format, twin.signature)
                vector, norm = twin.vector, twin.norm
            elif digest in batch_vectors:
                vector, norm = batch_vectors[digest]
                decoded.info = next(d.info for d in self.to_embed if d.content_hash == digest)
            else:
                retries.append(decoded.task)  # its twin was removed or changed in this very run
                continue
            items.append((decoded.task, _row(decoded, vector, norm)))
        return items, retries


def _row(decoded: Decoded, vector: np.ndarray | None, norm: float | None = None) -> NewImage:
    task, info = decoded.task, decoded.info
    return NewImage(
        task.path,
        task.size,
        task.mtime_ns,
        content_hash=decoded.content_hash,
        width=info.width if info else None,
        height=info.height if info else None,
        format=info.format if info else None,
        signature=info.signature if info else None,
        vector=vector,
        norm=norm,
    )
