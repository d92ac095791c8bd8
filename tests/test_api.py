"""The HTTP API end to end: real requests through the real ASGI app and a real `lookalike serve`.

A home folder is indexed once per module from the shipped CC0 photos (plus a PNG and a JPEG
with EXIF orientation 6) with the real pipeline and ONNX model; every request below goes
through FastAPI's routing, validation, error handlers and the upload-limit middleware.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner

import cli
import databases
from conftest import REPO, SAMPLES
from indexer.library import Library
from indexer.models import ImageRow
from indexer.pipeline import index_folders
from indexer.settings import Settings
from live_server import running_server
from service.app import create_app

pytestmark = pytest.mark.storage

THUMB = 96  # the configured thumbnail size (default is 256; a non-default proves it is honoured)
LIMIT = 64_000  # upload limit for the limit tests; the sample photos are 20-60 kB
CAT_PNG = REPO / "tests" / "data" / "cat" / "chelsea.png"


@dataclass
class Indexed:
    settings: Settings
    home: Path
    photos: Path
    ids: dict[str, int]  # absolute path -> image id
    rotated: Path  # a landscape JPEG with EXIF orientation 6 (shown as portrait)
    png: Path

    def id_of(self, path: Path) -> int:
        return self.ids[str(path)]


def _rotated_jpeg(path: Path) -> None:
    """Stored 240x120 (left half red, right half blue), EXIF orientation 6: shown 120x240, red on top."""
    img = Image.new("RGB", (240, 120), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 120, 120))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, "JPEG", quality=95, exif=exif)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, model_cache) -> Iterator[Indexed]:
    with pytest.MonkeyPatch.context() as mp:
        databases.clear_settings(mp)
        root = tmp_path_factory.mktemp("api")
        photos = root / "photos"
        for path in sorted(SAMPLES.rglob("*.jpg"))[::4]:
            dest = photos / path.parent.name / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        (photos / "other").mkdir()
        rotated = photos / "other" / "rotated.jpg"
        _rotated_jpeg(rotated)
        png = photos / "other" / "cat.png"
        shutil.copy2(CAT_PNG, png)

        settings = databases.home_settings(root / "home", model_cache=model_cache, thumbnail_size=THUMB)
        library = Library(settings)
        report = index_folders(library, [str(photos)])
        assert report.failed == [] and report.added == 22
        with library.sessions() as session:
            ids = {row.path: row.id for row in session.scalars(select(ImageRow))}
        library.close()
        yield Indexed(settings, settings.resolved_home, photos, ids, rotated, png)


@pytest.fixture(scope="module")
def client(indexed) -> Iterator[TestClient]:
    with TestClient(create_app(indexed.settings)) as test_client:  # runs the lifespan: model loaded here
        yield test_client


def jpegs(indexed: Indexed) -> list[Path]:
    return sorted(indexed.photos.rglob("*.jpg"))


def upload(path: Path, content_type: str = "image/jpeg") -> dict:
    return {"file": (path.name, path.read_bytes(), content_type)}


def result_ids(payload: dict) -> list[int]:
    return [r["id"] for r in payload["results"]]


# -- search --------------------------------------------------------------------------------------


def test_search_by_upload_has_the_cli_json_shape(client, indexed):
    query = jpegs(indexed)[3]
    response = client.post("/search", files=upload(query), data={"k": "5"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    payload = response.json()

    assert set(payload) >= {"results", "took_ms", "timings_ms"}
    assert set(payload["timings_ms"]) >= {"decode_ms", "embed_ms", "search_ms", "rerank_ms"}
    assert all(isinstance(v, float) and v >= 0 for v in payload["timings_ms"].values())
    assert payload["took_ms"] > 0
    results = payload["results"]
    assert len(results) == 5
    for item in results:
        assert {"id", "path", "score", "near_duplicate"} <= set(item)
        assert isinstance(item["id"], int) and isinstance(item["score"], float)
        assert indexed.ids[item["path"]] == item["id"]
    # The query is itself indexed: its own file is the one copy among the results.
    assert [r["near_duplicate"] for r in results] == [True, False, False, False, False]
    assert results[0]["id"] == indexed.id_of(query) and results[0]["path"] == str(query)
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert results[1]["score"] < 0.999
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)

    # `lookalike search FILE --json` prints the same document for the same query.
    args = ["search", str(query), "-k", "5", "--json", "--home", str(indexed.home)]
    cli_run = CliRunner().invoke(cli.app, args, catch_exceptions=False, env=databases.cli_env(args))
    assert cli_run.exit_code == 0, cli_run.output
    from_cli = json.loads(cli_run.stdout)
    assert set(from_cli) == set(payload)
    assert set(from_cli["timings_ms"]) == set(payload["timings_ms"])
    assert [(r["id"], r["path"]) for r in from_cli["results"]] == [(r["id"], r["path"]) for r in results]
    assert [set(r) for r in from_cli["results"]] == [set(r) for r in results]
    np.testing.assert_allclose([r["score"] for r in from_cli["results"]], scores, atol=1e-5)


def test_k_as_query_parameter_and_default(client, indexed):
    query = jpegs(indexed)[0]
    assert len(client.post("/search?k=3", files=upload(query)).json()["results"]) == 3
    assert len(client.post("/search", files=upload(query)).json()["results"]) == 10  # the default
    # More than the index holds: everything, once.
    everything = client.post("/search", files=upload(query), data={"k": "1000"}).json()["results"]
    assert sorted(r["id"] for r in everything) == sorted(indexed.ids.values())


def test_search_png_upload(client, indexed):
    response = client.post("/search", files=upload(indexed.png, "image/png"), data={"k": "2"})
    assert response.status_code == 200, response.text
    top = response.json()["results"][0]
    assert top["id"] == indexed.id_of(indexed.png) and top["score"] == pytest.approx(1.0, abs=1e-4)


# -- images ------------------------------------------------------------------------------------


def test_image_metadata(client, indexed):
    query = jpegs(indexed)[5]
    response = client.get(f"/images/{indexed.id_of(query)}")
    assert response.status_code == 200
    meta = response.json()
    with Image.open(query) as img:
        size = img.size
    assert meta["id"] == indexed.id_of(query) and meta["path"] == str(query)
    assert meta["size"] == query.stat().st_size
    assert (meta["width"], meta["height"]) == size
    assert meta["format"] == "JPEG" and meta["status"] == "indexed" and meta["error"] is None
    assert len(meta["content_hash"]) >= 32

    rotated = client.get(f"/images/{indexed.id_of(indexed.rotated)}").json()
    assert (rotated["width"], rotated["height"]) == (120, 240)  # as shown, not as stored
    assert client.get(f"/images/{indexed.id_of(indexed.png)}").json()["format"] == "PNG"


def test_similar_excludes_the_image_itself(client, indexed):
    query = jpegs(indexed)[8]
    image_id = indexed.id_of(query)
    response = client.get(f"/images/{image_id}/similar", params={"k": 4})
    assert response.status_code == 200, response.text
    payload = response.json()
    assert set(payload) >= {"results", "took_ms", "timings_ms"}
    ids = result_ids(payload)
    assert len(ids) == 4 and image_id not in ids
    assert all(r["score"] < 0.999 for r in payload["results"])
    # The same neighbours, in the same order, as an upload of the file minus the file itself.
    by_upload = client.post("/search", files=upload(query), data={"k": "5"}).json()
    assert result_ids(by_upload)[0] == image_id and result_ids(by_upload)[1:] == ids
    # k larger than the rest of the index: every other image, never itself.
    all_others = result_ids(client.get(f"/images/{image_id}/similar?k=1000").json())
    assert sorted(all_others) == sorted(set(indexed.ids.values()) - {image_id})


def test_original_file_bytes_and_content_type(client, indexed):
    for path, media_type in [
        (jpegs(indexed)[2], "image/jpeg"),
        (indexed.png, "image/png"),
        (indexed.rotated, "image/jpeg"),
    ]:
        response = client.get(f"/images/{indexed.id_of(path)}/file")
        assert response.status_code == 200
        assert response.headers["content-type"] == media_type
        assert response.content == path.read_bytes()


def _thumbnail(client, image_id: int) -> Image.Image:
    response = client.get(f"/images/{image_id}/thumbnail")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(response.content))
    assert img.format == "JPEG"
    img.load()
    return img


def test_thumbnail_is_a_small_jpeg_with_the_photo_aspect(client, indexed):
    for path in [jpegs(indexed)[1], indexed.png]:
        thumb = _thumbnail(client, indexed.id_of(path))
        with Image.open(path) as original:
            width, height = original.size
        assert max(thumb.size) == THUMB  # the originals are larger than THUMB
        assert thumb.size[0] <= THUMB and thumb.size[1] <= THUMB
        assert thumb.size[0] / thumb.size[1] == pytest.approx(width / height, rel=0.03)
    # Served again (from the cache): the same bytes.
    image_id = indexed.id_of(indexed.png)
    assert client.get(f"/images/{image_id}/thumbnail").content == client.get(f"/images/{image_id}/thumbnail").content


def test_thumbnail_applies_exif_orientation(client, indexed):
    thumb = _thumbnail(client, indexed.id_of(indexed.rotated))
    assert thumb.size == (THUMB // 2, THUMB)  # stored landscape 240x120, shown portrait
    pixels = np.asarray(thumb.convert("RGB"), dtype=np.int32)
    top, bottom = pixels[: THUMB // 4].mean(axis=(0, 1)), pixels[-THUMB // 4 :].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # the stored left half (red) is shown on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_concurrent_first_thumbnails_of_one_image(client, indexed):
    """Requests racing to create the same cached thumbnail all get the whole JPEG (the race is
    timing-dependent, so it is run for several rounds, each starting from an empty cache)."""
    ids = [indexed.id_of(indexed.png), indexed.id_of(jpegs(indexed)[10])]

    def fetch(image_id: int) -> tuple[int, int, bytes]:
        response = client.get(f"/images/{image_id}/thumbnail")
        return image_id, response.status_code, response.content

    for _ in range(12):
        shutil.rmtree(indexed.home / "thumbnails", ignore_errors=True)
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(fetch, [i for i in ids for _ in range(16)]))
        assert [status for _, status, _ in got] == [200] * len(got)
        for image_id in ids:
            bodies = {body for i, _, body in got if i == image_id}
            assert len(bodies) == 1
            Image.open(io.BytesIO(bodies.pop())).load()  # complete, decodable
        assert sorted(p.name for p in (indexed.home / "thumbnails").iterdir()) == sorted(
            f"{i}-{client.get(f'/images/{i}').json()['content_hash']}-{THUMB}.jpg" for i in ids
        )  # no temporary files left behind


# -- system ------------------------------------------------------------------------------------


def test_health_stats_docs_and_openapi(client, indexed):
    assert client.get("/health").json() == {"status": "ok", "images": 22, "backbone": "efficientnet-lite0"}

    stats = client.get("/stats").json()
    assert stats["images"]["indexed"] == 22 and stats["images"]["failed"] == 0
    assert stats["backbone"] == "efficientnet-lite0" and stats["dimension"] == 1280
    assert stats["index"]["vectors"] == 22

    docs = client.get("/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    assert "swagger-ui" in docs.text and "/openapi.json" in docs.text

    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert "post" in paths["/search"]
    for route in [
        "/images/{image_id}",
        "/images/{image_id}/similar",
        "/images/{image_id}/file",
        "/images/{image_id}/thumbnail",
        "/health",
        "/stats",
    ]:
        assert "get" in paths[route], route
    image_params = paths["/images/{image_id}"]["get"]["parameters"]
    assert {"name": "image_id", "in": "path"}.items() <= image_params[0].items()
    search_out = spec["components"]["schemas"]["SearchOut"]["properties"]
    assert {"results", "took_ms", "timings_ms"} <= set(search_out)
    body_ref = paths["/search"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body_ref


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_id", ["999999", "0", "-1", str(2**63 - 1), str(2**63), str(10**30)])
@pytest.mark.parametrize("suffix", ["", "/similar", "/file", "/thumbnail"])
def test_unknown_image_id_is_404(client, image_id, suffix):
    response = client.get(f"/images/{image_id}{suffix}")
    assert response.status_code == 404, response.text
    assert image_id in response.json()["detail"]


def test_non_numeric_image_id_is_422(client):
    assert client.get("/images/abc").status_code == 422
    assert client.get("/images/1.5/similar").status_code == 422


def test_non_image_upload_is_415(client):
    response = client.post("/search", files={"file": ("notes.txt", b"these are not pixels\n" * 50, "text/plain")})
    assert response.status_code == 415
    assert "not a supported image" in response.json()["detail"]
    # A lying content type changes nothing: the bytes decide.
    response = client.post("/search", files={"file": ("fake.jpg", b"%PDF-1.7\n" + bytes(500), "image/jpeg")})
    assert response.status_code == 415


def test_truncated_jpeg_is_422(client, indexed):
    data = jpegs(indexed)[4].read_bytes()
    response = client.post("/search", files={"file": ("cut.jpg", data[: len(data) // 2], "image/jpeg")})
    assert response.status_code == 422
    assert "truncated" in response.json()["detail"]
    empty = client.post("/search", files={"file": ("empty.jpg", b"", "image/jpeg")})
    assert empty.status_code == 422 and "empty" in empty.json()["detail"]


@pytest.mark.parametrize("k", ["0", "-3", "1001", "ten"])
def test_bad_k_is_422(client, indexed, k):
    query = jpegs(indexed)[0]
    as_form = client.post("/search", files=upload(query), data={"k": k})
    assert as_form.status_code == 422 and as_form.json()["detail"][0]["loc"] == ["body", "k"]
    as_query = client.post("/search", files=upload(query), params={"k": k})
    assert as_query.status_code == 422 and as_query.json()["detail"][0]["loc"] == ["query", "k"]
    similar = client.get(f"/images/{indexed.id_of(query)}/similar", params={"k": k})
    assert similar.status_code == 422


# -- several examples ---------------------------------------------------------------------------


def stored_vectors(indexed: Indexed) -> tuple[np.ndarray, np.ndarray]:
    """(ids, unit vectors) as the database stores them: the ground truth for rankings."""
    from indexer import store

    library = Library(indexed.settings)
    with library.sessions() as session:
        parts = list(store.iter_vectors(session, store.backbone_in_use(session).id))
    library.close()
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]).astype(np.float64)


def brute_force(ids: np.ndarray, scores: np.ndarray, leave_out: set[int], k: int) -> list[int]:
    keep = np.array([i not in leave_out for i in ids.tolist()])
    order = np.lexsort((ids[keep], -scores[keep]))[:k]
    return ids[keep][order].tolist()


def test_search_by_several_examples_ranks_as_the_strategy_says(client, indexed):
    """average: cosine with mean(positives) - 0.5 mean(negatives), renormalised; best_score: the
    best positive cosine, lowered by the margin a negative is closer by. Examples are left out;
    uploads count as positives; scores are the strategy's."""
    ids, vectors = stored_vectors(indexed)
    by_id = dict(zip(ids.tolist(), vectors))
    shoes = sorted(i for p, i in indexed.ids.items() if "/shoes/" in p)
    others = sorted(i for p, i in indexed.ids.items() if "/shoes/" not in p and p.endswith(".jpg"))
    pos, neg = shoes[:2], others[:1]
    leave_out = set(pos) | set(neg)
    k = 8

    query = np.mean([by_id[i] for i in pos], axis=0) - 0.5 * by_id[neg[0]]
    query /= np.linalg.norm(query)
    response = client.post("/search", params={"positive": pos, "negative": neg, "k": k})
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["strategy"].startswith("average")
    assert result_ids(payload) == brute_force(ids, vectors @ query, leave_out, k)
    assert [r["score"] for r in payload["results"]] == pytest.approx(
        [float(by_id[i] @ query) for i in result_ids(payload)], abs=1e-4
    )

    best_positive = np.max(vectors @ np.stack([by_id[i] for i in pos]).T, axis=1)
    best_negative = vectors @ by_id[neg[0]]
    best = np.where(best_positive >= best_negative, best_positive, 2 * best_positive - best_negative)
    response = client.post("/search", params={"positive": pos, "negative": neg, "k": k, "strategy": "best_score"})
    assert response.status_code == 200, response.text
    payload = response.json()
    # 22 images: every one is among the positives' neighbours, so the ranking is exact here.
    assert result_ids(payload) == brute_force(ids, best, leave_out, k)
    assert payload["strategy"].startswith("best_score")

    # An upload is a positive like an indexed image: the same bytes give the same ranking.
    path = next(p for p, i in indexed.ids.items() if i == pos[1])
    mixed = client.post(
        "/search",
        params={"positive": [pos[0]], "negative": neg, "k": k},
        files={"file": ("q.jpg", Path(path).read_bytes(), "image/jpeg")},
    ).json()
    assert (
        result_ids(mixed)[: k - 1]
        == [i for i in brute_force(ids, vectors @ query, set(), k + 3) if i not in {pos[0], *neg}][: k - 1]
    )

    # Negatives alone: away from them.
    away = client.post("/search", params={"negative": neg, "k": 3}).json()
    assert result_ids(away) == brute_force(ids, -(vectors @ by_id[neg[0]]), set(neg), 3)

    # Tag filters apply as for one image.
    tag = "imagenet:" + client.get(f"/images/{shoes[0]}").json()["tags"][0]["label"]
    filtered = client.post("/search", params={"positive": pos, "k": 5, "tag": tag}).json()
    assert all(any(f"{t['head']}:{t['label']}" == tag for t in r["tags"]) for r in filtered["results"])
    assert not set(result_ids(filtered)) & set(pos)


