"""The routes that read files serve indexed photos and nothing else.

`/images/{id}/file` and `/images/{id}/thumbnail` open a file only when its row is "indexed", it
is a regular file, and its real path lies inside an indexed folder (or is the very path indexed,
for images indexed one by one). Every attempt below goes through the real ASGI app on a real
index: symlinks swapped after indexing, files swapped for FIFOs and folders, and traversal in the
raw request path (`..`, `%2e%2e`, `%2f`), in process and against a real `lookalike serve`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

import databases
from conftest import SAMPLES
from indexer.library import Library
from indexer.models import ImageRow, Root
from indexer.pipeline import index_files, index_folders
from indexer.settings import Settings
from live_server import running_server
from service.app import create_app

SECRET = "/etc/passwd"
SECRET_MARK = b"root:"  # the first line of every /etc/passwd


@dataclass
class Indexed:
    settings: Settings
    photos: Path  # the indexed root
    outside: Path  # a folder that is not indexed
    ids: dict[str, int]  # path as indexed -> id

    def id_of(self, path: Path | str) -> int:
        return self.ids[str(path)]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, model_cache) -> Iterator[Indexed]:
    """photos/ (the root) holds plain photos, a relative symlink to a photo inside the root, a
    symlink to a photo outside it and a damaged JPEG; loose/ holds a photo indexed on its own
    (like `heads train --index` does). Each test that swaps something swaps its own file."""
    with pytest.MonkeyPatch.context() as mp:
        databases.clear_settings(mp)
        base = tmp_path_factory.mktemp("safety")
        photos, outside, loose = base / "photos", base / "outside", base / "loose"
        samples = sorted(SAMPLES.rglob("*.jpg"))
        (photos / "sub").mkdir(parents=True)
        outside.mkdir()
        loose.mkdir()
        for i, name in enumerate(["plain", "victim", "fifo", "folder", "gone", "cached"]):
            shutil.copy2(samples[i * 7], photos / f"{name}.jpg")
        for i, name in enumerate(["real", "real2", "real3"]):
            shutil.copy2(samples[50 + i * 3], photos / "sub" / f"{name}.jpg")
        os.symlink("sub/real.jpg", photos / "link.jpg")
        os.symlink("sub/real2.jpg", photos / "swapped.jpg")
        os.symlink("sub/real3.jpg", photos / "swapped_cached.jpg")
        shutil.copy2(samples[70], outside / "elsewhere.jpg")
        os.symlink(outside / "elsewhere.jpg", photos / "points_outside.jpg")
        (photos / "damaged.jpg").write_bytes(samples[1].read_bytes()[:200])
        shutil.copy2(samples[75], loose / "single.jpg")
        shutil.copy2(samples[76], loose / "single2.jpg")

        settings = Settings(home=base / "home", model_cache=model_cache, reload_interval=0)
        library = Library(settings)
        report = index_folders(library, [str(photos)])
        assert [Path(path).name for path, _ in report.failed] == ["damaged.jpg"]
        index_files(library, [str(loose / "single.jpg"), str(loose / "single2.jpg")])
        with library.sessions() as session:
            ids = {row.path: row.id for row in session.scalars(select(ImageRow))}
            assert list(session.scalars(select(Root.path))) == [str(photos)]  # loose/ is no root
        library.close()
        yield Indexed(settings, photos, outside, ids)


@pytest.fixture(scope="module")
def client(indexed) -> Iterator[TestClient]:
    with TestClient(create_app(indexed.settings)) as test_client:
        yield test_client


def _refused(response) -> None:
    assert response.status_code == 404, (response.status_code, response.content[:200])
    assert response.headers["content-type"] == "application/json"
    assert SECRET_MARK not in response.content
    assert "detail" in response.json()


def test_indexed_files_are_served(client, indexed):
    for name, served_from in [
        ("plain.jpg", indexed.photos / "plain.jpg"),
        ("link.jpg", indexed.photos / "sub" / "real.jpg"),  # a symlink that stays inside the root
    ]:
        image_id = indexed.id_of(indexed.photos / name)
        response = client.get(f"/images/{image_id}/file")
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/jpeg"
        assert response.content == served_from.read_bytes()
        assert int(response.headers["content-length"]) == served_from.stat().st_size
        assert client.get(f"/images/{image_id}/thumbnail").status_code == 200
    single = indexed.photos.parent / "loose" / "single.jpg"
    response = client.get(f"/images/{indexed.id_of(single)}/file")
    assert response.status_code == 200 and response.content == single.read_bytes()


def test_symlink_swapped_to_etc_passwd_after_indexing(client, indexed):
    link = indexed.photos / "swapped.jpg"
    image_id = indexed.id_of(link)
    assert client.get(f"/images/{image_id}/file").content == (indexed.photos / "sub" / "real2.jpg").read_bytes()
    link.unlink()
    os.symlink(SECRET, link)
    _refused(client.get(f"/images/{image_id}/file"))
    _refused(client.get(f"/images/{image_id}/thumbnail"))
    # Relative, through the parent folders: the same.
    link.unlink()
    os.symlink("../" * 20 + SECRET.lstrip("/"), link)
    _refused(client.get(f"/images/{image_id}/file"))
    assert client.get(f"/images/{image_id}").status_code == 200  # the row itself is still there


def test_a_cached_thumbnail_is_not_served_for_a_file_gone_astray(client, indexed):
    link = indexed.photos / "swapped_cached.jpg"
    image_id = indexed.id_of(link)
    assert client.get(f"/images/{image_id}/thumbnail").status_code == 200  # now cached
    link.unlink()
    os.symlink(SECRET, link)
    _refused(client.get(f"/images/{image_id}/thumbnail"))
    _refused(client.get(f"/images/{image_id}/file"))


def test_regular_file_replaced_by_a_symlink_to_a_secret(client, indexed):
    victim = indexed.photos / "victim.jpg"
    image_id = indexed.id_of(victim)
    assert client.get(f"/images/{image_id}/file").status_code == 200
    victim.unlink()
    os.symlink(SECRET, victim)
    _refused(client.get(f"/images/{image_id}/file"))
    _refused(client.get(f"/images/{image_id}/thumbnail"))


def test_a_file_indexed_on_its_own_replaced_by_a_symlink(client, indexed):
    single = indexed.photos.parent / "loose" / "single2.jpg"
    image_id = indexed.id_of(single)
    assert client.get(f"/images/{image_id}/file").status_code == 200
    single.unlink()
    os.symlink(SECRET, single)
    _refused(client.get(f"/images/{image_id}/file"))
    _refused(client.get(f"/images/{image_id}/thumbnail"))
    # Not even to another photo: its real path is neither the indexed path nor inside a root.
    single.unlink()
    os.symlink(indexed.outside / "elsewhere.jpg", single)
    _refused(client.get(f"/images/{image_id}/file"))


def test_a_symlink_leading_out_of_the_indexed_folder_is_not_served(client, indexed):
    """Indexed and searchable (its vector is stored), but its bytes live outside every indexed
    folder, so they are not served."""
    image_id = indexed.id_of(indexed.photos / "points_outside.jpg")
    meta = client.get(f"/images/{image_id}")
    assert meta.status_code == 200 and meta.json()["status"] == "indexed"
    _refused(client.get(f"/images/{image_id}/file"))
    _refused(client.get(f"/images/{image_id}/thumbnail"))


def _get_with_deadline(client: TestClient, url: str, seconds: float = 60):
    """A GET that fails the test instead of hanging it (a FIFO opened for reading blocks)."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(response=client.get(url)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{url} hung"
    return box["response"]


