"""The backbone interface: the three runtimes, the ONNX export cache, errors, and CLIP from local weights.

Everything runs the real models: the packaged EfficientNet-Lite0 weights through PyTorch and
through the exported ONNX graph (OpenVINO and ONNX Runtime), and a tiny randomly initialised
open_clip ViT (registered from a config file written here, its weights saved to a local file)
through lookalike end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import cli
from conftest import REPO, SAMPLES
from indexer.backbones import load_backbone
from indexer.decode import decode_for_model
from indexer.errors import LookalikeError, UnknownBackbone
from indexer.library import DEFAULT_BACKBONE, Library
from indexer.pipeline import index_folders
from indexer.search import search_image, search_similar
from indexer.settings import Settings
from indexer.stats import collect_stats
from service.app import create_app

MAX_PIXELS = 89_478_485


def photos(count: int) -> list[Path]:
    """Real photos from different classes."""
    paths = sorted(SAMPLES.rglob("*.jpg"))
    return paths[:: len(paths) // count][:count]


def model_input(paths: list[Path], backbone) -> np.ndarray:
    return np.stack([decode_for_model(p.read_bytes(), backbone.preprocess, max_pixels=MAX_PIXELS)[0] for p in paths])


def assert_unit_rows(vectors: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


# -- the default backbone ----------------------------------------------------------------------


def test_onnx_and_torch_runtimes_agree(model_cache):
    onnx = load_backbone(DEFAULT_BACKBONE, runtime="onnx", cache_dir=model_cache)
    eager = load_backbone(DEFAULT_BACKBONE, runtime="torch", cache_dir=model_cache)
    assert type(onnx).__name__ == "OnnxBackbone" and type(eager).__name__ == "TorchBackbone"
    assert onnx.name == eager.name == "efficientnet-lite0"
    assert onnx.dim == eager.dim == 1280
    assert onnx.preprocess == eager.preprocess
    assert onnx.preprocess.input_size == 224

    pixels = model_input(photos(6), onnx)
    assert pixels.shape == (6, 224, 224, 3) and pixels.dtype == np.uint8
    a, norms_a = onnx.embed_with_norms(pixels)
    b, norms_b = eager.embed_with_norms(pixels)
    for vectors, norms in [(a, norms_a), (b, norms_b)]:
        assert vectors.shape == (6, 1280) and vectors.dtype == np.float32
        assert norms.shape == (6,) and norms.dtype == np.float32 and (norms > 0).all()
        assert_unit_rows(vectors)
    np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(norms_a, norms_b, rtol=1e-4)
    # embed() is embed_with_norms()'s vectors; a batch of one gives the same row as a batch of six.
    # (Another run of the model: equal to float32 rounding, not necessarily to the bit.)
    np.testing.assert_allclose(onnx.embed(pixels), a, rtol=0, atol=1e-6)
    np.testing.assert_allclose(onnx.embed(pixels[2:3])[0], a[2], atol=1e-5)
    np.testing.assert_allclose(eager.embed(pixels[2:3])[0], b[2], atol=1e-5)
    # Different photos, different vectors.
    similarity = a @ a.T
    assert similarity[~np.eye(6, dtype=bool)].max() < 0.95

    # The ImageNet classifier comes along in both runtimes, identical.
    assert onnx.classifier is not None and eager.classifier is not None
    assert onnx.classifier.weight.shape == (1000, 1280) and len(onnx.classifier.labels) == 1000
    np.testing.assert_array_equal(onnx.classifier.weight, eager.classifier.weight)
    assert onnx.classifier.labels == eager.classifier.labels


def test_openvino_runs_the_exported_file_like_onnx_runtime(tmp_path, model_cache):
    """The default runtime: OpenVINO on the same ONNX file gives ONNX Runtime's vectors, in float32
    on any CPU (no bfloat16), from any thread; its compiled model is cached beside the file."""
    cache = tmp_path / "models"
    for name in os.listdir(model_cache):  # the session's export, without exporting again
        if not os.path.isdir(model_cache / name):
            os.makedirs(cache, exist_ok=True)
            os.link(model_cache / name, cache / name)
    assert Settings().runtime == "openvino"
    ov = load_backbone(DEFAULT_BACKBONE, runtime="openvino", cache_dir=cache)
    ort = load_backbone(DEFAULT_BACKBONE, runtime="onnx", cache_dir=cache)
    assert type(ov).__name__ == "OnnxBackbone" and ov.runtime == "openvino" and ov.model_path == ort.model_path
    assert (ov.dim, ov.preprocess, ov.classifier.labels) == (ort.dim, ort.preprocess, ort.classifier.labels)
    pixels = model_input(photos(6), ov)
    a, norms_a = ov.embed_with_norms(pixels)
    b, norms_b = ort.embed_with_norms(pixels)
    assert a.dtype == norms_a.dtype == np.float32 and a.shape == (6, 1280)
    assert_unit_rows(a)
    # bfloat16 would differ by ~1e-2 (cosine 0.996); float32 kernels of two runtimes by ~1e-7.
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(norms_a, norms_b, rtol=1e-5)
    np.testing.assert_allclose(ov.embed(pixels[4:5])[0], a[4], atol=1e-5)
    # Results are copies: a later call does not overwrite an earlier result.
    first = ov.embed(pixels[:2])
    kept = first.copy()
    ov.embed(pixels[2:4])
    np.testing.assert_array_equal(first, kept)
    # One request per thread: concurrent calls (a server answering queries side by side) stay right.
    with ThreadPoolExecutor(4) as pool:
        rows = list(pool.map(lambda i: ov.embed(pixels[i : i + 1])[0], [i % 6 for i in range(24)]))
    for i, row in enumerate(rows):
        np.testing.assert_allclose(row, a[i % 6], atol=1e-5)
    assert any((cache / "openvino-cache").iterdir()), "the compiled model is cached"


def test_openvino_sends_no_telemetry(model_cache):
    """Importing openvino starts a thread that forks a process to send a usage event to Google
    Analytics; lookalike keeps it from loading. A fresh process that embeds with OpenVINO has
    neither the telemetry package, nor its thread, nor a child process."""
    code = (
        "import sys, threading, multiprocessing, time; from pathlib import Path; import numpy as np; "
        "from indexer.backbones import load_backbone; "
        f"b = load_backbone('efficientnet-lite0', runtime='openvino', cache_dir=Path({str(model_cache)!r})); "
        "b.embed(np.full((1, 224, 224, 3), 128, np.uint8)); time.sleep(0.5); "
        "print(sys.modules.get('openvino_telemetry') is None, 'openvino' in sys.modules, "
        "len(threading.enumerate()) == len([t for t in threading.enumerate() if 'ThreadPoolExecutor' not in t.name]), "
        "len(multiprocessing.active_children()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "True", "0"], proc.stdout


def test_onnx_export_is_cached(tmp_path):
    cache = tmp_path / "models"
    first = load_backbone(DEFAULT_BACKBONE, runtime="onnx", cache_dir=cache)
    files = sorted(p.name for p in cache.iterdir())
    (model,) = [cache / n for n in files if n.endswith(".onnx")]
    stem = model.name[: -len(".onnx")]
    assert stem.startswith("efficientnet-lite0-")
    assert files == sorted([f"{stem}.classifier.npz", f"{stem}.json", f"{stem}.onnx"])  # no temporary files
    meta = json.loads((cache / f"{stem}.json").read_text())
    assert meta["backbone"] == "efficientnet-lite0" and meta["dim"] == 1280 and meta["classifier"] is True

    # Mark the files with an old mtime: a re-export would overwrite them with a new one.
    old = 1_000_000_000 * 10**9
    for name in files:
        os.utime(cache / name, ns=(old, old))
    second = load_backbone(DEFAULT_BACKBONE, runtime="onnx", cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == files
    assert {name: (cache / name).stat().st_mtime_ns for name in files} == {name: old for name in files}
    pixels = model_input(photos(2), first)
    np.testing.assert_allclose(first.embed(pixels), second.embed(pixels), rtol=0, atol=1e-6)  # the same model

    # Loading from the cache needs no PyTorch at all.
    code = (
        "import sys; from pathlib import Path; from indexer.backbones import load_backbone; "
        f"b = load_backbone('efficientnet-lite0', runtime='onnx', cache_dir=Path({str(cache)!r})); "
        "print(b.dim, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1280", "False"]
    assert {name: (cache / name).stat().st_mtime_ns for name in files} == {name: old for name in files}


def test_unknown_backbone_is_a_clear_error(tmp_path, model_cache):
    for runtime in ("openvino", "onnx", "torch"):
        with pytest.raises(UnknownBackbone) as info:
            load_backbone("resnet-9000", runtime=runtime, cache_dir=tmp_path)
        assert "resnet-9000" in str(info.value) and "efficientnet-lite0" in str(info.value)  # lists the choices
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing exported

    with pytest.raises(LookalikeError, match="unknown runtime 'tensorflow'"):
        load_backbone(DEFAULT_BACKBONE, runtime="tensorflow", cache_dir=model_cache)

    # Through a library and through the command line.
    library = Library(Settings(home=tmp_path / "home", model_cache=model_cache, backbone="resnet-9000"))
    with pytest.raises(UnknownBackbone):
        library.backbone()
    library.close()
    folder = tmp_path / "empty"
    folder.mkdir()
    result = CliRunner().invoke(cli.app, ["index", str(folder), "--home", str(tmp_path / "h2"), "--backbone", "nope"])
    assert result.exit_code == 1
    assert "unknown backbone 'nope'" in result.stderr and "Traceback" not in result.output


# -- CLIP through open_clip, from a local weights file ------------------------------------------


TINY = "lookalike-tiny-vit"
TINY_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
}


@dataclass
class TinyClip:
    name: str  # lookalike's backbone name
    weights: Path
    model: torch.nn.Module  # the open_clip model the weights came from


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> TinyClip:
    folder = tmp_path_factory.mktemp("clip")
    config = folder / "configs" / f"{TINY}.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config.parent)
    assert TINY in open_clip.list_models()
    torch.manual_seed(0)
    model = open_clip.create_model(TINY).eval()  # randomly initialised; nothing is downloaded
    weights = folder / "tiny-vit.pt"
    torch.save(model.state_dict(), weights)
    return TinyClip(f"clip:{TINY}", weights, model)


def _open_clip_reference(model, pixels: np.ndarray) -> np.ndarray:
    """What open_clip itself computes for the same crops, normalised the way open_clip documents."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        features = model.encode_image((x - mean) / std, normalize=True)
    return features.numpy()


