"""Decode and embed on a Ray cluster (`lookalike index --ray ADDRESS`): the local decoders' code,
scheduled by Ray Data.

Only the work of the decoder processes moves: each chunk of files goes through
`decode_worker.decode_chunk`, the very function a local decoder runs (read, hash, decode with the
same limits and EXIF handling, embed with the exported ONNX model), inside Ray Data actors that
keep the model session open between chunks (`map_batches` over the chunks). Planning, the
commits, the tags and the FAISS index stay in this process, as for a local run
(`indexer.pipeline`): rows are written once, by one writer, whatever Ray retries.

Files are read by path on the node that decodes them, so every node must see the folders at the
same path (a shared file system); a probe task on every node checks that, and the lookalike
version, before anything is decoded. The model file and the hashes already indexed travel
through Ray's object store, so nodes need neither the home nor the model cache.

With GPUs in the cluster (`LOOKALIKE_DEVICE=auto|cuda`), decoding and embedding become two
stages: decoder actors on one CPU each send pixels to embed actors that hold one GPU each and run
the same session code on CUDA (`decode_worker.embed_decoded`). Embed actors reserve no CPU: a
decoder pool that took every CPU of a GPU node would otherwise leave no room for them to start,
and the job would never make progress.

Ray retries a chunk whose actor or node died; a chunk that fails even so (a file that kills its
decoder every time) comes back missing, and is decoded here one file at a time in a process of
its own, which pins the failure on the file, as a local run does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import socket
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from indexer import __version__
from indexer.decode_worker import (
    Decoded,
    DecodeOptions,
    IsolatedDecoder,
    Job,
    decode_chunk,
    embed_decoded,
    file_key,
)
from indexer.device import check_device, missing_cuda_runtime, visible_gpus
from indexer.errors import LookalikeError

RAY_EXTRA_HINT = "pip install 'lookalike[ray]'"
CHUNK_FILES = 32  # files per Ray Data row: large enough that Ray's per-row cost stays small
CONNECT_TIMEOUT_S = 5
PROBE_TIMEOUT_S = 60  # a node's answer to the probe; a node starting a worker on a busy machine takes seconds
RETRIES = 2  # attempts of a chunk after its actor died, before it counts as failed here


def _ray():
    try:
        import ray
    except ImportError:
        raise LookalikeError(f"indexing on a Ray cluster needs Ray: {RAY_EXTRA_HINT}") from None
    return ray


class ClusterDecoders:
    """Stands in for `decode_worker.DecoderPool` in a run whose decoding happens on a Ray cluster."""

    def __init__(self, address: str, folders: list[str], *, actors: int = 0, device: str = "auto"):
        check_device(device)
        if address.startswith("ray://"):
            # Ray Data needs a driver that is part of the cluster (ray-project/ray#48682): through
            # Ray Client it fails deep in its executor, after the cluster has been set to work.
            raise LookalikeError(
                f"{address} is a Ray Client address, and Ray Data (which schedules the decoders) "
                "does not run through Ray Client: run `lookalike index --ray HOST:PORT` (the head's "
                "port, 6379 by default) on a machine of the cluster, or submit it as a Ray job: "
                "`ray job submit --address http://HEAD:8265 -- lookalike index --ray auto DIR`"
            )
        ray = _ray()
        self.options: DecodeOptions | None = None
        self.note: str | None = None  # how the work is spread, for the user
        self._isolated: IsolatedDecoder | None = None
        _check_reachable(address)
        try:
            # The driver's output is ours; the workers' logs stay in Ray's session folder.
            ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError, by version
            raise LookalikeError(f"cannot reach the Ray cluster at {address}: {exc}") from None
        try:
            answers = _check_nodes(ray, folders)
            cpus = int(ray.cluster_resources().get("CPU", 0))
            if cpus < 1:
                raise LookalikeError(f"the Ray cluster at {address} has no CPUs to decode on")
            self.embed_gpus, self.note = _plan_gpus(device, address, answers)
            self.embed_device = "cuda"  # what the embed stage's sessions run on
            self.actors = actors or cpus
        except BaseException:
            ray.shutdown()
            raise

    # -- the pool interface the pipeline uses -----------------------------------------------------

    def __enter__(self) -> ClusterDecoders:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._isolated is not None:
            self._isolated.close()
            self._isolated = None
        ray = _ray()
        if ray.is_initialized():
            ray.shutdown()

    def decode(self, jobs: list[Job]) -> Iterator[list[Decoded]]:
        """Results chunk by chunk, in the order the cluster finishes them; each job exactly once."""
        ray = _ray()
        from ray.data import DataContext

        context = DataContext.get_current()
        context.max_errored_blocks = -1  # a chunk that fails for good is redone here, not the run
        context.enable_progress_bars = False
        # Ray Data narrates every execution at INFO on stderr: the run's own progress says it all.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        model = _file_bytes(self.options.model_file)
        known = _file_bytes(self.options.known_hashes_file)
        chunks = [jobs[i : i + CHUNK_FILES] for i in range(0, len(jobs), CHUNK_FILES)]
        rows = ray.data.from_items([{"jobs": pickle.dumps(chunk)} for chunk in chunks])
        model_ref = ray.put(model)
        gpu_stage = bool(self.embed_gpus and model)
        decoder_model = None if gpu_stage else model_ref  # decoders then send pixels to the GPUs
        decoded = _actor_stage(
            rows,
            ChunkDecoder,
            {"options": self.options, "model": decoder_model, "known": ray.put(known)},
            actors=self.actors,
            num_cpus=1,
        )
        if gpu_stage:
            decoded = _actor_stage(
                decoded,
                ChunkEmbedder,
                {"options": self.options, "model": model_ref, "device": self.embed_device},
                actors=self.embed_gpus,
                num_cpus=0,
                num_gpus=1,
            )
        seen: set = set()
        for row in decoded.iter_rows():
            results = [d for d in pickle.loads(row["results"]) if file_key(d.task) not in seen]
            seen.update(file_key(d.task) for d in results)
            yield results
        missing = [job for job in jobs if file_key(job[0]) not in seen]
        if missing:
            if self._isolated is None:
                self._isolated = IsolatedDecoder()
            for job in missing:
                yield [self._isolated.decode(self.options, job)]


def _actor_stage(rows, actor_class, constructor_kwargs: dict, *, actors: int, **resources):
    """`map_batches` over single chunks with an autoscaling pool of up to `actors` actors,
    restarted when they die, each chunk retried RETRIES times before it counts as failed."""
    ray = _ray()
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for the retries (its default retries forever, which
        # a file that kills every decoder would turn into a run that never ends).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return rows.map_batches(
            actor_class,
            fn_constructor_kwargs=constructor_kwargs,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
            max_restarts=-1,
            max_task_retries=RETRIES,
            **resources,
        )


class ChunkDecoder:
    """A Ray Data actor: the model file and the known hashes written to this node's disk once,
    then `decode_chunk` on every chunk it is given (the model session stays open between them)."""

    def __init__(self, options: DecodeOptions, model, known):
        self.options = replace(
            options,
            model_file=_local_copy(_fetched(model), ".onnx"),
            known_hashes_file=_local_copy(_fetched(known), ".bin"),
            model_threads=1,  # one CPU per actor, as Ray reserved it
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [pickle.dumps(decode_chunk(self.options, pickle.loads(jobs))) for jobs in batch["jobs"]]
        return {"results": np.array(out, dtype=object)}


class ChunkEmbedder:
    """A Ray Data actor holding one GPU: embeds the pixels that ChunkDecoder actors sent, with
    the model session the local decoders use, on `device`."""

    def __init__(self, options: DecodeOptions, model, device: str):
        self.options = replace(
            options,
            model_file=_local_copy(_fetched(model), ".onnx"),
            model_runtime="onnx",
            model_threads=1,
            model_device=device,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for blob in batch["results"]:
            decoded = pickle.loads(blob)
            embed_decoded(self.options, decoded)  # a session that fails leaves pixels: the driver embeds those
            out.append(pickle.dumps(decoded))
        return {"results": np.array(out, dtype=object)}


def _plan_gpus(device: str, address: str, answers: list[tuple[dict, dict]]) -> tuple[int, str | None]:
    """(GPUs to embed on, a note on the plan): every GPU Ray counts, when every node that has
    them can run the model there; `cuda` fails clearly where that is not so, `auto` decodes and
    embeds on the CPUs instead and says why."""
    if device == "cpu":
        return 0, None
    gpu_nodes = [(node, answer) for node, answer in answers if node.get("Resources", {}).get("GPU", 0) >= 1]
    if not gpu_nodes:
        if device == "cuda":
            raise LookalikeError(
                f"LOOKALIKE_DEVICE=cuda, but no node of the Ray cluster at {address} has a GPU "
                "(Ray counts a node's GPUs when it starts; `ray start --num-gpus N` declares them)"
            )
        return 0, None
    for node, answer in gpu_nodes:
        declared = int(node["Resources"]["GPU"])
        problem = None
        if answer["gpus"] < 1:
            problem = "shows no CUDA device (no /dev/nvidia*, or CUDA_VISIBLE_DEVICES hides them)"
        elif answer["cuda_missing"]:
            problem = f"needs {answer['cuda_missing']}"
        if problem:
            message = f"Ray node {_node_name(node)} has {declared} GPU(s) for Ray but {problem}"
            if device == "cuda":
                raise LookalikeError(message)
            return 0, f"{message}: embedding on the CPUs"
    gpus = sum(int(node["Resources"]["GPU"]) for node, _ in gpu_nodes)
    return gpus, f"embedding on {gpus} GPU(s) of the cluster, decoding on its CPUs"


def _node_name(node: dict) -> str:
    return f"{node['NodeManagerAddress']} (node {node['NodeID'][:8]})"


def _check_reachable(address: str) -> None:
    """Fail in seconds on HOST:PORT where nothing listens: ray.init would retry for minutes."""
    host_port = address.removeprefix("ray://")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local": Ray finds (or refuses) the cluster itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise LookalikeError(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} "
            "(is `ray start --head` running there, and is this the port it printed?)"
        ) from None


def _file_bytes(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _fetched(value):
    """An actor's constructor argument: the object behind a Ray reference, or the value itself."""
    ray = _ray()
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _local_copy(data: bytes | None, suffix: str) -> str | None:
    """`data` in a file of this node named by its digest (written once, atomically)."""
    if data is None:
        return None
    folder = Path(tempfile.gettempdir()) / "lookalike-ray"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (hashlib.blake2b(data, digest_size=16).hexdigest() + suffix)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