def test_files_swapped_for_a_fifo_a_folder_or_nothing(client, indexed):
    fifo = indexed.photos / "fifo.jpg"
    fifo_id = indexed.id_of(fifo)
    fifo.unlink()
    os.mkfifo(fifo)
    _refused(_get_with_deadline(client, f"/images/{fifo_id}/file"))
    _refused(_get_with_deadline(client, f"/images/{fifo_id}/thumbnail"))

    folder = indexed.photos / "folder.jpg"
    folder_id = indexed.id_of(folder)
    folder.unlink()
    folder.mkdir()
    _refused(client.get(f"/images/{folder_id}/file"))
    _refused(client.get(f"/images/{folder_id}/thumbnail"))

    gone = indexed.photos / "gone.jpg"
    gone_id = indexed.id_of(gone)
    gone.unlink()
    _refused(client.get(f"/images/{gone_id}/file"))
    _refused(client.get(f"/images/{gone_id}/thumbnail"))


def test_a_failed_image_is_not_served(client, indexed):
    image_id = indexed.id_of(indexed.photos / "damaged.jpg")
    assert client.get(f"/images/{image_id}").json()["status"] == "failed"
    _refused(client.get(f"/images/{image_id}/file"))
    _refused(client.get(f"/images/{image_id}/thumbnail"))