def test_cli_search_by_several_examples_is_the_api_search(client, indexed):
    """`lookalike search ID ID --unlike ID --strategy best_score --json` answers as POST /search does."""
    shoes = sorted(i for p, i in indexed.ids.items() if "/shoes/" in p)
    other = next(i for p, i in sorted(indexed.ids.items()) if "/shoes/" not in p)
    for strategy in ("average", "best_score"):
        api = client.post(
            "/search", params={"positive": shoes[:2], "negative": [other], "k": 6, "strategy": strategy}
        ).json()
        args = ["search", str(shoes[0]), "--like", str(shoes[1]), "--unlike", str(other), "--strategy", strategy]
        args += ["-k", "6", "--json", "--home", str(indexed.home)]
        run = CliRunner().invoke(cli.app, args, catch_exceptions=False, env=databases.cli_env(args))
        assert run.exit_code == 0, run.output
        assert result_ids(json.loads(run.stdout)) == result_ids(api)
    args = ["search", "--strategy", "median", str(shoes[0]), str(shoes[1]), "--home", str(indexed.home)]
    run = CliRunner().invoke(cli.app, args, env=databases.cli_env(args))
    assert run.exit_code == 1 and "unknown strategy 'median'" in run.output


def test_several_examples_refused_clearly(client, indexed):
    some = sorted(indexed.ids.values())[0]
    assert client.post("/search", params={"positive": [some, 10**12]}).status_code == 404
    bad = client.post("/search", params={"positive": [some, some + 1], "strategy": "median"})
    assert bad.status_code == 422
    cancel = client.post("/search", params={"positive": [some], "negative": [some]})
    assert cancel.status_code == 422 and "both a positive and a negative" in cancel.json()["detail"]
    too_many = client.post("/search", params={"positive": list(range(1, 60))})
    assert too_many.status_code == 422


