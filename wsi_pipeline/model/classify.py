"""Batched cell classification: uint8 crops in, class probabilities out.

:class:`Classifier` builds a card's network once, loads (and checks) its weights, and runs
batches under ``torch.inference_mode`` in channels-last layout, with fp16 autocast on a GPU, or
(on a CPU, by default) through ONNX Runtime or OpenVINO (:mod:`wsi_pipeline.model.backends`).
Several weights files (a snapshot ensemble) are averaged; test-time augmentation averages over
the eight flips and 90° rotations (or a subset). :func:`get_classifier` keeps one instance per
card, device and backend per process, so pipeline workers load the model once.

On a CPU the batches are shared among as many threads as torch has, each running whole
forward passes on one thread, whatever the backend: torch's own threads wait for one another
at every operation (on 2 cores they lose 6 % of the throughput, a fifth when malloc is not
tuned) and stall badly when another busy thread (the pipeline's detection) holds a core.
:meth:`Classifier.stream` keeps those workers for a whole run, each taking the next batch when
it is done, so that none waits for the others at the end of a call either.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from numpy.typing import NDArray

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.core.prefetch import prefetch
from wsi_pipeline.model.adapt import (
    ColourMoments,
    adapted_normalisation,
    nearest_reference,
    references,
)
from wsi_pipeline.model.backends import Member, load_members, resolve_backend
from wsi_pipeline.model.cards import (
    ClassifierCard,
    build_model,
    load_novelty,
    load_state_dicts,
    resolve_card,
)

T = TypeVar("T")
R = TypeVar("R")

__all__ = [
    "TTA_TRANSFORMS",
    "Classifier",
    "Prediction",
    "classify_crops",
    "default_batch_size",
    "get_classifier",
    "resolve_device",
    "to_unit_tensor",
]

#: Test-time augmentations as (quarter turns, mirror): the dihedral group of the square.
TTA_TRANSFORMS: tuple[tuple[int, bool], ...] = tuple(
    (k, m) for m in (False, True) for k in range(4)
)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" is CUDA when available, else CPU.

    Raises
    ------
    InputError
        When a CUDA device is asked for that torch does not see.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if resolved.type == "cuda" and (resolved.index or 0) >= gpus:
        raise InputError(
            str(device), f"torch sees {gpus} CUDA GPU(s) on this machine; use --device cpu or auto"
        )
    return resolved


def default_batch_size(device: torch.device, input_size: int) -> int:
    """A batch size for the device: 64 on CPU; on a GPU, scaled to its free memory.

    On CPU larger batches gain nothing once the cores are busy. On a GPU about 6 MB per
    96-px image (activations of a compact CoAtNet in fp16, with margin) is budgeted from half
    the free memory, capped at 1024.
    """
    if device.type != "cuda":
        return 64
    free, _ = torch.cuda.mem_get_info(device)
    per_image = 6e6 * (input_size / 96) ** 2
    return int(max(32, min(1024, free * 0.5 // per_image)))


def to_unit_tensor(crops: NDArray[np.uint8], device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) crops to float (N, 3, H, W) in [0, 1], channels-last, on ``device``.

    On a GPU the uint8 batch goes through pinned memory with a non-blocking copy, a quarter of
    the bytes of a float transfer.
    """
    batch = torch.from_numpy(np.ascontiguousarray(crops))
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    # NHWC memory permuted to NCHW is channels-last without a copy.
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


@dataclass(frozen=True)
class Prediction:
    """What the classifier says of a batch of crops.

    Attributes
    ----------
    probabilities : ndarray of float32, shape (N, n_classes)
        Mean calibrated softmax of the ensemble's members.
    agreement : ndarray of float32, shape (N,)
        Share of the members whose own top class is the ensemble's top class (1 for a single
        model).
    novelty : ndarray of float32, shape (N,)
        Distance of each cell's features from the nearest training class over the card's
        threshold (:mod:`wsi_pipeline.model.novelty`): above 1, unlike every class the card
        knows. NaN when the card has no novelty model.
    """

    probabilities: NDArray[np.float32]
    agreement: NDArray[np.float32]
    novelty: NDArray[np.float32]


