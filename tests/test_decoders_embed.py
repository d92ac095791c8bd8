"""`lookalike index` embeds in its decoder processes (one single-threaded model session per core).

The parent only plans, commits and tags: it must not load a model runtime at all, and what the
decoders store must be what the backbone computes for the same files. A decoder whose model
cannot run sends pixels instead, which the parent then embeds itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import REPO, SAMPLES, rows_by_path
from indexer import store
from indexer.backbones import load_backbone
from indexer.decode import decode_for_model
from indexer.decode_worker import DecodeOptions, Task, decode_chunk
from indexer.library import DEFAULT_BACKBONE

PARENT = """
import json, sys
from pathlib import Path
from indexer.library import Library
from indexer.pipeline import index_folders
from indexer.settings import Settings
library = Library(Settings(home=Path(sys.argv[1]), model_cache=Path(sys.argv[2])))
report = index_folders(library, [sys.argv[3]])
print(json.dumps({
    "added": report.added, "embedded": report.embedded, "failed": report.failed,
    "runtimes": sorted(m for m in ("openvino", "onnxruntime", "torch") if m in sys.modules),
}))
"""


def test_decoders_embed_and_the_parent_loads_no_runtime(tmp_path, model_cache, photo_dir):
    load_backbone(DEFAULT_BACKBONE, runtime="openvino", cache_dir=model_cache)  # exported (session-wide cache)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    proc = subprocess.run(
        [sys.executable, "-c", PARENT, str(home), str(model_cache), str(photo_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    files = sorted(photo_dir.rglob("*.jpg"))
    assert result["added"] == result["embedded"] == len(files) and result["failed"] == []
    assert result["runtimes"] == [], "the indexing parent imported a model runtime: it embedded itself"

    # What the decoders stored is what the backbone computes for the same files.
    from indexer.library import Library
    from indexer.settings import Settings

    library = Library(Settings(home=home, model_cache=model_cache))
    backbone = library.backbone()
    with library.sessions() as session:
        backbone_id = store.backbone_in_use(session).id
        stored = {int(i): v for ids, vectors in store.iter_vectors(session, backbone_id) for i, v in zip(ids, vectors)}
    assert len(stored) == len(files)
    by_path = {path: row.id for path, row in rows_by_path(library).items()}
    pixels = np.stack([decode_for_model(f.read_bytes(), backbone.preprocess, max_pixels=89_478_485)[0] for f in files])
    expected = backbone.embed(pixels)
    for f, vector in zip(files, expected):
        np.testing.assert_allclose(stored[by_path[str(f)]], vector, atol=1e-5)
    library.close()


def test_a_decoder_whose_model_cannot_run_sends_pixels(tmp_path, model_cache):
    backbone = load_backbone(DEFAULT_BACKBONE, runtime="openvino", cache_dir=model_cache)
    photo = sorted(SAMPLES.rglob("*.jpg"))[0]
    task = Task(str(photo), photo.stat().st_size, photo.stat().st_mtime_ns)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model" * 100)
    for runtime in ("openvino", "onnx"):
        options = DecodeOptions(backbone.preprocess, 89_478_485, 1 << 30, model_file=str(broken), model_runtime=runtime)
        (decoded,) = decode_chunk(options, [(task, False)])
        assert decoded.error is None and decoded.vector is None
        assert decoded.pixels is not None and decoded.pixels.shape == (224, 224, 3)
    # With the real file the same call returns the vector, and no pixels.
    options = DecodeOptions(backbone.preprocess, 89_478_485, 1 << 30, model_file=str(backbone.model_path))
    (decoded,) = decode_chunk(options, [(task, False)])
    assert decoded.pixels is None and decoded.vector.shape == (1280,) and decoded.norm > 0
    pixels = decode_for_model(photo.read_bytes(), backbone.preprocess, max_pixels=89_478_485)[0]
    np.testing.assert_allclose(decoded.vector, backbone.embed(pixels[None])[0], atol=1e-5)
    assert decoded.info.format == "JPEG" and Path(decoded.task.path) == photo