def test_missing_file_part_is_422(client):
    response = client.post("/search", data={"k": "3"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "file"]
    wrong_name = client.post("/search", files={"image": ("a.jpg", b"\xff\xd8", "image/jpeg")})
    assert wrong_name.status_code == 422


# -- upload limit ------------------------------------------------------------------------------


def _multipart_parts(boundary: str) -> tuple[bytes, bytes]:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head, f"\r\n--{boundary}--\r\n".encode()


def test_upload_limit_in_process(indexed):
    small = databases.home_settings(indexed.home, model_cache=indexed.settings.model_cache, max_upload_bytes=LIMIT)
    app = create_app(small)
    photo = next(p for p in jpegs(indexed) if p.stat().st_size < LIMIT - 1000)
    with TestClient(app) as test_client:
        assert test_client.post("/search", files=upload(photo)).status_code == 200  # under the limit

        big = test_client.post("/search", files={"file": ("big.jpg", bytes(LIMIT + 1), "image/jpeg")})
        assert big.status_code == 413
        assert f"upload limit of {LIMIT} bytes" in big.json()["detail"]

        # Streamed (no Content-Length): the app pulls the body chunk by chunk; once past the
        # limit it answers 413 (not the 400 FastAPI makes of a failed form parse) and stops reading.
        head, tail = _multipart_parts("b0undary")
        chunk = 16_384
        body = [head] + [b"\xff" * chunk] * 40 + [tail]
        pulled = {"bytes": 0, "messages": 0}
        sent: list[dict] = []

        async def receive() -> dict:
            part = body[pulled["messages"]]
            pulled["messages"] += 1
            pulled["bytes"] += len(part)
            return {"type": "http.request", "body": part, "more_body": pulled["messages"] < len(body)}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/search",
            "raw_path": b"/search",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"testserver"), (b"content-type", b"multipart/form-data; boundary=b0undary")],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        asyncio.run(app(scope, receive, send))
        starts = [m for m in sent if m["type"] == "http.response.start"]
        assert [m["status"] for m in starts] == [413]
        reply = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        assert f"upload limit of {LIMIT} bytes" in json.loads(reply)["detail"]
        total = sum(map(len, body))
        assert total > 8 * LIMIT
        assert pulled["bytes"] <= LIMIT + chunk + len(head)  # stopped right after crossing the limit

        # The server is fine afterwards.
        assert test_client.get("/health").status_code == 200


