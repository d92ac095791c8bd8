"""Optional API keys, end to end: real requests through the real ASGI app on a real small index,
and a real `lookalike serve` configured through the environment.

Without keys everything is open (and `serve` says so, loudly when bound beyond loopback). With
`LOOKALIKE_API_KEYS`, every route but /health and the web page itself needs
`Authorization: Bearer KEY` or `X-API-Key: KEY`; with `LOOKALIKE_ADMIN_KEYS`, routes that change
data need an admin key.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

import databases
from conftest import SAMPLES
from indexer.library import Library
from indexer.models import ImageRow
from indexer.pipeline import index_folders
from indexer.settings import Settings
from live_server import running_server
from service.app import create_app

USER_KEYS = ["user-key-one", "user-key-two"]  # two keys, both valid
ADMIN_KEY = "admin-key-0123456789"
HTTP_TIMEOUT = 60  # seconds: httpx waits 5 by default, too short on a loaded machine


@dataclass
class Indexed:
    settings: Settings
    photos: Path
    ids: list[int]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, model_cache) -> Iterator[Indexed]:
    with pytest.MonkeyPatch.context() as mp:
        databases.clear_settings(mp)
        root = tmp_path_factory.mktemp("auth")
        photos = root / "photos"
        photos.mkdir()
        for path in sorted(SAMPLES.rglob("*.jpg"))[::16]:
            shutil.copy2(path, photos / path.name)
        settings = Settings(home=root / "home", model_cache=model_cache, reload_interval=0)
        library = Library(settings)
        assert index_folders(library, [str(photos)]).added == 5
        with library.sessions() as session:
            ids = sorted(session.scalars(select(ImageRow.id)))
        library.close()
        yield Indexed(settings, photos, ids)


def _client(indexed: Indexed, **keys) -> TestClient:
    return TestClient(create_app(indexed.settings.model_copy(update=keys)))


@pytest.fixture(scope="module")
def keyed(indexed) -> Iterator[TestClient]:
    """API keys and an admin key."""
    with _client(indexed, api_keys=USER_KEYS, admin_keys=[ADMIN_KEY]) as client:
        yield client


@pytest.fixture(scope="module")
def open_client(indexed) -> Iterator[TestClient]:
    with _client(indexed) as client:
        yield client


def _upload(indexed: Indexed) -> dict:
    path = sorted(indexed.photos.iterdir())[0]
    return {"file": (path.name, path.read_bytes(), "image/jpeg")}


def _data_routes(indexed: Indexed) -> list[str]:
    image_id = indexed.ids[0]
    return [
        f"/images/{image_id}",
        f"/images/{image_id}/similar?k=2",
        f"/images/{image_id}/file",
        f"/images/{image_id}/thumbnail",
        "/images/999999",  # even a 404 is not given away without a key
        "/tags",
        "/heads",
        "/heads/imagenet",
        "/heads/imagenet/plots/loss.png",
        "/stats",
        "/docs",
        "/openapi.json",
        "/redoc",
    ]


PUBLIC = ["/health", "/", "/static/app.js", "/static/style.css", "/favicon.ico"]


def _assert_401(response, message: str) -> None:
    assert response.status_code == 401, (response.request.url, response.status_code, response.text[:200])
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["detail"]


# -- no keys ------------------------------------------------------------------------------------------


def test_without_keys_everything_is_open(open_client, indexed):
    for url in _data_routes(indexed):
        response = open_client.get(url)
        assert response.status_code != 401, url
        assert "www-authenticate" not in response.headers
    assert open_client.get("/stats").status_code == 200
    assert open_client.post("/search", files=_upload(indexed)).status_code == 200
    # No security scheme is advertised when there is nothing to authenticate.
    assert "securitySchemes" not in open_client.get("/openapi.json").json().get("components", {})


# -- API keys -----------------------------------------------------------------------------------------


def test_public_routes_need_no_key(keyed):
    for url in PUBLIC:
        response = keyed.get(url)
        assert response.status_code == 200, (url, response.status_code)
    assert keyed.get("/health").json()["status"] == "ok"
    assert keyed.get("/static/not-there.js").status_code == 404


def test_data_routes_refuse_requests_without_a_valid_key(keyed, indexed):
    for url in _data_routes(indexed):
        _assert_401(keyed.get(url), "an API key is required")
        for headers in [
            {"Authorization": "Bearer wrong-key"},
            {"X-API-Key": "wrong-key"},
            {"Authorization": f"Bearer {USER_KEYS[0][:-1]}"},  # a prefix of a key
            {"Authorization": f"Bearer {USER_KEYS[0]}x"},  # a key plus a character
            {"X-API-Key": USER_KEYS[0].upper()},  # keys are case-sensitive
            {"Authorization": f"Basic {USER_KEYS[0]}"},  # not the bearer scheme
            {"Authorization": USER_KEYS[0]},  # no scheme at all
            {"Authorization": "Bearer "},
            {"X-API-Key": ""},
        ]:
            response = keyed.get(url, headers=headers)
            assert response.status_code == 401, (url, headers)
            assert response.headers["www-authenticate"] == "Bearer"
    _assert_401(keyed.post("/search", files=_upload(indexed)), "an API key is required")
    _assert_401(keyed.post("/search", files=_upload(indexed), headers={"X-API-Key": "nope"}), "invalid API key")


def test_non_ascii_and_odd_header_bytes_are_a_401_not_a_500(keyed):
    for value in [
        b"\xff\xfe\x00garbage",
        "Bearer caf\u00e9".encode("latin-1"),
        b"Bearer \x80\x81",
        b"Bearer " + b"k" * 8000,
    ]:
        assert keyed.get("/stats", headers={"Authorization": value}).status_code == 401
        assert keyed.get("/stats", headers={"X-API-Key": value}).status_code == 401


def test_each_key_works_with_either_header(keyed, indexed):
    for key in USER_KEYS + [ADMIN_KEY]:  # an admin key is valid for reads too
        for headers in [
            {"Authorization": f"Bearer {key}"},
            {"Authorization": f"bearer  {key} "},  # scheme case and spacing are forgiven
            {"X-API-Key": key},
        ]:
            for url in _data_routes(indexed):
                response = keyed.get(url, headers=headers)
                assert response.status_code != 401, (url, headers, response.text[:200])
            assert keyed.get("/stats", headers=headers).json()["images"]["indexed"] == 5
    headers = {"X-API-Key": USER_KEYS[1]}
    image_id = indexed.ids[0]
    assert (
        keyed.get(f"/images/{image_id}/file", headers=headers).content
        == Path(keyed.get(f"/images/{image_id}", headers=headers).json()["path"]).read_bytes()
    )
    # POST /search is a query: an ordinary key is enough.
    response = keyed.post("/search", files=_upload(indexed), data={"k": "3"}, headers=headers)
    assert response.status_code == 200 and len(response.json()["results"]) == 3
    # So is POST /duplicates/plan: it answers a plan and writes nothing (no groups here: nothing planned).
    response = keyed.post("/duplicates/plan", json={"tier": "copy", "image_ids": [image_id]}, headers=headers)
    assert response.status_code == 200 and response.json() == {"tier": "copy", "remove": []}
    _assert_401(keyed.post("/duplicates/plan", json={"image_ids": [image_id]}), "an API key is required")
    # A wrong key next to a right one still gets in (the right one is what counts).
    both = {"Authorization": "Bearer wrong", "X-API-Key": USER_KEYS[0]}
    assert keyed.get("/stats", headers=both).status_code == 200


def test_openapi_documents_the_keys(keyed):
    spec = keyed.get("/openapi.json", headers={"X-API-Key": USER_KEYS[0]}).json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer"}
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    search = spec["paths"]["/search"]["post"]
    assert "401" in search["responses"] and search["security"] == [{"bearer": []}, {"apiKey": []}]
    assert "401" in spec["paths"]["/images/{image_id}/file"]["get"]["responses"]
    assert "security" not in spec["paths"]["/health"]["get"]
    assert "401" not in spec["paths"]["/health"]["get"]["responses"]


def test_traversal_does_not_turn_a_data_route_public(keyed):
    """`/static/..` must not pass as a static asset: anything but a clean path needs a key."""
    for url in ["/static/../stats", "/static/%2e%2e/stats", "/static//../images/1/file", "/static/./../heads"]:
        response = keyed.get(url)
        assert response.status_code in (401, 404), (url, response.status_code)
        assert b"indexed" not in response.content


# -- admin keys -----------------------------------------------------------------------------------------

WRITES = [
    ("DELETE", "/images/1"),
    ("PUT", "/heads/imagenet"),
    ("PATCH", "/images/1"),
    ("POST", "/index"),
    ("POST", "/heads"),
    ("POST", "/images"),
    # The routes that teach heads: each changes the database.
    ("PUT", "/heads/nope/examples"),
    ("DELETE", "/heads/nope/examples/1"),
    ("POST", "/heads/nope/train"),
    ("POST", "/heads/nope/versions/1/activate"),
    ("DELETE", "/heads/nope"),
    # Decisions about duplicates are kept in the database.
    ("POST", "/duplicates/distinct"),
    ("POST", "/duplicates/keep"),
    ("DELETE", "/duplicates/keep/1"),
]


def test_write_routes_need_an_admin_key(keyed):
    for method, url in WRITES:
        _assert_401(keyed.request(method, url), "an API key is required")
        _assert_401(keyed.request(method, url, headers={"X-API-Key": "wrong"}), "invalid API key")
        for key in USER_KEYS:
            refused = keyed.request(method, url, headers={"Authorization": f"Bearer {key}"})
            assert refused.status_code == 403, (method, url, refused.status_code)
            assert "admin key" in refused.json()["detail"]
        # The admin key gets through to the router: no such route (404/405), no such head or image (404),
        # an image of an indexed folder (409), no body (422).
        admitted = keyed.request(method, url, headers={"X-API-Key": ADMIN_KEY})
        assert admitted.status_code in (404, 405, 409, 422), (method, url, admitted.status_code)
    # A write on a public path is still a write.
    assert keyed.post("/health").status_code == 401
    assert keyed.post("/health", headers={"X-API-Key": ADMIN_KEY}).status_code == 405


def test_admin_keys_alone_protect_writes_and_leave_reads_open(indexed):
    with _client(indexed, admin_keys=[ADMIN_KEY]) as client:
        assert client.get("/stats").status_code == 200
        assert client.get(f"/images/{indexed.ids[0]}/file").status_code == 200
        assert client.post("/search", files=_upload(indexed)).status_code == 200
        _assert_401(client.delete("/images/1"), "an API key is required")
        assert client.delete("/images/1", headers={"X-API-Key": ADMIN_KEY}).status_code in (404, 409)


def test_api_keys_without_admin_keys_let_any_key_write(indexed):
    with _client(indexed, api_keys=USER_KEYS) as client:
        _assert_401(client.delete("/images/1"), "an API key is required")
        assert client.delete("/images/1", headers={"X-API-Key": USER_KEYS[0]}).status_code in (404, 409)


# -- settings -----------------------------------------------------------------------------------------


def test_keys_come_from_the_environment_comma_separated(monkeypatch):
    monkeypatch.setenv("LOOKALIKE_API_KEYS", " alpha, beta ,,gamma ")
    monkeypatch.setenv("LOOKALIKE_ADMIN_KEYS", "root-key")
    settings = Settings()
    assert settings.api_keys == ["alpha", "beta", "gamma"]
    assert settings.admin_keys == ["root-key"]
    assert "alpha" not in repr(settings) and "root-key" not in repr(settings)  # secrets stay out of logs
    monkeypatch.setenv("LOOKALIKE_API_KEYS", "")
    assert Settings().api_keys == []


# -- a real server ------------------------------------------------------------------------------------


def _serve(indexed: Indexed, log: Path, *args: str, host: str | None = None, **env: str):
    """The real server on the module's home: `lookalike serve [--host HOST] *args`, output in `log`."""
    home, cache = indexed.settings.home, indexed.settings.model_cache
    return running_server(home, model_cache=cache, env=env, extra_args=args, host=host, log=log)


