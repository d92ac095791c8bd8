"""`lookalike index --ray ADDRESS` on a real multi-node Ray cluster (tests/ray_cluster.py).

The cluster runs on this machine in a network namespace of its own: a head without CPUs and two
worker nodes of one CPU each, so every file decoded was decoded on a worker node. Checked: a Ray
run stores what a local run stores (rows, failures, vectors to float32 precision); an incremental
second run; a worker node killed in the middle of a run costs nothing (every file indexed
exactly once, nothing reported failed that is not bad); the setups refused with a clear error
(a ray:// Ray Client address and another lookalike version on a node among them); and GPUs: a
node declaring one it cannot use, and the GPU embed stage's code run here on the CPU.
"""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from faults.faultlib import build_corpus, cli
from ray_cluster import RayCluster, ray_env

import databases
from indexer.errors import LookalikeError
from indexer.store import vector_from_bytes

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray = RayCluster(tmp_path_factory.mktemp("ray"))
    try:
        yield ray.start(workers=2)
    finally:
        ray.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """120 photos and variants, a truncated JPEG and a text file named .jpg."""
    folder = tmp_path_factory.mktemp("corpus") / "photos"
    paths = build_corpus(folder, extra=40)
    (folder / "bad").mkdir()
    (folder / "bad" / "truncated.jpg").write_bytes(paths[0].read_bytes()[:700])
    (folder / "bad" / "notes.jpg").write_text("not an image")
    return folder


def run_index(
    cluster: RayCluster | None,
    home: Path,
    model_cache: Path,
    folder: Path,
    *extra: str,
    wait=True,
    env=None,
    address: str | None = None,
):
    env = (cluster.env if cluster is not None else ray_env)(
        LOOKALIKE_HOME=str(home), LOOKALIKE_MODEL_CACHE=str(model_cache), **databases.home_env(home), **(env or {})
    )
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    command = cli("index", str(folder), "-q", *extra)
    if cluster is not None:
        command = cluster.netns(*command[:3], "index", str(folder), "-q", "--ray", address or cluster.address, *extra)
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def stored(home: Path) -> dict[str, tuple]:
    """path -> (status, content hash, error, vector) as the database holds them."""
    url = databases.resolved_url(home)
    if url.startswith("sqlite"):
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        rows = db.execute(
            "SELECT i.path, i.status, i.content_hash, i.error, e.vector FROM images i "
            "LEFT JOIN embeddings e ON e.image_id = i.id"
        ).fetchall()
        db.close()
    else:
        from sqlalchemy import create_engine, text

        engine = create_engine(url)
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT i.path, i.status, i.content_hash, i.error, e.vector FROM images i "
                    "LEFT JOIN embeddings e ON e.image_id = i.id"
                )
            ).fetchall()
        engine.dispose()
    out = {}
    for path, status, digest, error, vector in rows:
        assert path not in out, f"{path} stored twice"
        out[path] = (status, digest, error, None if vector is None else vector_from_bytes(bytes(vector)))
    return out


def rows_so_far(home: Path) -> int:
    """Rows committed by a run in progress (0 before its database exists)."""
    if not databases.is_postgres() and not (home / "lookalike.db").exists():
        return 0
    try:
        return len(stored(home))
    except Exception:  # noqa: BLE001 - no tables yet
        return 0


def assert_same_collection(a: dict[str, tuple], b: dict[str, tuple]) -> None:
    assert a.keys() == b.keys()
    for path in a:
        (status_a, hash_a, error_a, vec_a), (status_b, hash_b, error_b, vec_b) = a[path], b[path]
        assert (status_a, hash_a, error_a) == (status_b, hash_b, error_b), path
        assert (vec_a is None) == (vec_b is None), path
        if vec_a is not None:
            np.testing.assert_allclose(vec_a, vec_b, atol=1e-5, err_msg=path)


