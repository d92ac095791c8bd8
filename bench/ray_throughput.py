"""`lookalike index --ray` against a local run of the same folder, on this one machine.

    python bench/ray_throughput.py             # 1,000 dataset photos
    python bench/ray_throughput.py --n 2596    # all of them

Four runs of `lookalike index FOLDER -q` into fresh homes, each a cold process timed from start to
exit: local (the baseline: two decoder processes); Ray with one worker node of 2 CPUs; Ray with two
worker nodes of 1 CPU each; the same two nodes with one of them killed (kill -9 of its whole
process tree) once half of the rows are committed. The cluster is tests/ray_cluster.py's: a head
without CPUs and the worker nodes, in a network namespace of their own (run as root).

On one 2-core machine more nodes cannot go faster: what this measures is Ray's overhead against
the local pipeline (images/s, and CPU-ms per image: the whole machine's CPU time over the run,
from /proc/stat, divided by the images), its fixed costs (a run of one file: connecting, the
probes, starting the actors; and the time to the first committed row), and the cost of losing a
node half way. Per-core figures for the capacity plan in the README come from these.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from benchlib import (
    REPO,
    dataset_photos,
    ensure_model_cache,
    linked_folder,
    load_line,
    lookalike_env,
    machine_load,
    pyplot,
    remove,
    scratch_dir,
    spread,
    write_json,
)

sys.path.insert(0, str(REPO / "tests"))
from ray_cluster import RayCluster  # noqa: E402 - the tests' cluster harness, reused as is


def cpu_seconds() -> float:
    """CPU time the whole machine has spent so far (user, nice, system), in seconds."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return (int(fields[0]) + int(fields[1]) + int(fields[2])) / os.sysconf("SC_CLK_TCK")


def committed(home: Path) -> int:
    db = home / "lookalike.db"
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT count(*) FROM images").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def timed_run(folder: Path, home: Path, cluster: RayCluster | None, *, kill_at: int | None = None) -> dict:
    env = (cluster.env if cluster else lookalike_env)(LOOKALIKE_HOME=str(home))
    env["LOOKALIKE_MODEL_CACHE"] = lookalike_env()["LOOKALIKE_MODEL_CACHE"]
    command = [str(REPO / ".venv" / "bin" / "lookalike"), "index", str(folder), "-q"]
    if cluster is not None:
        command = cluster.netns(*command, "--ray", cluster.address)
    cpu, started = cpu_seconds(), time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first_row = killed_at = None
    while proc.poll() is None:
        rows = committed(home)
        if first_row is None and rows:
            first_row = time.perf_counter() - started
        if kill_at is not None and killed_at is None and rows >= kill_at:
            cluster.kill("worker1")
            killed_at = time.perf_counter() - started
        time.sleep(0.05)
    wall = time.perf_counter() - started
    used = cpu_seconds() - cpu
    stderr = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    images = committed(home)
    return {
        "images": images,
        "wall_s": round(wall, 2),
        "images_per_s": round(images / wall, 1),
        "cpu_ms_per_image": round(used * 1000 / max(1, images), 1),
        "first_row_s": None if first_row is None else round(first_row, 2),
        "killed_at_s": None if killed_at is None else round(killed_at, 2),
        "summary": stderr.strip().splitlines()[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="dataset photos to index")
    opts = parser.parse_args()
    ensure_model_cache()
    load_before = machine_load()
    photos = spread(dataset_photos(), opts.n)
    folder = linked_folder(photos, "ray-photos-")
    one = linked_folder(photos[:1], "ray-one-")
    scratch = scratch_dir("ray-homes-")
    out: dict = {"n": len(photos), "load_before": load_before}
    try:
        out["local"] = timed_run(folder, scratch / "local", None)
        out["local_one_file"] = timed_run(one, scratch / "local-one", None)
        print(f"local: {out['local']}", flush=True)
        for layout, workers in (("ray_one_node", [2]), ("ray_two_nodes", [1, 1])):
            cluster = RayCluster(scratch_dir("ray-cluster-"))
            try:
                cluster.start(workers=0)
                for i, cpus in enumerate(workers):
                    cluster.add_worker(f"worker{i}", cpus=cpus)
                if layout == "ray_one_node":
                    out["ray_one_file"] = timed_run(one, scratch / "ray-one", cluster)
                out[layout] = timed_run(folder, scratch / layout, cluster)
                print(f"{layout}: {out[layout]}", flush=True)
                if layout == "ray_two_nodes":
                    out["ray_node_killed"] = timed_run(folder, scratch / "killed", cluster, kill_at=len(photos) // 2)
                    print(f"two nodes, one killed at half: {out['ray_node_killed']}", flush=True)
            finally:
                cluster.stop()
                remove(cluster.root)
        local = out["local"]
        for key in ("ray_one_node", "ray_two_nodes", "ray_node_killed"):
            out[key]["vs_local_images_per_s"] = round(out[key]["images_per_s"] / local["images_per_s"], 2)
        print(
            f"fixed cost of a 1-file run: local {out['local_one_file']['wall_s']} s, Ray "
            f"{out['ray_one_file']['wall_s']} s; first committed row after {out['ray_one_node']['first_row_s']} s "
            f"on Ray, {local['first_row_s']} s locally"
        )
        out["load_after"] = machine_load()
    finally:
        for path in (folder, one, scratch):
            remove(path)
    path = write_json("ray_throughput", out)
    plot(out)
    print(f"{load_line(load_before)} before, {load_line(out.get('load_after', machine_load()))} after; {path}")


def plot(out: dict) -> None:
    plt = pyplot()
    keys = ["local", "ray_one_node", "ray_two_nodes", "ray_node_killed"]
    labels = ["local", "Ray, 1 node", "Ray, 2 nodes", "Ray, 2 nodes,\none killed at 50%"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.bar(labels, [out[k]["images_per_s"] for k in keys], color=["#555", "#3a7", "#3a7", "#c84"])
    left.set_ylabel("images/s (wall, cold process)")
    right.bar(labels, [out[k]["cpu_ms_per_image"] for k in keys], color=["#555", "#3a7", "#3a7", "#c84"])
    right.set_ylabel("CPU-ms per image (whole machine)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"lookalike index, {out['n']} dataset photos, one 2-core machine")
    fig.tight_layout()
    fig.savefig(REPO / "bench" / "out" / "ray_throughput.png", dpi=120)


if __name__ == "__main__":
    os.chdir(REPO)
    main()
