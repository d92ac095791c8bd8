"""POST /images and DELETE /images/{id}: images added and removed through the API.

A real home (20 of the shipped photos, indexed by the pipeline) served by the real app; every
answer is checked against the database, the uploads folder and a search of the served index.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

import databases
from conftest import SAMPLES
from indexer.library import Library
from indexer.models import ExampleRow, ImageRow, TagRow
from indexer.pipeline import index_folders
from service.app import create_app

pytestmark = pytest.mark.storage


@pytest.fixture(scope="module")
def home(tmp_path_factory, model_cache):
    root = tmp_path_factory.mktemp("uploads")
    photos = root / "photos"
    photos.mkdir()
    for path in sorted(SAMPLES.rglob("*.jpg"))[::4]:
        shutil.copy2(path, photos / f"{path.parent.name}-{path.name}")
    settings = databases.home_settings(root / "home", model_cache=model_cache)
    library = Library(settings)
    assert index_folders(library, [str(photos)]).embedded == 20
    library.close()
    return settings, photos


@pytest.fixture(scope="module")
def client(home):
    with TestClient(create_app(home[0])) as test_client:
        yield test_client


def counts(settings) -> tuple[int, int, int]:
    library = Library(settings)
    with library.sessions() as session:
        images = session.scalar(select(func.count()).select_from(ImageRow))
        tags = session.scalar(select(func.count()).select_from(TagRow))
        examples = session.scalar(select(func.count()).select_from(ExampleRow))
    library.close()
    return images, tags, examples


def png_of(path: Path, size: int = 200) -> bytes:
    out = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").resize((size, size)).save(out, format="PNG")
    return out.getvalue()


def uploads(settings) -> list[Path]:
    return sorted(p for p in (settings.resolved_home / "uploads").rglob("*") if p.is_file())


def test_an_uploaded_image_is_indexed_tagged_and_searchable(home, client):
    settings, photos = home
    source = sorted(photos.iterdir())[3]
    data = png_of(source)
    before = counts(settings)
    added = client.post("/images", files={"file": ("mine.png", data, "image/png")})
    assert added.status_code == 201, added.text
    image = added.json()
    stored = Path(image["path"])
    assert stored.parent.parent == (settings.resolved_home / "uploads").resolve() and stored.suffix == ".png"
    assert stored.read_bytes() == data and image["format"] == "PNG" and image["status"] == "indexed"
    assert image["tags"] and {t["head"] for t in image["tags"]} == {"imagenet"}
    assert counts(settings)[0] == before[0] + 1
    # Served at once: its file, and found by a search from the photo it was made from.
    assert client.get(f"/images/{image['id']}/file").content == data
    found = client.post("/search", files={"file": ("q.jpg", source.read_bytes(), "image/jpeg")}).json()
    assert image["id"] in [r["id"] for r in found["results"][:3]]
    # The same bytes again: the same image, nothing new.
    again = client.post("/images", files={"file": ("again.png", data, "image/png")})
    assert again.status_code == 200 and again.json()["id"] == image["id"]
    assert counts(settings)[0] == before[0] + 1 and len(uploads(settings)) >= 1

    # Deleted: row, vector, tags, examples and file go; the served index no longer finds it.
    put = client.put(
        "/heads/mine/examples",
        json={"type": "multilabel", "examples": [{"image_id": image["id"], "labels": ["mine"]}]},
    )
    assert put.status_code == 200, put.text
    assert client.delete(f"/images/{image['id']}").status_code == 204
    assert not stored.exists()
    assert client.get(f"/images/{image['id']}").status_code == 404
    assert counts(settings) == before
    found = client.post("/search", files={"file": ("q.jpg", source.read_bytes(), "image/jpeg")}).json()
    assert image["id"] not in [r["id"] for r in found["results"]]
    assert client.delete(f"/images/{image['id']}").status_code == 404


def test_bad_uploads_are_refused_and_leave_nothing(home, client):
    settings, photos = home
    before, files_before = counts(settings), uploads(settings)
    jpeg = sorted(photos.iterdir())[0].read_bytes()
    cases = [
        (b"", 422),
        (b"not an image at all", 415),
        (jpeg[: len(jpeg) // 3], 422),  # truncated
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, 415),  # a PNG signature, then nothing Pillow can identify
    ]
    for data, status in cases:
        refused = client.post("/images", files={"file": ("bad.jpg", data, "image/jpeg")})
        assert refused.status_code == status, (data[:20], refused.status_code, refused.text)
        assert refused.json()["detail"], refused.json()
    assert client.post("/images", data={"nothing": "here"}).status_code == 422
    assert counts(settings) == before and uploads(settings) == files_before


def test_images_of_indexed_folders_are_not_deleted_through_the_api(home, client):
    settings, photos = home
    library = Library(settings)
    with library.sessions() as session:
        image_id, path = session.execute(select(ImageRow.id, ImageRow.path).order_by(ImageRow.id)).first()
    library.close()
    refused = client.delete(f"/images/{image_id}")
    assert refused.status_code == 409 and "indexed folder" in refused.json()["detail"]
    assert Path(path).is_file() and client.get(f"/images/{image_id}").status_code == 200
    assert client.delete("/images/987654321").status_code == 404
