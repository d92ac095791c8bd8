"""Decoder processes for `lookalike index`: read, hash, decode and embed files in parallel.

Each process also runs the exported ONNX model, single-threaded, on the files it decoded, and
sends back vectors (5 kB a file) instead of pixels (150 kB). One process per core that alternates
decoding and inference keeps every core on one task: a model with one thread per core in the
parent, beside decoder processes on the same cores, loses a third of its speed whenever a
decoder preempts one of its threads (all of them wait at the end of every layer), and on two
cores the dataset photos indexed at 0.6x the raw model's speed that way.

Kept apart from the pipeline so that a worker imports only Pillow, NumPy and `indexer.decode`
(a fifth of the pipeline's import time), and so that the pool can start before the parent has
opened the database or loaded the model. Started that early, from a process with one thread and
no model runtime yet, workers are forked: they begin at once and share the parent's imports.
Started later (a server, a test, a pool that broke), they are spawned, since forking a process
that runs ONNX Runtime or torch thread pools can deadlock the child.
"""

from __future__ import annotations

import faulthandler
import hashlib
import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from indexer.backbones import ModelSession, Preprocess, model_session
from indexer.decode import ImageInfo, decode_for_model
from indexer.errors import ImageRejected, LookalikeError
from indexer.faults import checkpoint

_DIGEST_BYTES = 20  # blake2b-160: content hashes as stored in the database (40 hex digits)
CHUNK_FILES = 4  # files per decoder task: amortises inter-process overhead
READ_AHEAD_CHUNKS = 4  # chunks queued per worker: bounded read-ahead keeps memory flat however large the folder


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=_DIGEST_BYTES).hexdigest()


@dataclass(frozen=True)
class Task:
    path: str
    size: int
    mtime_ns: int
    replaces: int | None = None  # the image id this file had before it changed
    old_hash: str | None = None
    # An unchanged file indexed before images had pixel signatures: decoded for its signature only.
    signature_only: bool = False


@dataclass
class Decoded:
    task: Task
    content_hash: str | None = None
    pixels: np.ndarray | None = None  # the model's input, when the parent embeds (see DecodeOptions)
    vector: np.ndarray | None = None  # unit-length embedding, when the decoder embedded it
    norm: float | None = None  # the embedding's length before normalisation
    info: ImageInfo | None = None
    error: str | None = None

    @property
    def has_content(self) -> bool:
        """Decoded for the model: False when the bytes are indexed already (or on error)."""
        return self.pixels is not None or self.vector is not None

    def drop_content(self) -> None:
        """The stored vector of the same bytes is reused instead."""
        self.pixels = self.vector = self.norm = None


@dataclass(frozen=True)
class DecodeOptions:
    """What every decoder needs to know; sent with each chunk, so a pool can start before it is known."""

    preprocess: Preprocess
    max_pixels: int
    max_bytes: int
    known_hashes_file: str | None = None  # content already indexed: hashed, not decoded
    # The exported ONNX model the decoders embed with, and its runtime; None (the torch runtime,
    # or a GPU in the parent): they send pixels and the parent embeds them.
    model_file: str | None = None
    model_runtime: str = "openvino"
    model_threads: int = 1
    model_device: str = "cpu"  # a Ray embed stage's actors may hold a GPU (indexer.cluster)


Job = tuple[Task, bool]  # (task, force): force decodes even bytes that are already indexed
FileKey = tuple[str, int, int]  # (path, size, mtime_ns): the same file, unchanged


def file_key(task: Task) -> FileKey:
    return (task.path, task.size, task.mtime_ns)


def adopt(decoded: Decoded, task: Task, known: frozenset[str]) -> Decoded:
    """A prefetched result, as the run's own decoder would have returned it for `task`."""
    if decoded.has_content and (decoded.content_hash == task.old_hash or decoded.content_hash in known):
        decoded.drop_content()  # bytes already indexed: their stored vector is reused
    decoded.task = task
    return decoded


def write_known_hashes(path: Path, hashes: frozenset[str]) -> None:
    """The hashes as packed 20-byte digests: 2 MB for 100k images, read once per worker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(bytes.fromhex(h) for h in hashes))


# -- inside a decoder process ---------------------------------------------------------------------

_known: dict[str | None, frozenset[str]] = {None: frozenset()}


def _known_hashes(path: str | None) -> frozenset[str]:
    if path not in _known:
        data = Path(path).read_bytes()
        _known.clear()  # one run's set at a time
        _known[None] = frozenset()
        _known[path] = frozenset(data[i : i + _DIGEST_BYTES].hex() for i in range(0, len(data), _DIGEST_BYTES))
    return _known[path]


def _init_worker() -> None:
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a spawned decoder too: see cli.main


def _exit_with_parent() -> None:
    """A killed indexer (kill -9) cannot shut its pool down; its decoders must not linger as orphans."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()  # waits on the parent's sentinel: returns when the parent process is gone
        os._exit(1)


