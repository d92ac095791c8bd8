"""A running server picks up what separate `lookalike index` / `heads train` processes save."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import httpx
import pytest

from conftest import cli_command
from live_server import running_server

pytestmark = pytest.mark.storage


def _wait(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def served_home(tmp_path, sample_paths, model_cache):
    """A real `lookalike serve` on a home holding 10 photos; yields (client, env, folder)."""
    folder = tmp_path / "photos"
    for path in sample_paths[::8]:
        dest = folder / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    home = tmp_path / "home"
    env = {**os.environ, "LOOKALIKE_HOME": str(home), "LOOKALIKE_MODEL_CACHE": str(model_cache)}
    subprocess.run(cli_command("index", str(folder), "-q"), env=env, check=True, capture_output=True)
    with (
        running_server(home, env={**env, "LOOKALIKE_RELOAD_INTERVAL": "0.3"}) as base,
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        yield client, env, folder


def test_server_serves_new_images_and_tags_without_restart(served_home, sample_paths):
    client, env, folder = served_home
    assert client.get("/health").json()["images"] == 10
    newcomer = sample_paths[1]
    new_dir = folder / "new"
    new_dir.mkdir()
    for path in sample_paths[1::8]:
        shutil.copy2(path, new_dir / path.name)

    # Queries keep being answered while another process indexes into the same home.
    errors, answered, stop = [], [], threading.Event()

    def query_loop():
        data = newcomer.read_bytes()
        while not stop.is_set():
            response = client.post("/search", files={"file": ("q.jpg", data, "image/jpeg")}, params={"k": 3})
            (answered if response.status_code == 200 else errors).append(response.status_code)

    thread = threading.Thread(target=query_loop)
    thread.start()
    try:
        subprocess.run(cli_command("index", str(folder), "-q"), env=env, check=True, capture_output=True)
        _wait(lambda: client.get("/health").json()["images"] == 20, what="the new images")
    finally:
        stop.set()
        thread.join()
    assert not errors and answered
    top = client.post("/search", files={"file": ("q.jpg", newcomer.read_bytes(), "image/jpeg")}).json()["results"][0]
    assert top["path"] == str(new_dir / newcomer.name) and top["score"] == pytest.approx(1.0, abs=1e-4)

    # A head trained by another process shows up in /tags and in result tags.
    classes = sorted({p.parent.name for p in sample_paths})[:2]
    labelled = folder.parent / "labelled"
    for cls in classes:
        shutil.copytree(sample_paths[0].parent.parent / cls, labelled / cls)
    subprocess.run(
        cli_command("heads", "train", "pair", "--type", "binary", "--from-folders", str(labelled), "--index"),
        env=env,
        check=True,
        capture_output=True,
    )
    tags = _wait(lambda: client.get("/tags").json().get("pair"), what="the new head's tags")
    assert set(tags) == set(classes) and sum(tags.values()) == client.get("/health").json()["images"]
