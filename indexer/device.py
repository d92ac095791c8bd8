"""Where the model runs: `LOOKALIKE_DEVICE=auto|cpu|cuda`.

A CUDA GPU is used when the machine shows one and the runtime that would drive it is installed:
ONNX Runtime's CUDA build (`onnxruntime-gpu`) for the exported model, a CUDA build of torch for
the torch runtime. OpenVINO runs on CPUs only here, so the exported model goes to ONNX Runtime
on a GPU. Everything is checked without starting CUDA (device files, package metadata): the
indexer forks its decoders after this check, and a forked CUDA context is unusable.
"""

from __future__ import annotations

import glob
import os
from importlib.metadata import PackageNotFoundError, version

from indexer.errors import LookalikeError

DEVICES = ("auto", "cpu", "cuda")
ORT_GPU_HINT = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use: the driver's device files, narrowed by CUDA_VISIBLE_DEVICES."""
    found = len(glob.glob("/dev/nvidia[0-9]*"))
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return found
    named = [d for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    return min(found, len(named))


def missing_cuda_runtime(runtime: str) -> str | None:
    """What to install so that `runtime` can run on a CUDA GPU; None when it can."""
    if runtime == "torch":
        import torch  # the torch runtime imports it anyway

        return None if torch.version.cuda else "a CUDA build of torch (https://pytorch.org/get-started/locally/)"
    try:
        version("onnxruntime-gpu")
    except PackageNotFoundError:
        return f"ONNX Runtime's CUDA build ({ORT_GPU_HINT})"
    return None


def check_device(requested: str) -> None:
    if requested not in DEVICES:
        raise LookalikeError(f"unknown device {requested!r}: use one of {', '.join(DEVICES)}")


def choose_device(requested: str, gpus: int, missing: str | None) -> str:
    """ "cpu" or "cuda" for the `requested` device, given what the machine has; a clear error
    when cuda is asked for and cannot be had (auto quietly falls back to the CPU)."""
    check_device(requested)
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" and gpus < 1:
        raise LookalikeError(
            "LOOKALIKE_DEVICE=cuda, but this machine shows no CUDA GPU (no /dev/nvidia* device, "
            "or CUDA_VISIBLE_DEVICES hides them)"
        )
    if requested == "cuda" and missing:
        raise LookalikeError(f"LOOKALIKE_DEVICE=cuda needs {missing}")
    return "cuda" if gpus >= 1 and not missing else "cpu"


def resolve_device(requested: str, runtime: str) -> str:
    if requested == "cpu":
        return "cpu"
    gpus = visible_gpus()
    return choose_device(requested, gpus, missing_cuda_runtime(runtime) if gpus else None)


def session_runtime(runtime: str, device: str) -> str:
    """The runtime that runs the exported model on `device` (OpenVINO has no CUDA device)."""
    return "onnx" if device == "cuda" and runtime == "openvino" else runtime
