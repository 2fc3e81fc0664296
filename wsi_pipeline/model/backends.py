"""Inference backends: a card's networks run by PyTorch, ONNX Runtime or OpenVINO.

Every backend runs each ensemble member as a *member*: a function from a normalised float batch
(N, 3, S, S) to the network's pooled pre-logit features (for the novelty model) and its logits,
both as CPU or GPU tensors. Everything around it (preprocessing, slide-colour adaptation,
test-time augmentation, temperature, ensemble averaging, agreement, novelty) stays in
:class:`wsi_pipeline.model.classify.Classifier`, in torch, so every backend gives the same
answers (probabilities within 1e-6 of PyTorch's on the shipped cards; the tests hold them to
1e-4). PyTorch stays the backend of GPUs, and of saliency, which needs gradients.

**Which backend ``auto`` picks.** PyTorch on a GPU; on a CPU the fastest installed backend, as
``benchmarks/classifier_speed.py --backends`` measured it for the ``default`` card (2 shared
cores, 512 crops of 96 px, the classifier's two single-threaded workers, alternating rounds,
best of 5; ``benchmarks/backends.json``): ONNX Runtime ahead of OpenVINO, both ahead of
PyTorch eager. :data:`CPU_PREFERENCE` holds that order.

**Threads.** ONNX Runtime runs whole forward passes on one thread per call, and the classifier
runs one such worker per core (:meth:`Classifier.stream`), as it does with PyTorch: on 2 cores
two ONNX Runtime workers of one intra-op thread classified 237 cells/s where one worker of two
threads gave 140-160 (its threads wait for each other at every operator, and for the pipeline's
detection thread whenever it holds a core). OpenVINO runs one call at a time on its own threads
(one per worker).

**Where the ONNX files live.** Each weights file is exported (``torch.onnx.export``, the
TorchScript exporter, ``dynamo=False``, opset :data:`OPSET`, a dynamic batch axis) on first use
into a user cache, ``$XDG_CACHE_HOME/wsi-pipeline/onnx/<weights SHA-256>-<settings>.onnx``
(``~/.cache`` without ``XDG_CACHE_HOME``), where ``<settings>`` hashes the card's architecture,
input size, the torch version and the export settings. Exporting takes about 5 s per member
of ``default`` (2 cores), once per machine, so every card a lab trains works without a
further step, and the repository does not carry its weights twice. A changed weights file has
another SHA-256 and is exported anew; a file is written atomically (renamed into place when
whole), so Dask workers exporting the same member at once each publish a whole file. A cache
that cannot be written costs an export per process, never a failure. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.core.files import atomic_path

# torch, ONNX Runtime and OpenVINO are imported where used, so that the command line reads
# BACKENDS without loading any of them.
if TYPE_CHECKING:
    import torch

    from wsi_pipeline.model.cards import ClassifierCard, WeightsFile

__all__ = [
    "BACKENDS",
    "CPU_PREFERENCE",
    "OPSET",
    "Member",
    "export_onnx",
    "installed",
    "load_members",
    "onnx_cache_dir",
    "onnx_model",
    "onnx_path",
    "resolve_backend",
]

log = logging.getLogger(__name__)

#: ``--backend`` choices.
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
#: The CPU backends ``auto`` considers, fastest first (see the module's docstring).
CPU_PREFERENCE = ("onnxruntime", "openvino")
#: What each backend is imported as, and the pip requirement that installs it.
_MODULES = {"onnxruntime": ("onnxruntime", "onnxruntime"), "openvino": ("openvino", "openvino")}
#: ONNX opset of the exported networks.
OPSET = 17
#: Raised when what an export writes changes, so older cached files are not reused.
EXPORT_VERSION = 1

#: One ensemble member as a backend runs it: normalised (N, 3, S, S) in, (features, logits) out.
Member = Callable[["torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]]


def installed(backend: str) -> bool:
    """Whether a backend's package can be imported (torch always can)."""
    return backend == "torch" or importlib.util.find_spec(_MODULES[backend][0]) is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs: ``auto`` is torch on a GPU, else the first installed of
    :data:`CPU_PREFERENCE` (torch when none is).

    Raises
    ------
    InputError
        An unknown backend, an ONNX backend on a GPU, or one that is not installed.
    """
    if backend not in BACKENDS:
        raise InputError(backend, f"unknown backend; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type != "cpu":
            return "torch"
        return next((b for b in CPU_PREFERENCE if installed(b)), "torch")
    if backend != "torch" and device.type != "cpu":
        raise InputError(backend, "runs on the CPU; use --device cpu, or --backend torch on a GPU")
    if not installed(backend):
        raise InputError(backend, f"not installed; pip install {_MODULES[backend][1]}")
    return backend


def onnx_cache_dir() -> Path:
    """Where exported networks are kept: ``$XDG_CACHE_HOME/wsi-pipeline/onnx``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "wsi-pipeline" / "onnx"