def _check_nodes(ray, folders: list[str]) -> list[tuple[dict, dict]]:
    """One probe task on every alive node: the folders exist there, and lookalike is this version.
    Returns (node, its answer) for the nodes that answered."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    pending = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(folders)
        for n in nodes
    ]
    answers = []
    for node, ref in zip(nodes, pending):
        try:
            answers.append((node, ray.get(ref, timeout=PROBE_TIMEOUT_S)))
        except ray.exceptions.RayError:
            # A node that died moments ago is listed alive until its heartbeats time out; it
            # takes no work either, so it is not asked again.
            continue
    if not answers:
        raise LookalikeError("no node of the Ray cluster answered (are its nodes up?)")
    refuse_mismatches(answers, installed_version())
    return answers


def refuse_mismatches(answers: list[tuple[dict, dict]], here: str) -> None:
    """A clear error for the first node that runs another lookalike or cannot see a folder."""
    for node, answer in answers:
        name = _node_name(node)
        if answer["version"] != here:
            raise LookalikeError(
                f"Ray node {name} runs lookalike {answer['version']}, this machine {here}: "
                "install the same version on every node"
            )
        for path, reason in answer["unreadable"]:
            raise LookalikeError(
                f"Ray node {name} cannot read {path} ({reason}): every node must see the folders "
                "at the same path (a shared file system)"
            )


def installed_version() -> str:
    """lookalike's version as installed (its distribution's metadata), else the package's own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lookalike")
    except PackageNotFoundError:
        return __version__


def _probe(folders: list[str]) -> dict:
    unreadable = []
    for path in folders:
        if not os.path.isdir(path):
            unreadable.append((path, "no such folder"))
        elif not os.access(path, os.R_OK | os.X_OK):
            unreadable.append((path, "permission denied"))
    gpus = visible_gpus()
    return {
        "version": installed_version(),
        "unreadable": unreadable,
        "gpus": gpus,
        "cuda_missing": missing_cuda_runtime("onnx") if gpus else None,
    }