def _ready() -> None:
    """Warm-up task: the worker has started and imported this module."""


def decode_chunk(options: DecodeOptions, jobs: list[Job]) -> list[Decoded]:
    """What one decoder does with a chunk of files, here or on a Ray node (`indexer.cluster`)."""
    results = [decode_one(options, task, force) for task, force in jobs]
    if options.model_file:
        embed_decoded(options, results)
    return results


_sessions: dict[tuple[str, str, int, str], ModelSession] = {}


def embed_decoded(options: DecodeOptions, decoded: list[Decoded]) -> None:
    """Replace the pixels among `decoded` with their vectors, in one model call."""
    decoded = [d for d in decoded if d.pixels is not None]
    if not decoded:
        return
    key = (options.model_file, options.model_runtime, options.model_threads, options.model_device)
    if key not in _sessions:
        _sessions.clear()  # one run's model at a time
        _sessions[key] = model_session(
            options.model_runtime, options.model_file, options.model_threads, spin=False, device=options.model_device
        )
    try:
        vectors, norms = _sessions[key].run(np.stack([d.pixels for d in decoded]))
    except Exception:  # noqa: BLE001 - e.g. an unreadable model file: not these images' fault
        return  # the parent embeds the pixels with its own session, and reports a model error clearly
    for d, vector, norm in zip(decoded, vectors, norms):
        d.vector, d.norm, d.pixels = vector, float(norm), None