class Classifier:
    """One card's network (or ensemble) ready for inference.

    Parameters
    ----------
    card : ClassifierCard, name or path
    device : str
        "auto", "cpu", "cuda" or "cuda:N".
    batch_size : int, optional
        Crops per forward pass (default: :func:`default_batch_size`).
    models : list of torch.nn.Module, optional
        Networks to use instead of the card's weights files (e.g. fine-tuned in memory); they
        run in torch.
    backend : str
        What runs the networks: "auto" (torch on a GPU, else the fastest installed CPU
        runtime), "torch", "onnxruntime" or "openvino" (see
        :mod:`wsi_pipeline.model.backends`). Saliency always uses the torch networks
        (:attr:`models`).
    """

    def __init__(
        self,
        card: ClassifierCard | str | os.PathLike[str],
        device: str = "auto",
        batch_size: int | None = None,
        models: list[torch.nn.Module] | None = None,
        backend: str = "auto",
    ):
        self.card = resolve_card(card)
        self.device = resolve_device(device)
        # Networks other than the card's weights files have no exported twin.
        self.backend = "torch" if models is not None else resolve_backend(backend, self.device)
        self.batch_size = batch_size or default_batch_size(self.device, self.card.model.input_size)
        if models is None:
            models = [self._build(state) for state in load_state_dicts(self.card)]
            self.novelty = load_novelty(self.card)
        else:  # networks other than the card's own: its novelty model does not describe them
            self.novelty = None
        # torch accepts memory_format= in Module.to; its stubs list no overload with it.
        self.models = [
            m.to(self.device, memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
            for m in models
        ]
        #: Each training lab's crops' colour moments, the nearest of which a slide's are
        #: matched to; empty when the card cannot adapt to a slide.
        self.reference_colours = references(self.card.adaptation)
        self._mean = torch.tensor(self.card.model.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.card.model.std, device=self.device).view(1, 3, 1, 1)
        self._members: list[Member] | None = None
        self._loading = threading.Lock()

    def _build(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = build_model(self.card)
        model.load_state_dict(state)
        return model

    def members(self) -> list[Member]:
        """Each ensemble member as the backend runs it (normalised batch in, pooled features
        and logits out), loaded on the first call: an ONNX backend exports (or finds in its
        cache) and compiles every network then, so a classifier built only for its torch
        networks (training, saliency) never pays for it."""
        with self._loading:
            if self._members is None:
                self._members = load_members(self.backend, self.card, self.models, self.workers)
            return self._members

    @property
    def codes(self) -> tuple[str, ...]:
        """Class codes in the order of the probability columns."""
        return self.card.codes

    def adapts_to(self, slide_colours: ColourMoments | None) -> bool:
        """Whether :meth:`normalise` moves a slide of these colours (the card records its
        training labs' colours and the slide's are known)."""
        return slide_colours is not None and bool(self.reference_colours)

    def preprocess(
        self, crops: NDArray[np.uint8], slide_colours: ColourMoments | None = None
    ) -> torch.Tensor:
        """uint8 (N, H, W, 3) to normalised float (N, 3, H, W), channels-last, on the device.

        With ``slide_colours`` (the moments of the slide's crops) and a card that records its
        own, the slide's colours are matched to the training crops' (see
        :mod:`wsi_pipeline.model.adapt`).
        """
        size = self.card.model.input_size
        if crops.ndim != 4 or crops.shape[1:] != (size, size, 3) or crops.dtype != np.uint8:
            raise ValueError(
                f"crops must be uint8 (N, {size}, {size}, 3) for card {self.card.name!r}, "
                f"got {crops.dtype} {crops.shape}"
            )
        return self.normalise(to_unit_tensor(crops, self.device), slide_colours)

    def normalise(
        self, x: torch.Tensor, slide_colours: ColourMoments | None = None
    ) -> torch.Tensor:
        """RGB in [0, 1], (N, 3, H, W), normalised as the card's network expects; matched to
        the training crops' colours when ``slide_colours`` is given (and the card records
        them)."""
        mean, std = self._mean, self._std
        if slide_colours is not None and self.adapts_to(slide_colours):
            reference = nearest_reference(self.reference_colours, slide_colours)
            assert reference is not None  # adapts_to: there are references
            adapted = adapted_normalisation(
                self.card.model.mean, self.card.model.std, reference, slide_colours
            )
            mean, std = (torch.tensor(v, device=self.device).view(1, 3, 1, 1) for v in adapted)
        return (x - mean) / std

    @torch.inference_mode()
    def forward_members(
        self, x: torch.Tensor, tta: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each ensemble member's calibrated softmax of a batch, shape (members, N, classes),
        and the cells' novelty, shape (N,) (None without a novelty model), both averaged over
        ``tta`` dihedral transforms."""
        views = [x] if tta <= 1 else [_dihedral(x, k, m) for k, m in TTA_TRANSFORMS[:tta]]
        temperature = self.card.model.temperature
        novelty = self.novelty
        members, distances = [], []
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            for k, member in enumerate(self.members()):
                softmax, distance = [], []
                for view in views:
                    features, logits = member(view)
                    if novelty is not None:
                        distance.append(novelty.members[k].distance(features.float()))
                    softmax.append((logits.float() / temperature).softmax(1))
                members.append(torch.stack(softmax).mean(0))
                if novelty is not None:
                    distances.append(torch.stack(distance).mean(0))
        probabilities = torch.stack(members)
        if novelty is None:
            return probabilities, None
        return probabilities, novelty.score(torch.stack(distances))

    def forward(self, x: torch.Tensor, tta: int = 0) -> torch.Tensor:
        """Mean calibrated softmax over the ensemble (and ``tta`` transforms) of a batch."""
        return self.forward_members(x, tta)[0].mean(0)

    @property
    def workers(self) -> int:
        """Threads that each run whole forward passes: torch's threads on a CPU, one on a GPU."""
        return torch.get_num_threads() if self.device.type == "cpu" else 1

    @property
    def pass_size(self) -> int:
        """Crops per forward pass: the batch shared among the workers.

        On 2 cores 32 crops run faster than 64, whose activations no longer fit in one thread's
        malloc heap (see pipeline.tune_malloc): 570 against 330-420 crops/s.
        """
        return -(-self.batch_size // self.workers)

    def stream(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """``map(fn, items)`` on the workers, in order, with up to two items a worker ahead.

        Each worker takes the next item as soon as its last is done, without waiting for the
        others, and runs torch on one thread (a process-wide setting, held until the stream
        ends; :meth:`predict_proba` inside ``fn`` then runs on the calling worker). With one
        worker, ``fn`` runs on the calling thread.
        """
        workers = self.workers
        if workers == 1:
            yield from map(fn, items)
            return
        with _one_thread_per_op:
            torch.set_num_threads(1)
            try:  # prefetch ends its passes before the restore
                yield from prefetch(fn, items, 2 * workers, workers=workers)
            finally:
                torch.set_num_threads(workers)

    def predict(
        self,
        crops: NDArray[np.uint8],
        tta: int = 0,
        slide_colours: ColourMoments | None = None,
    ) -> Prediction:
        """Class probabilities of crops, how far the ensemble's members agree, and how unlike
        the known classes each cell is.

        Parameters
        ----------
        crops : ndarray of uint8, shape (N, S, S, 3)
            Crops of the card's field of view at its input size ``S``.
        tta : int
            Number of dihedral test-time transforms averaged (0 or 1: none; 8: all flips and
            90° rotations).
        slide_colours : ColourMoments, optional
            The colour moments of the slide the crops come from: adapt to it (see
            :meth:`preprocess`).

        Returns
        -------
        Prediction
        """
        probabilities = np.empty((len(crops), len(self.codes)), np.float32)
        agreement = np.empty(len(crops), np.float32)
        novelty = np.full(len(crops), np.nan, np.float32)
        # Small calls are shared among the workers too.
        step = max(1, min(self.pass_size, -(-len(crops) // self.workers)))

        def run(start: int) -> None:
            x = self.preprocess(crops[start : start + step], slide_colours)
            members, distance = self.forward_members(x, tta)
            mean = members.mean(0)
            votes = members.argmax(2) == mean.argmax(1)[None]
            stop = start + len(mean)
            probabilities[start:stop] = mean.cpu().numpy()
            agreement[start:stop] = votes.float().mean(0).cpu().numpy()
            if distance is not None:
                novelty[start:stop] = distance.cpu().numpy()

        for _ in self.stream(run, range(0, len(crops), step)):
            pass
        return Prediction(probabilities, agreement, novelty)

    def predict_proba(
        self,
        crops: NDArray[np.uint8],
        tta: int = 0,
        slide_colours: ColourMoments | None = None,
    ) -> NDArray[np.float32]:
        """Class probabilities of crops, (N, n_classes) float32: :meth:`predict` (same
        parameters) without the agreement and novelty."""
        return self.predict(crops, tta, slide_colours).probabilities


#: Held while torch runs one thread per operation (a process-wide setting) for CPU workers.
_one_thread_per_op = threading.Lock()


def _dihedral(x: torch.Tensor, quarter_turns: int, mirror: bool) -> torch.Tensor:
    x = torch.rot90(x, quarter_turns, dims=(2, 3)) if quarter_turns else x
    return torch.flip(x, dims=(3,)) if mirror else x


#: Classifiers built in this process, by card file, weights, device, batch size and backend.
_built: dict[tuple[Path, tuple[str, ...], str, int | None, str], Classifier] = {}
_building = threading.Lock()


def get_classifier(
    card: ClassifierCard | str | os.PathLike[str],
    device: str = "auto",
    batch_size: int | None = None,
    backend: str = "auto",
) -> Classifier:
    """The process-wide :class:`Classifier` of a card on a device and backend (built once,
    its backend loaded at once: a pipeline worker exports and compiles before its first
    task)."""
    card = resolve_card(card)
    resolved = resolve_device(device)
    backend = resolve_backend(backend, resolved)
    weights = tuple(w.sha256 for w in card.weights)
    key = (card.path.resolve(), weights, str(resolved), batch_size, backend)
    with _building:
        if key not in _built:
            classifier = Classifier(card, str(resolved), batch_size, backend=backend)
            classifier.members()
            _built[key] = classifier
        return _built[key]


def classify_crops(
    crops: NDArray[np.uint8],
    card: ClassifierCard | str | os.PathLike[str] = "default",
    device: str = "auto",
    batch_size: int | None = None,
    tta: int = 0,
    backend: str = "auto",
) -> NDArray[np.float32]:
    """Class probabilities (N, n_classes) of uint8 crops with a card's classifier."""
    return get_classifier(card, device, batch_size, backend).predict_proba(crops, tta)