# -- traversal in the request path ----------------------------------------------------------------

TRAVERSALS = [
    b"/images/..%2f..%2fetc%2fpasswd/file",
    b"/images/1%2f..%2f/file",
    b"/images/%2e%2e/file",
    b"/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd/file",
    b"/images/..%2F..%2F..%2F..%2Fetc%2Fpasswd/thumbnail",
    b"/images/1/../../../../../etc/passwd",
    b"/images/1/..%2f..%2f..%2f..%2fetc%2fpasswd",
    b"/images/1/file/..%2f..%2f..%2f..%2fetc%2fpasswd",
    b"/images/1%2f..%2f..%2f..%2f..%2fetc%2fpasswd/file",
    b"/images/%252e%252e%252f%252e%252e%252fetc%252fpasswd/file",
    b"/images/1%00/file",
    b"/images/..%5c..%5cetc%5cpasswd/file",
    b"/../../../../etc/passwd",
    b"/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    b"/static/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    b"/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    b"/static/../../../../../../etc/passwd",
    b"/heads/..%2f..%2f..%2f..%2fetc/plots/loss.png",
    b"/heads/imagenet/plots/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    b"/heads/%2e%2e/plots/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
]
NOT_AN_INTEGER = [b"/images/%2e%2e/file", b"/images/abc/file", b"/images/1.5/thumbnail", b"/images/0x1/file"]


def _asgi_get(app, raw_path: bytes) -> tuple[int, bytes]:
    """One GET straight into the ASGI app, with the raw path a server would pass on: `path`
    percent-decoded the way uvicorn does it, `raw_path` untouched, nothing normalised."""
    sent: list[dict] = []
    requested = False
    done = asyncio.Event()

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()  # like a server: nothing more until the client goes away
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_traversal_in_the_raw_path_never_reaches_a_file(client, indexed):
    assert _asgi_get(client.app, f"/images/{indexed.id_of(indexed.photos / 'plain.jpg')}/file".encode())[0] == 200
    for raw in TRAVERSALS:
        status, body = _asgi_get(client.app, raw)
        assert status in (404, 422), (raw, status, body[:200])
        assert SECRET_MARK not in body, raw
    for raw in NOT_AN_INTEGER:
        assert _asgi_get(client.app, raw)[0] == 422, raw
    # The same through the HTTP client (which normalises literal `..` but keeps `%2f` and `%2e`).
    for raw in TRAVERSALS:
        response = client.get(raw.decode())
        assert response.status_code in (404, 422), (raw, response.status_code)
        assert SECRET_MARK not in response.content


# -- a real server ----------------------------------------------------------------------------------


def _raw_get(port: int, raw_path: bytes) -> tuple[int, bytes]:
    """Send the request line byte for byte (no client normalises anything) and read the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET " + raw_path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while piece := sock.recv(65536):
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_traversal_against_a_real_server(indexed, tmp_path):
    settings = indexed.settings
    with running_server(settings.home, model_cache=settings.model_cache, host=None, log=tmp_path / "serve.log") as base:
        port = httpx.URL(base).port
        plain = indexed.id_of(indexed.photos / "plain.jpg")
        status, body = _raw_get(port, f"/images/{plain}/file".encode())
        assert status == 200 and body == (indexed.photos / "plain.jpg").read_bytes()
        for raw in TRAVERSALS:
            status, body = _raw_get(port, raw)
            assert status in (400, 404, 422), (raw, status, body[:200])  # 400: the server refused the line
            assert SECRET_MARK not in body, raw