def test_clip_from_local_weights_in_every_runtime(tiny_clip, tmp_path):
    cache = tmp_path / "models"
    onnx = load_backbone(tiny_clip.name, runtime="onnx", cache_dir=cache, clip_weights=tiny_clip.weights)
    eager = load_backbone(tiny_clip.name, runtime="torch", cache_dir=cache, clip_weights=tiny_clip.weights)
    ov = load_backbone(tiny_clip.name, runtime="openvino", cache_dir=cache, clip_weights=tiny_clip.weights)
    assert len(list(cache.glob("*.onnx"))) == 1
    for backbone in (onnx, eager, ov):
        assert backbone.name == tiny_clip.name and backbone.dim == 24 and backbone.classifier is None
        pre = backbone.preprocess
        assert pre.input_size == 64 and pre.crop_pct == 1.0
        np.testing.assert_allclose(pre.mean, open_clip.OPENAI_DATASET_MEAN)
        np.testing.assert_allclose(pre.std, open_clip.OPENAI_DATASET_STD)

    pixels = model_input(photos(5), onnx)
    assert pixels.shape == (5, 64, 64, 3)
    reference = _open_clip_reference(tiny_clip.model, pixels)
    a, b = onnx.embed(pixels), eager.embed(pixels)
    assert a.shape == b.shape == (5, 24)
    np.testing.assert_allclose(ov.embed(pixels), a, atol=1e-5)
    assert_unit_rows(a)
    assert_unit_rows(b)
    np.testing.assert_allclose(b, reference, atol=1e-5)
    np.testing.assert_allclose(a, reference, atol=1e-4)
    # The weights file is what is used: other weights, other vectors.
    assert np.abs(a - _open_clip_reference(open_clip.create_model(TINY).eval(), pixels)).max() > 1e-2