# -- a real server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(indexed, tmp_path_factory) -> Iterator[str]:
    """`lookalike serve` in its own process, configured through the environment like a user would."""
    env = {
        "LOOKALIKE_MAX_UPLOAD_BYTES": str(LIMIT),
        "LOOKALIKE_THUMBNAIL_SIZE": str(THUMB),
        **databases.home_env(indexed.home),
    }
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with running_server(indexed.home, model_cache=indexed.settings.model_cache, env=env, log=log) as base:
        yield base


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"connection closed before a response: {data!r}"
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        piece = sock.recv(65536)
        assert piece
        rest += piece
    return status, headers, rest[:length]


def _open_upload(port: int, framing: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(
        (
            f"POST /search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: multipart/form-data; boundary=b0undary\r\n"
            f"{framing}\r\n\r\n"
        ).encode()
    )
    return sock


def test_server_search_and_routes(server, indexed):
    query = jpegs(indexed)[6]
    with httpx.Client(base_url=server, timeout=60) as http:
        response = http.post("/search", files=upload(query), data={"k": "3"})
        assert response.status_code == 200, response.text
        payload = response.json()
        assert result_ids(payload)[0] == indexed.id_of(query) and len(payload["results"]) == 3
        assert set(payload["timings_ms"]) >= {"decode_ms", "embed_ms", "search_ms"}
        image_id = indexed.id_of(query)
        assert http.get(f"/images/{image_id}/file").content == query.read_bytes()
        thumb = Image.open(io.BytesIO(http.get(f"/images/{image_id}/thumbnail").content))
        assert max(thumb.size) == THUMB
        assert http.get("/images/123456789/similar").status_code == 404
        assert http.get("/docs").status_code == 200


def test_server_refuses_a_chunked_upload_over_the_limit_while_it_streams(server):
    port = httpx.URL(server).port
    head, _ = _multipart_parts("b0undary")
    sock = _open_upload(port, "Transfer-Encoding: chunked")
    with sock:
        # Send twice the limit and never finish the body: a server that waited for the whole
        # upload before checking would never answer (the socket times out after 60 s).
        try:
            for part in [head] + [b"\xff" * 16_384] * (2 * LIMIT // 16_384):
                sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # a server may stop listening once it has answered; the answer is what counts
        status, headers, body = _read_response(sock)
    assert status == 413
    assert f"upload limit of {LIMIT} bytes" in json.loads(body)["detail"]

    # The same through an ordinary client: a generator body goes out chunked, with no length.
    def chunks():
        yield head
        for _ in range(40):
            yield b"\xff" * 16_384
        yield b"\r\n--b0undary--\r\n"

    response = httpx.post(
        f"{server}/search",
        content=chunks(),
        headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
        timeout=60,
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413


def test_server_refuses_a_declared_length_over_the_limit_before_reading(server):
    port = httpx.URL(server).port
    with _open_upload(port, "Content-Length: 1000000000") as sock:
        status, _, body = _read_response(sock)  # nothing of the body was sent
    assert status == 413 and str(LIMIT) in json.loads(body)["detail"]

    response = httpx.post(f"{server}/search", files={"file": ("big.jpg", bytes(LIMIT + 10), "image/jpeg")}, timeout=60)
    assert int(response.request.headers["content-length"]) > LIMIT
    assert response.status_code == 413
    assert httpx.get(f"{server}/health", timeout=60).status_code == 200


def test_server_concurrent_searches(server, indexed):
    queries = jpegs(indexed)[:4]
    with httpx.Client(base_url=server, timeout=120) as http:
        expected = {q: http.post("/search", files=upload(q), data={"k": "5"}).json() for q in queries}

        def one(q: Path) -> tuple[Path, int, dict]:
            r = http.post("/search", files=upload(q), data={"k": "5"})
            return q, r.status_code, r.json()

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(one, [queries[i % 4] for i in range(32)]))
    assert [status for _, status, _ in got] == [200] * 32
    for q, _, payload in got:
        assert result_ids(payload) == result_ids(expected[q])
        assert [r["score"] for r in payload["results"]] == pytest.approx(
            [r["score"] for r in expected[q]["results"]], abs=1e-5
        )


# -- concurrency in process --------------------------------------------------------------------


def test_concurrent_requests_share_one_model(client, indexed):
    library = client.app.state.library
    backbone = library.backbone()
    session = backbone.session._session  # the runtime's session, opened once in the lifespan
    assert session is not None
    onnx_files = {p: p.stat().st_mtime_ns for p in indexed.settings.model_cache.glob("*.onnx")}
    queries = jpegs(indexed)[:4]
    ids = [indexed.id_of(q) for q in queries]
    sequential = {q: client.post("/search", files=upload(q), data={"k": "6"}).json() for q in queries}
    similar = {i: client.get(f"/images/{i}/similar?k=6").json() for i in ids}

    def work(n: int) -> list[tuple[str, object, int, dict]]:
        out = []
        for j in range(3):
            q = queries[(n + j) % 4]
            r = client.post("/search", files=upload(q), data={"k": "6"})
            out.append(("search", q, r.status_code, r.json()))
            i = ids[(n + j) % 4]
            r = client.get(f"/images/{i}/similar?k=6")
            out.append(("similar", i, r.status_code, r.json()))
        return out

    with ThreadPoolExecutor(16) as pool:
        got = [item for chunk in pool.map(work, range(16)) for item in chunk]
    assert len(got) == 96
    assert all(status == 200 for _, _, status, _ in got)
    for kind, key, _, payload in got:
        expected = sequential[key] if kind == "search" else similar[key]
        assert result_ids(payload) == result_ids(expected)
        assert [r["score"] for r in payload["results"]] == pytest.approx(
            [r["score"] for r in expected["results"]], abs=1e-5
        )
    # One Library, one backbone, one inference session; nothing was exported again.
    assert client.app.state.library is library
    assert library.backbone() is backbone and backbone.session._session is session
    assert {p: p.stat().st_mtime_ns for p in indexed.settings.model_cache.glob("*.onnx")} == onnx_files


def test_empty_home_serves_empty_results(settings, indexed):
    """A home with nothing indexed yet: the service starts, answers, and finds nothing."""
    with TestClient(create_app(settings)) as empty:
        assert empty.get("/health").json() == {"status": "ok", "images": 0, "backbone": None}
        response = empty.post("/search", files=upload(jpegs(indexed)[0]), data={"k": "5"})
        assert response.status_code == 200, response.text
        assert response.json()["results"] == []
        assert empty.get("/images/1").status_code == 404
        assert empty.get("/images/1/similar").status_code == 404
        assert empty.get("/stats").json()["images"]["total"] == 0