def test_a_ray_run_stores_what_a_local_run_stores_and_carries_on_incrementally(cluster, corpus, tmp_path, model_cache):
    local = run_index(None, tmp_path / "local", model_cache, corpus)
    assert local.returncode == 0, local.stderr[-3000:]
    remote = run_index(cluster, tmp_path / "ray", model_cache, corpus)
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert "connecting to the Ray cluster" in remote.stderr
    for name in ("truncated.jpg", "notes.jpg"):
        assert f"bad/{name}: " in remote.stderr  # the same "skipping PATH: REASON" lines
    assert "added 120, updated 0, removed 0, unchanged 0, failed 2" in remote.stderr
    local_rows, ray_rows = stored(tmp_path / "local"), stored(tmp_path / "ray")
    assert_same_collection(local_rows, ray_rows)

    # Incremental: one file changed, one gone, one new; the rest is not decoded again.
    photos = sorted(p for p in corpus.rglob("*.jpg") if "bad" not in p.parts)
    changed, gone = photos[3], photos[4]
    backup = {p: p.read_bytes() for p in (changed, gone)}
    new = corpus / "new" / "copy.jpg"
    try:
        changed.write_bytes(photos[5].read_bytes())
        gone.unlink()
        new.parent.mkdir()
        new.write_bytes(photos[6].read_bytes()[:-10] + b"\xff\xd9" * 5)
        remote = run_index(cluster, tmp_path / "ray", model_cache, corpus)
        assert remote.returncode == 0, remote.stderr[-3000:]
        assert "added 1, updated 1, removed 1, unchanged 118, failed 0 (+2 failed before, unchanged)" in remote.stderr
        local = run_index(None, tmp_path / "local", model_cache, corpus)
        assert local.returncode == 0, local.stderr[-3000:]
        assert_same_collection(stored(tmp_path / "local"), stored(tmp_path / "ray"))
    finally:
        for path, data in backup.items():
            path.write_bytes(data)
        new.unlink(missing_ok=True)


def test_a_worker_node_killed_mid_run_loses_and_duplicates_nothing(cluster, corpus, tmp_path, model_cache):
    home = tmp_path / "home"
    run = run_index(cluster, home, model_cache, corpus, "--batch-size", "8", wait=False)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and run.poll() is None and rows_so_far(home) < 16:
            time.sleep(0.2)
        assert run.poll() is None, "the run ended before a node could be killed"
        cluster.kill("worker1")
        out, err = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
        cluster.add_worker("worker1")  # for the tests after this one
    assert run.returncode == 0, err[-3000:]
    assert "failed 2" in err, err[-1500:]
    rows = stored(home)
    assert len(rows) == 122
    assert sorted(Path(p).name for p, r in rows.items() if r[0] == "failed") == ["notes.jpg", "truncated.jpg"]
    assert all(r[3] is not None for r in rows.values() if r[0] == "indexed")