@pytest.mark.parametrize("runtime", ["openvino", "onnx", "torch"])
def test_clip_index_and_search_end_to_end(tiny_clip, photo_dir, tmp_path, runtime):
    settings = Settings(
        home=tmp_path / "home",
        model_cache=tmp_path / "models",
        backbone=tiny_clip.name,
        clip_weights=tiny_clip.weights,
        runtime=runtime,
    )
    library = Library(settings)
    report = index_folders(library, [str(photo_dir)])
    assert report.failed == [] and report.added == 20 and report.embedded == 20
    stats = collect_stats(library)
    assert stats["backbone"] == tiny_clip.name and stats["dimension"] == 24 and stats["index"]["vectors"] == 20

    queries = sorted(photo_dir.rglob("*.jpg"))[:3]
    for query in queries:
        response = search_image(library, query.read_bytes(), 5)
        top = response.results[0]
        assert top.path == str(query) and top.score == pytest.approx(1.0, abs=1e-4)
        assert all(r.score < top.score - 1e-4 for r in response.results[1:])
        similar = search_similar(library, top.id, 4)
        assert [r.id for r in similar.results] == [r.id for r in response.results[1:]]
    # The stored vectors are exactly what the backbone computes for the same file.
    crop = model_input([queries[0]], library.backbone())
    stored = library.index().reconstruct(search_image(library, queries[0].read_bytes(), 1).results[0].id)
    np.testing.assert_allclose(stored, library.backbone().embed(crop)[0], atol=1e-5)
    library.close()

    if runtime == "onnx":
        # The HTTP service serves a CLIP home too (its warm-up uses the model's own input size).
        with TestClient(create_app(settings)) as client:
            health = client.get("/health").json()
            assert health == {"status": "ok", "images": 20, "backbone": tiny_clip.name}
            files = {"file": ("q.jpg", queries[1].read_bytes(), "image/jpeg")}
            results = client.post("/search", files=files, data={"k": "3"}).json()["results"]
            assert results[0]["path"] == str(queries[1]) and results[0]["score"] == pytest.approx(1.0, abs=1e-4)

    # Without the weights file the same home gives a clear error, not a download attempt.
    without = Library(settings.model_copy(update={"clip_weights": None}))
    with pytest.raises(LookalikeError, match="needs a local weights file: set LOOKALIKE_CLIP_WEIGHTS"):
        without.backbone()
    without.close()


