"""Load test: 16 concurrent clients against a real `lookalike serve`, with and without indexing.

    python bench/load_test.py            # 60 s per phase, 1,000 images added during phase 2
    python bench/load_test.py --quick    # 15 s per phase, 200 images

Phase 1 (baseline): the mixed load alone. Phase 2: the same load while a separate
`lookalike index` process adds new images to the same home (the server swaps in each new
index generation). The mix: uploads to POST /search, GET /images/{id}/similar, and the same
with an imagenet tag filter. Every request is bounded (count and time) and goes to 127.0.0.1.
Target: zero errors in both phases; p50/p99 latency reported side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
from benchlib import (
    CACHE,
    LOOKALIKE,
    dataset_photos,
    ensure_model_cache,
    free_port,
    load_line,
    lookalike_env,
    machine_load,
    remove,
    scratch_dir,
    spread,
    write_json,
)
from PIL import Image, ImageOps

CLIENTS = 16


def base_home(photos: list[Path]) -> Path:
    """A home with the dataset photos indexed (cached between runs)."""
    home = CACHE / "load-home"
    subprocess.run(
        [str(LOOKALIKE), "index", *sorted({str(p.parent.parent) for p in photos}), "--home", str(home), "-q"],
        env=lookalike_env(),
        check=True,
    )
    return home


def new_images(photos: list[Path], count: int) -> Path:
    """`count` distinct new photos (mirrored, cropped, shrunk dataset photos), made once."""
    folder = CACHE / f"load-new-{count}"
    if folder.is_dir() and len(list(folder.iterdir())) == count:
        return folder
    remove(folder)
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for i, src in enumerate(spread(photos, count)):
        with Image.open(src) as img:
            img = ImageOps.mirror(img.convert("RGB"))
            w, h = img.size
            cut = rng.uniform(0.8, 0.95)
            img = img.crop((0, 0, max(8, int(w * cut)), max(8, int(h * cut))))
            img.save(folder / f"new-{i:05d}.jpg", quality=rng.randint(80, 92))
    return folder


async def client_loop(client, stop_at, queries, ids, label, latencies, errors, rng):
    while time.monotonic() < stop_at:
        kind = rng.random()
        started = time.perf_counter()
        try:
            if kind < 0.5:
                data = queries[rng.randrange(len(queries))]
                response = await client.post("/search", files={"file": ("q.jpg", data, "image/jpeg")}, params={"k": 10})
            elif kind < 0.8:
                response = await client.get(f"/images/{rng.choice(ids)}/similar", params={"k": 10})
            else:
                params = {"k": 10, "any_tag": label}
                response = await client.get(f"/images/{rng.choice(ids)}/similar", params=params)
            ok = response.status_code == 200
        except httpx.HTTPError as exc:
            ok, response = False, exc
        (latencies if ok else errors).append(
            (time.perf_counter() - started) * 1000 if ok else str(getattr(response, "status_code", response))
        )


async def run_phase(base_url: str, seconds: float, queries, ids, label) -> dict:
    latencies, errors = [], []
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
        await asyncio.gather(
            *(
                client_loop(client, stop_at, queries, ids, label, latencies, errors, random.Random(i))
                for i in range(CLIENTS)
            )
        )
    return {
        "requests": len(latencies) + len(errors),
        "errors": len(errors),
        "error_kinds": sorted(set(errors))[:10],
        "p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
        "p99_ms": float(np.percentile(latencies, 99)) if latencies else None,
        "rps": len(latencies) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seconds, adding = (15.0, 200) if args.quick else (60.0, 1000)
    photos = dataset_photos()
    ensure_model_cache()
    home_src = base_home(photos)
    additions = new_images(photos, adding)
    home = scratch_dir("load-run-")
    subprocess.run(["cp", "-a", f"{home_src}/.", str(home)], check=True)
    port = free_port()
    env = lookalike_env(LOOKALIKE_HOME=str(home), LOOKALIKE_RELOAD_INTERVAL="1")
    server = subprocess.Popen(
        [str(LOOKALIKE), "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base_url, timeout=10) as probe:
            for _ in range(240):
                try:
                    if probe.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.25)
            total_before = probe.get("/health").json()["images"]
            tags = probe.get("/tags").json().get("imagenet", {})
            label = max(tags, key=tags.get) if tags else "none"
            ids = [r["id"] for r in probe.get("/images/1/similar", params={"k": 1000}).json()["results"]] + [1]
        queries = [p.read_bytes() for p in spread(photos, 64)]
        baseline = asyncio.run(run_phase(base_url, seconds, queries, ids, label))
        print(f"phase 1, no indexing: {baseline}", flush=True)
        indexer = subprocess.Popen(
            [str(LOOKALIKE), "index", str(additions), "-q", "--batch-size", "16"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        during = asyncio.run(run_phase(base_url, seconds, queries, ids, label))
        index_rc = indexer.wait(timeout=1200)
        with httpx.Client(base_url=base_url, timeout=10) as probe:
            for _ in range(40):  # the server reloads within its interval
                total_after = probe.get("/health").json()["images"]
                if total_after == total_before + adding:
                    break
                time.sleep(0.5)
        print(f"phase 2, while indexing {adding} images: {during}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        remove(home)
    result = {
        "clients": CLIENTS,
        "seconds_per_phase": seconds,
        "images_before": total_before,
        "images_added": adding,
        "images_served_after": total_after,
        "index_exit_code": index_rc,
        "without_indexing": baseline,
        "while_indexing": during,
        "machine": machine_load(),
    }
    print(f"{CLIENTS} clients x {seconds:.0f} s per phase, {total_before} images indexed before")
    print("phase                requests  errors   p50 ms   p99 ms    req/s")
    for name, r in (("without indexing", baseline), ("while indexing", during)):
        print(
            f"{name:<20} {r['requests']:>8} {r['errors']:>7} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['rps']:>8.1f}"
        )
    ok = baseline["errors"] == 0 and during["errors"] == 0 and index_rc == 0
    print(
        f"index run exit code {index_rc}; server now serves {total_after} images "
        f"(expected {total_before + adding}); {'OK: zero errors' if ok else 'MISS: errors seen'}"
    )
    print(load_line(result["machine"]))
    path = write_json("load_test", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