def onnx_path(card: ClassifierCard, weights: WeightsFile) -> Path:
    """The cache file of one weights file of a card, keyed by its SHA-256 and by everything
    else that shapes the exported graph."""
    import torch

    spec = card.model
    settings = {
        "version": EXPORT_VERSION,
        "opset": OPSET,
        "exporter": "torchscript",
        "torch": torch.__version__,
        "architecture": spec.architecture,
        "kwargs": spec.kwargs,
        "cfg": spec.cfg,
        "input_size": spec.input_size,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    return onnx_cache_dir() / f"{weights.sha256}-{digest.hexdigest()[:16]}.onnx"


def export_onnx(model: torch.nn.Module, input_size: int) -> bytes:
    """A timm network as an ONNX model with outputs ``features`` (pooled pre-logit) and
    ``logits``, input ``input`` of shape (N, 3, ``input_size``, ``input_size``)."""
    import torch

    from wsi_pipeline.model.novelty import features_and_logits

    class FeaturesAndLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return features_and_logits(self.network, x)

    batch = {0: "n"}
    buffer = io.BytesIO()
    # The tracer warns of every Python branch in timm's code; the shapes they depend on are fixed.
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            FeaturesAndLogits().eval(),
            (torch.zeros(2, 3, input_size, input_size),),
            buffer,  # type: ignore[arg-type]  # TorchScript's exporter writes file objects too
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["features", "logits"],
            dynamic_axes={"input": batch, "features": batch, "logits": batch},
        )
    return buffer.getvalue()


def onnx_model(card: ClassifierCard, weights: WeightsFile, model: torch.nn.Module) -> bytes:
    """The ONNX model of one weights file (loaded into ``model``): from the cache, or exported
    and cached."""
    path = onnx_path(card, weights)
    if path.is_file():
        return path.read_bytes()
    log.info("exporting %s to ONNX (once per machine): %s", weights.path.name, path)
    data = export_onnx(model, card.model.input_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            temporary.write_bytes(data)
    except OSError as error:
        log.warning("ONNX cache %s not writable (%s): exported again next time", path, error)
    return data


def _onnxruntime_member(model: bytes) -> Member:
    import onnxruntime
    import torch

    options = onnxruntime.SessionOptions()
    # One thread per call: the classifier runs one worker per core (see the docstring).
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = session.run(None, {"input": x.contiguous().numpy()})
        return torch.from_numpy(features), torch.from_numpy(logits)

    return run


def _openvino_member(model: bytes, workers: int) -> Member:
    import openvino
    import torch

    config: dict[str, Any] = {
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": workers,
        # Where the CPU has bf16 units OpenVINO would use them by default: not PyTorch's answers.
        "INFERENCE_PRECISION_HINT": "f32",
    }
    core = openvino.Core()
    request = core.compile_model(core.read_model(model), "CPU", config).create_infer_request()
    # One request, one call at a time, OpenVINO's own threads working on it: two workers with
    # a request each on its own stream hung in a test (both waiting inside OpenVINO 2026.4).
    running = threading.Lock()

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with running:
            result = request.infer({0: x.contiguous().numpy()})
            # The request reuses its output buffers on its next call: copy them out.
            return torch.from_numpy(result["features"].copy()), torch.from_numpy(
                result["logits"].copy()
            )

    return run


def load_members(
    backend: str, card: ClassifierCard, models: Sequence[torch.nn.Module], workers: int
) -> list[Member]:
    """Each network of a card's ensemble as ``backend`` runs it.

    Parameters
    ----------
    backend : str
        A resolved backend (:func:`resolve_backend`), not ``auto``.
    card : ClassifierCard
        The card whose weights files ``models`` hold, in order.
    models : sequence of torch.nn.Module
        The card's networks, with their weights, in eval mode.
    workers : int
        Threads that will call the members at once.
    """
    from wsi_pipeline.model.novelty import features_and_logits

    if backend == "torch":
        return [partial(features_and_logits, model) for model in models]
    load: Callable[[bytes], Member] = _onnxruntime_member
    if backend == "openvino":
        load = partial(_openvino_member, workers=workers)
    return [
        load(onnx_model(card, weights, model))
        for weights, model in zip(card.weights, models, strict=True)
    ]