def test_clip_errors_are_clear(tiny_clip, tmp_path):
    cache = tmp_path / "models"
    for runtime in ("onnx", "torch"):
        with pytest.raises(LookalikeError, match="needs a local weights file") as info:
            load_backbone(tiny_clip.name, runtime=runtime, cache_dir=cache)
        assert type(info.value) is LookalikeError and tiny_clip.name in str(info.value)
        with pytest.raises(LookalikeError, match="CLIP weights file not found"):
            load_backbone(tiny_clip.name, runtime=runtime, cache_dir=cache, clip_weights=tmp_path / "missing.pt")
        with pytest.raises(UnknownBackbone, match="no-such-model"):
            load_backbone("clip:no-such-model", runtime=runtime, cache_dir=cache, clip_weights=tiny_clip.weights)
        garbage = tmp_path / "garbage.pt"
        garbage.write_bytes(b"not a checkpoint" * 64)
        with pytest.raises(LookalikeError, match="cannot load CLIP weights"):
            load_backbone(tiny_clip.name, runtime=runtime, cache_dir=cache, clip_weights=garbage)
        other = tmp_path / "other.pt"
        torch.save({"some.tensor": torch.zeros(3)}, other)
        with pytest.raises(LookalikeError, match="cannot load CLIP weights"):
            load_backbone(tiny_clip.name, runtime=runtime, cache_dir=cache, clip_weights=other)
    assert not cache.exists() or not list(cache.glob("*.onnx"))

    # The command line says the same, without a traceback.
    folder = tmp_path / "empty"
    folder.mkdir()
    result = CliRunner().invoke(
        cli.app, ["index", str(folder), "--home", str(tmp_path / "home"), "--backbone", tiny_clip.name]
    )
    assert result.exit_code == 1
    assert "LOOKALIKE_CLIP_WEIGHTS" in result.stderr and "Traceback" not in result.output
