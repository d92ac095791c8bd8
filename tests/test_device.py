"""LOOKALIKE_DEVICE=auto|cpu|cuda: where the model runs, decided without starting CUDA.

This machine may or may not have a GPU: the decision itself is checked on given facts (a GPU
seen or not, a CUDA runtime installed or not), and the command line on this machine's own.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from faults.faultlib import base_env, cli
from PIL import Image

from indexer.backbones import onnx_providers
from indexer.device import choose_device, missing_cuda_runtime, resolve_device, session_runtime, visible_gpus
from indexer.errors import LookalikeError
from indexer.settings import Settings


def test_auto_takes_a_usable_gpu_and_falls_back_to_the_cpu_quietly():
    assert choose_device("auto", gpus=1, missing=None) == "cuda"
    assert choose_device("auto", gpus=0, missing=None) == "cpu"
    assert choose_device("auto", gpus=2, missing="onnxruntime-gpu") == "cpu"
    assert choose_device("cpu", gpus=4, missing=None) == "cpu"
    assert choose_device("cuda", gpus=1, missing=None) == "cuda"


def test_cuda_that_cannot_be_had_is_a_clear_error():
    with pytest.raises(LookalikeError, match="shows no CUDA GPU"):
        choose_device("cuda", gpus=0, missing=None)
    with pytest.raises(LookalikeError, match="pip install onnxruntime-gpu"):
        choose_device("cuda", gpus=1, missing=missing_cuda_runtime("onnx") or "pip install onnxruntime-gpu")
    with pytest.raises(LookalikeError, match="unknown device 'gpu'"):
        choose_device("gpu", gpus=1, missing=None)
    with pytest.raises(ValueError, match="device"):
        Settings(device="gpu")


def test_cuda_visible_devices_hides_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == 0
    assert resolve_device("auto", "onnx") == "cpu"


def test_the_exported_model_runs_on_onnx_runtime_on_a_gpu():
    assert session_runtime("openvino", "cuda") == "onnx"  # OpenVINO drives no NVIDIA GPU
    assert session_runtime("openvino", "cpu") == "openvino"
    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    cuda, cpu = onnx_providers("cuda")
    # float32 on the GPU as on the CPU (no TF32), and the CPU for operators CUDA lacks.
    assert cuda == ("CUDAExecutionProvider", {"use_tf32": "0"}) and cpu == "CPUExecutionProvider"


def test_index_on_cuda_indexes_on_a_gpu_or_says_why_it_cannot(tmp_path: Path, model_cache: Path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    proc = subprocess.run(
        cli("index", str(folder), "-q"),
        env=base_env(tmp_path / "home", model_cache, LOOKALIKE_DEVICE="cuda", LOOKALIKE_RUNTIME="onnx"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        choose_device("cuda", visible_gpus(), missing_cuda_runtime("onnx"))
    except LookalikeError as exc:
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert str(exc) in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "home" / "index").exists()  # nothing written
    else:  # a machine with a GPU and onnxruntime-gpu
        assert proc.returncode == 0 and "added 3" in proc.stderr, proc.stderr[-2000:]