def decode_one(options: DecodeOptions, task: Task, force: bool = False) -> Decoded:
    try:
        if task.size > options.max_bytes:
            return Decoded(task, error=f"file too large ({task.size} bytes > {options.max_bytes})")
        with open(task.path, "rb") as fh:
            data = fh.read(options.max_bytes + 1)
    except OSError as exc:
        return Decoded(task, error=os_reason(exc))
    digest = content_hash(data)
    if not force and (digest == task.old_hash or digest in _known_hashes(options.known_hashes_file)):
        return Decoded(task, content_hash=digest)
    # Testing hook: LOOKALIKE_FAULTS="decoder:NAME:1=kill" kills the decoder that reaches the file
    # named NAME, as a codec crashing on a hostile file would (see indexer/faults.py).
    checkpoint(f"decoder:{os.path.basename(task.path)}")
    try:
        pixels, info = decode_for_model(data, options.preprocess, max_pixels=options.max_pixels)
    except ImageRejected as exc:
        return Decoded(task, content_hash=digest, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - e.g. MemoryError: one file must not stop the run
        return Decoded(task, content_hash=digest, error=f"cannot decode image ({type(exc).__name__}: {exc})")
    return Decoded(task, content_hash=digest, pixels=pixels, info=info)


def os_reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "file disappeared during the run"
    if isinstance(exc, IsADirectoryError):
        return "is a folder"
    return f"cannot read file ({exc.strerror or exc})"


# -- in the indexing process ----------------------------------------------------------------------


def decoder_count(settings) -> int:
    return settings.decode_workers or os.cpu_count() or 1


def embed_threads(settings) -> int:
    """Model threads per decoder: the inference threads shared out (one each by default)."""
    return max(1, (settings.threads or os.cpu_count() or 1) // decoder_count(settings))


def prefetch_options(settings) -> DecodeOptions | None:
    """Decode options for a run that has not opened its home yet, if its backbone was exported before."""
    from indexer.backbones import DEFAULT_BACKBONE, EXPORTED_RUNTIMES, cached_model

    if settings.runtime not in EXPORTED_RUNTIMES:
        return None
    from indexer.device import resolve_device

    try:
        parent_embeds = resolve_device(settings.device, settings.runtime) == "cuda"
    except LookalikeError:
        return None  # the run itself reports it

    cache = settings.model_cache or settings.resolved_home / "models"
    found = cached_model(settings.backbone or DEFAULT_BACKBONE, cache, settings.clip_weights)
    if found is None:
        return None
    model_path, preprocess = found
    return DecodeOptions(
        preprocess,
        settings.max_image_pixels,
        settings.max_file_bytes,
        model_file=None if parent_embeds else str(model_path),  # the GPU is the parent's
        model_runtime=settings.runtime,
        model_threads=embed_threads(settings),
    )


def _fork_is_safe() -> bool:
    """Only a process with no other threads and no model runtime loaded may fork its decoders."""
    loaded_runtime = any(name in sys.modules for name in ("onnxruntime", "openvino", "torch"))
    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1 and not loaded_runtime


class DecoderPool:
    """Decoder processes that outlive a decoder's death.

    When a worker dies (a codec crashing on a hostile file, the OOM killer, a kill), the executor
    fails every chunk in flight with BrokenProcessPool. Those chunks are then decoded again one
    file at a time in a separate process, which pins the death on the file(s) that cause it; those
    are reported as failed ("decoder crashed (signal 11, SIGSEGV)") and the run carries on with a
    fresh pool.
    """

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.options: DecodeOptions | None = None
        self.inflight: deque[tuple[Future, list[Job]]] = deque()
        self._prefetched: list[tuple[Future, list[Task]]] = []
        self._prefetch_options: DecodeOptions | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._isolated: IsolatedDecoder | None = None
        self.start_method = "fork" if _fork_is_safe() else "spawn"

    @property
    def read_ahead_files(self) -> int:
        return self.workers * READ_AHEAD_CHUNKS * CHUNK_FILES

    def start(self) -> DecoderPool:
        """Start every worker now (not at the first file), so they get going while the caller loads the rest."""
        executor = self._executor()
        for _ in range(self.workers):
            executor.submit(_ready)
        return self

    def prefetch(self, options: DecodeOptions, files: Iterable[Task], limit: int | None = None) -> None:
        """Decode the first files of a run while the caller still opens the database and loads the model.

        The results are used only for files the run then plans to decode, with the same options
        (claim_prefetched). At most `limit` files (default: as much as the run itself reads ahead,
        `read_ahead_files`), so memory stays bounded, and at most that many decodes are wasted on
        files that are unchanged."""
        self._prefetch_options = options
        limit = limit or self.read_ahead_files
        tasks = []
        for task in files:
            tasks.append(task)
            if len(tasks) >= limit:
                break
        executor = self._executor()
        for i in range(0, len(tasks), CHUNK_FILES):
            chunk = tasks[i : i + CHUNK_FILES]
            self._prefetched.append((executor.submit(decode_chunk, options, [(t, True) for t in chunk]), chunk))

    def claim_prefetched(self, tasks: list[Task]) -> tuple[list[Task], deque[tuple[Future, dict[FileKey, Task]]]]:
        """Split `tasks` into those still to decode and the prefetched chunks that cover the rest."""
        prefetched, self._prefetched = self._prefetched, []
        claimed: deque[tuple[Future, dict[FileKey, Task]]] = deque()
        if not prefetched:
            return tasks, claimed
        if self._prefetch_options != replace(self.options, known_hashes_file=None):
            for future, _ in prefetched:
                future.cancel()
            return tasks, claimed
        wanted = {file_key(t): t for t in tasks}
        for future, chunk in prefetched:
            mapping = {file_key(t): wanted[file_key(t)] for t in chunk if file_key(t) in wanted}
            if mapping:
                claimed.append((future, mapping))
            else:
                future.cancel()
        covered = {key for _, mapping in claimed for key in mapping}
        return [t for t in tasks if file_key(t) not in covered], claimed

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._isolated is not None:
            self._isolated.close()
            self._isolated = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=get_context(self.start_method), initializer=_init_worker
            )
            self.start_method = "spawn"  # replacements start after the model runtime is loaded
        return self._pool

    def _drop_broken_pool(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def submit(self, chunk: list[Job]) -> bool:
        """False if the pool just broke: next_results() then sorts out the chunks in flight."""
        try:
            future = self._executor().submit(decode_chunk, self.options, chunk)
        except BrokenProcessPool:
            if self.inflight:
                return False
            self._drop_broken_pool()  # a worker died with nothing to do: nothing to re-run
            future = self._executor().submit(decode_chunk, self.options, chunk)
        self.inflight.append((future, chunk))
        return True

    def next_results(self) -> list[Decoded]:
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
            self._isolated = IsolatedDecoder()
        return results + [self._isolated.decode(self.options, job) for job in suspects]


class IsolatedDecoder:
    """One decoder process fed one file at a time: if it dies, that file killed it (or its model call did)."""

    def __init__(self):
        self.proc = None
        self.conn = None

    def _start(self) -> None:
        ctx = get_context("spawn")
        self.conn, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=_isolated_worker, args=(child_end,), daemon=True)
        self.proc.start()
        child_end.close()
        try:
            self.conn.recv()  # "ready": it imported everything and ran the initializer
        except (EOFError, OSError):
            self.proc.join()
            raise LookalikeError(f"decoder processes cannot start ({_death(self.proc.exitcode)})") from None

    def decode(self, options: DecodeOptions, job: Job) -> Decoded:
        if self.proc is None:
            self._start()
        try:
            self.conn.send((options, job))
            return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join()
            reason = f"decoder crashed ({_death(self.proc.exitcode)})"
            self.conn.close()
            self.proc = self.conn = None
            return Decoded(job[0], error=reason)

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


def _isolated_worker(conn) -> None:
    _init_worker()
    conn.send("ready")
    while (message := conn.recv()) is not None:
        options, job = message
        conn.send(decode_chunk(options, [job])[0])


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {-exitcode}, {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"