def test_a_file_that_kills_every_decoder_on_the_cluster_costs_that_file_alone(cluster, corpus, tmp_path, model_cache):
    """On a node whose decoders die at one file (LOOKALIKE_FAULTS, as a codec crashing would),
    Ray retries its chunk, gives up, and the run decodes that chunk here instead: it finishes,
    every file indexed once, nothing reported failed that is not bad."""
    victim = sorted(p for p in corpus.rglob("*.jpg") if "bad" not in p.parts)[10]
    for name in ("worker0", "worker1"):
        cluster.kill(name)
    cluster.add_worker("crashy", LOOKALIKE_FAULTS=f"decoder:{victim.name}:1=kill")
    try:
        home = tmp_path / "home"
        proc = run_index(cluster, home, model_cache, corpus)
    finally:
        cluster.kill("crashy")
        cluster.add_worker("worker0")
        cluster.add_worker("worker1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "added 120, updated 0, removed 0, unchanged 0, failed 2" in proc.stderr
    rows = stored(home)
    assert len(rows) == 122 and rows[str(victim)][0] == "indexed"


def test_refused_setups_say_what_is_wrong(cluster, corpus, tmp_path, model_cache):
    home = tmp_path / "home"
    # Nothing listens there.
    env = cluster.env(LOOKALIKE_HOME=str(home), LOOKALIKE_MODEL_CACHE=str(model_cache), **databases.home_env(home))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run(
        cluster.netns(*cli("index", str(corpus), "-q", "--ray", "127.0.0.1:1")),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "cannot reach the Ray cluster at 127.0.0.1:1" in proc.stderr
    assert "Traceback" not in proc.stderr

    # A Ray Client address: Ray Data does not run through Ray Client; said before connecting.
    proc = run_index(cluster, home, model_cache, corpus, address="ray://127.0.0.1:10001")
    assert proc.returncode == 1 and "does not run through Ray Client" in proc.stderr
    assert "ray job submit" in proc.stderr and "Traceback" not in proc.stderr

    # A folder that does not exist on the nodes (nor here: the local check comes first for a
    # local run, the nodes' probe for a Ray run).
    missing = tmp_path / "elsewhere"
    proc = run_index(cluster, home, model_cache, missing)
    assert proc.returncode == 1 and "cannot read" in proc.stderr and str(missing) in proc.stderr
    assert "Ray node 127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr

    # Ray not installed: an import of ray that fails, as in an environment without the extra.
    shim = tmp_path / "no-ray"
    (shim / "ray").mkdir(parents=True)
    (shim / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env["PYTHONPATH"] = os.pathsep.join([str(shim), env["PYTHONPATH"]])
    proc = subprocess.run(
        cli("index", str(corpus), "-q", "--ray", "auto"), env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1 and "pip install 'lookalike[ray]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_gpu_stage_embeds_what_the_decoders_send_as_a_decoder_would(corpus, model_cache):
    """With GPUs, decoder actors send pixels and embed actors run the same session code: here on
    the CPU (the device is the only difference on a GPU), in this process."""
    from indexer.backbones import DEFAULT_BACKBONE, load_backbone
    from indexer.cluster import ChunkDecoder, ChunkEmbedder
    from indexer.decode_worker import DecodeOptions, Task

    backbone = load_backbone(DEFAULT_BACKBONE, runtime="onnx", cache_dir=model_cache)
    files = sorted(corpus.rglob("*.jpg"))[:6] + [corpus / "bad" / "notes.jpg"]
    jobs = [(Task(str(p), p.stat().st_size, p.stat().st_mtime_ns), False) for p in files]
    model_file = str(backbone.model_path)
    options = DecodeOptions(backbone.preprocess, 10**8, 10**9, model_file=model_file, model_runtime="onnx")
    model = backbone.model_path.read_bytes()
    batch = {"jobs": np.array([pickle.dumps(jobs)], dtype=object)}

    in_one = pickle.loads(ChunkDecoder(options, model, None)(batch)["results"][0])
    pixels = ChunkDecoder(options, None, None)(batch)  # decoders of a GPU plan: no model
    assert all(d.vector is None for d in pickle.loads(pixels["results"][0]))
    in_two = pickle.loads(ChunkEmbedder(options, model, "cpu")(pixels)["results"][0])

    assert [d.task.path for d in in_two] == [d.task.path for d in in_one]
    for one, two in zip(in_one, in_two):
        assert (one.error, one.content_hash) == (two.error, two.content_hash)
        assert two.pixels is None
        if one.vector is None:
            assert two.vector is None and one.error
        else:
            np.testing.assert_allclose(two.vector, one.vector, atol=1e-5)
            assert two.norm == pytest.approx(one.norm, rel=1e-5)


def test_gpus_declared_to_ray_that_cannot_run_the_model(cluster, corpus, tmp_path, model_cache):
    """A node that declares a GPU (`ray start --num-gpus 1`) but cannot run the model on one:
    LOOKALIKE_DEVICE=cuda is refused naming the node and what it lacks, auto embeds on the CPUs
    and says why."""
    from indexer.device import choose_device, missing_cuda_runtime, visible_gpus

    for name in ("worker0", "worker1"):
        cluster.kill(name)
    cluster.add_worker("gpu0", gpus=1)
    try:
        refused = run_index(cluster, tmp_path / "refused", model_cache, corpus, env={"LOOKALIKE_DEVICE": "cuda"})
        auto = run_index(cluster, tmp_path / "auto", model_cache, corpus)
    finally:
        cluster.kill("gpu0")
        cluster.add_worker("worker0")
        cluster.add_worker("worker1")
    try:
        choose_device("cuda", visible_gpus(), missing_cuda_runtime("onnx"))
    except LookalikeError:
        pass
    else:  # a machine with a GPU that ONNX Runtime can use, which the node sees too
        for proc in (refused, auto):
            assert proc.returncode == 0 and "embedding on 1 GPU(s) of the cluster" in proc.stderr, proc.stderr[-3000:]
        return
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert "Ray node 127.0.0.1" in refused.stderr and "has 1 GPU(s) for Ray but" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "has 1 GPU(s) for Ray but" in auto.stderr and "embedding on the CPUs" in auto.stderr
    assert "added 120, updated 0, removed 0, unchanged 0, failed 2" in auto.stderr


def test_a_node_with_another_lookalike_version_is_refused_by_name():
    """What the probes' answers lead to. (A node with another install cannot be made on one
    machine: Ray workers search the driver's paths first, so they find this install.)"""
    from indexer.cluster import refuse_mismatches

    node = {"NodeManagerAddress": "10.0.0.7", "NodeID": "ab12cd34ef56"}
    same = {"version": "0.2.0", "unreadable": []}
    refuse_mismatches([(node, same)], "0.2.0")
    with pytest.raises(
        LookalikeError, match=r"Ray node 10.0.0.7 \(node ab12cd34\) runs lookalike 0.1.0, this machine 0.2.0"
    ):
        refuse_mismatches([(node, same), (node, {**same, "version": "0.1.0"})], "0.2.0")
    with pytest.raises(LookalikeError, match="cannot read /shared/photos \\(permission denied\\)"):
        refuse_mismatches([(node, {**same, "unreadable": [("/shared/photos", "permission denied")]})], "0.2.0")


GPU_PLAN_DRIVER = """
import json, sys
from pathlib import Path
import numpy as np
from indexer.backbones import DEFAULT_BACKBONE, load_backbone
from indexer.cluster import ClusterDecoders
from indexer.decode_worker import DecodeOptions, Task, decode_chunk

address, folder, cache, out = sys.argv[1:5]
backbone = load_backbone(DEFAULT_BACKBONE, runtime="onnx", cache_dir=Path(cache))
files = sorted(Path(folder).rglob("*.jpg"))
jobs = [(Task(str(p), p.stat().st_size, p.stat().st_mtime_ns), False) for p in files]
cluster = ClusterDecoders(address, [folder], device="cpu")
cluster.embed_gpus, cluster.embed_device = 1, "cpu"  # the GPU plan; the node's GPU is declared only
cluster.options = DecodeOptions(
    backbone.preprocess, 10**8, 10**9, model_file=str(backbone.model_path), model_runtime="onnx"
)
got = [d for results in cluster.decode(jobs) for d in results]
cluster.close()
here = {d.task.path: d for d in decode_chunk(cluster.options, jobs)}
diff = max(float(np.abs(d.vector - here[d.task.path].vector).max()) for d in got if d.vector is not None)
Path(out).write_text(json.dumps({
    "files": len(got),
    "distinct": len({d.task.path for d in got}),
    "vectors": sum(d.vector is not None for d in got),
    "pixels_left": sum(d.pixels is not None for d in got),
    "errors": sorted(Path(d.task.path).name for d in got if d.error),
    "same_errors": all(d.error == here[d.task.path].error for d in got),
    "max_diff": diff,
}))
"""


def test_the_gpu_plan_runs_on_ray_decoders_then_an_actor_holding_the_gpu(cluster, corpus, tmp_path, model_cache):
    """The two-stage plan as Ray schedules it: decoder actors without the model, then an embed
    actor that holds the GPU a node declares (`num_gpus=1`: only that node can take it), its
    session on the CPU here (the one thing a real GPU changes). Every file comes back once,
    embedded, with the vectors a one-stage decoder computes."""
    for name in ("worker0", "worker1"):
        cluster.kill(name)
    cluster.add_worker("gpu0", gpus=1)
    cluster.add_worker("worker0")
    script = tmp_path / "driver.py"
    script.write_text(GPU_PLAN_DRIVER)
    out = tmp_path / "result.json"
    env = cluster.env(PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    try:
        proc = subprocess.run(
            cluster.netns(sys.executable, str(script), cluster.address, str(corpus), str(model_cache), str(out)),
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        for name in ("gpu0", "worker0"):
            cluster.kill(name)
        cluster.add_worker("worker0")
        cluster.add_worker("worker1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["files"] == result["distinct"] == 122
    assert result["vectors"] == 120 and result["pixels_left"] == 0
    assert result["errors"] == ["notes.jpg", "truncated.jpg"] and result["same_errors"]
    assert result["max_diff"] < 1e-5