def test_server_with_keys_from_the_environment(indexed, tmp_path):
    log_path = tmp_path / "serve.log"
    with _serve(indexed, log_path, LOOKALIKE_API_KEYS=",".join(USER_KEYS), LOOKALIKE_ADMIN_KEYS=ADMIN_KEY) as base:
        response = httpx.get(f"{base}/stats", timeout=HTTP_TIMEOUT)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        headers = {"Authorization": f"Bearer {USER_KEYS[1]}"}
        assert httpx.get(f"{base}/stats", headers=headers, timeout=HTTP_TIMEOUT).status_code == 200
        assert httpx.get(f"{base}/", timeout=HTTP_TIMEOUT).status_code == 200
        refused = httpx.delete(f"{base}/images/1", headers={"X-API-Key": USER_KEYS[0]}, timeout=HTTP_TIMEOUT)
        assert refused.status_code == 403
    log = log_path.read_text(errors="replace")
    assert "API keys required" in log and "no API keys" not in log
    assert ADMIN_KEY not in log and USER_KEYS[0] not in log


def test_server_says_when_no_keys_are_set_and_warns_beyond_loopback(indexed, tmp_path):
    log_path = tmp_path / "serve-loopback.log"
    with _serve(indexed, log_path) as base:  # the default host, 127.0.0.1
        assert httpx.get(f"{base}/stats", timeout=HTTP_TIMEOUT).status_code == 200
    log = log_path.read_text(errors="replace")
    assert "no API keys are set" in log and "warning" not in log.lower()

    log_path = tmp_path / "serve-any.log"
    with _serve(indexed, log_path, host="0.0.0.0") as base:
        assert httpx.get(f"{base}/stats", timeout=HTTP_TIMEOUT).status_code == 200  # reachable on loopback too
    log = " ".join(log_path.read_text(errors="replace").split())
    assert "no API keys are set" in log
    assert "warning: serving on 0.0.0.0, which is not a loopback address, without API keys" in log
    assert "LOOKALIKE_API_KEYS" in log
