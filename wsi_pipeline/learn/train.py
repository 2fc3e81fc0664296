"""Train a classifier card on folders of labelled cell images (``wsi train``).

The images of every folder are cut once to the card's field of view and input size, at that
folder's own pixel size, and kept in memory (and in a ``.npy`` cache), so an epoch costs only
the network. Training samples classes evenly, redraws each batch as another lab would have made
it (:mod:`wsi_pipeline.learn.augment`), optimises with AdamW under a cosine schedule with
warm-up (mixed precision on a GPU), and writes a resumable checkpoint after every epoch. In
snapshot-ensemble mode (DeepHeme) the cosine schedule restarts ``snapshots`` times and the
weights at the end of each cycle are kept; the card lists every snapshot and inference averages
them. Training starts from scratch or from a trained card's weights (``init``: fine-tuning).

With several folders (sources), the test split's confusion of the classes two sources share is
written into the card per source: a model that learnt a source's look instead of its cells calls
one source's neutrophils blasts.

The split is fixed per patient (or per image when patients are unknown) by
:func:`wsi_pipeline.learn.datasets.split_of`; the held-out test split's scores go into the card.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.core.files import atomic_path
from wsi_pipeline.learn.augment import AUGMENTATIONS, augment
from wsi_pipeline.learn.calibrate import (
    ensemble_probabilities,
    expected_calibration_error,
    fit_temperature,
)
from wsi_pipeline.learn.corrections import MANIFEST
from wsi_pipeline.learn.datasets import (
    folder_mpps,
    load_crops_cached,
    scan_labelled_folder,
    split_of,
)
from wsi_pipeline.learn.familiarity import add_familiarity
from wsi_pipeline.model.cards import (
    ClassifierCard,
    WeightsFile,
    build_model,
    load_state_dicts,
    resolve_card,
    save_weights,
    write_card,
)
from wsi_pipeline.model.classify import Classifier, resolve_device, to_unit_tensor
from wsi_pipeline.model.pretrained import PRETRAINED, init_from_pretrained
from wsi_pipeline.model.pretrained import provenance as pretrained_provenance

__all__ = [
    "LabelledCrops",
    "TrainConfig",
    "TrainResult",
    "augment",
    "calibrate_card",
    "fit",
    "member_logits",
    "source_confusion",
    "lr_at",
    "train_classifier",
]


@dataclass(frozen=True)
class TrainConfig:
    """Training options (every one is a ``wsi train`` option of the same name).

    Attributes
    ----------
    epochs : int
        Passes over the training split (each of ``len(train)`` class-balanced samples).
    snapshots : int
        Cosine cycles; 1 is a plain cosine schedule, more is a snapshot ensemble.
    batch_size : int
    lr : float
        Peak learning rate of AdamW.
    weight_decay : float
    warmup_epochs : float
        Linear warm-up at the start of the first cycle.
    label_smoothing : float
    val_fraction, test_fraction : float
        Shares of patients (or images) held out, see :func:`~wsi_pipeline.learn.datasets.split_of`.
    image_mpp : float, tuple of float or None
        Microns per pixel of the images: one value for every folder, or one per folder; None
        when they already are crops of the card's field of view (as the pipeline exports them).
    init : str or None
        A trained card (name or path) whose first weights file the network starts from
        (fine-tuning); layers whose shape differs (another class list) start fresh.
    pretrained : str or None
        Start from scratch, but with every layer that fits taken from these ImageNet weights
        (a source of :data:`~wsi_pipeline.model.pretrained.PRETRAINED`); the input is then
        normalised as those weights were trained.
    augment : {"other-labs", "one-lab"} or None
        The augmentation (:data:`~wsi_pipeline.learn.augment.AUGMENTATIONS`); None chooses
        ``other-labs`` from scratch and ``one-lab`` when fine-tuning (``init``).
    sampling : {"balanced", "natural"} or None
        How batches are drawn: every class equally often (``balanced``), or as often as the
        data holds it (``natural``). None chooses ``balanced`` from scratch, where the sources'
        class mix says nothing of any lab's, and ``natural`` when fine-tuning, where the data are
        a lab's own corrected cells and their mix is that lab's (balancing them makes the card
        call the rarer of two look-alike classes, eosinophils for neutrophils, far too often).
    distill : float
        When fine-tuning, weight of the parent's own answers on each batch (learning without
        forgetting, Li and Hoiem 2017): the KL divergence, at temperature ``DISTILL_T``, of the
        network's probabilities from the frozen parent's is added to the loss, so classes a
        lab's few corrections never show keep what the parent knew of them. 0 turns it off;
        it is off too when the template's class list differs from the parent's.
    seed : int
    device : str
        "auto" (CUDA when present), "cpu" or "cuda".
    threads : int or None
        CPU threads for torch (None: torch's default).
    cache_dir : path or None
        Where decoded crops are memoised.
    max_steps : int or None
        Stop after this many optimiser steps (tests and smoke runs).
    """

    epochs: int = 10
    snapshots: int = 1
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    image_mpp: float | tuple[float, ...] | None = None
    init: str | None = None
    pretrained: str | None = None
    augment: str | None = None
    sampling: str | None = None
    distill: float = 1.0
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    cache_dir: str | None = None
    max_steps: int | None = None


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes
    ----------
    card : ClassifierCard
        The written card, with weights and scores.
    history : list of dict
        Per epoch: epoch, step, train loss, validation accuracy, learning rate, seconds.
    test_scores : dict
        :func:`wsi_pipeline.learn.evaluate.classification_report` of the test split (empty when the
        split is empty).
    """

    card: ClassifierCard
    history: list[dict[str, float]] = field(default_factory=list)
    test_scores: dict[str, Any] = field(default_factory=dict)


@dataclass
class LabelledCrops:
    """Crops at a card's input size, their class indices (into the card's codes) and the index
    of the folder (source) each came from."""

    crops: NDArray[np.uint8]
    labels: NDArray[np.int64]
    sources: NDArray[np.int16] = field(default_factory=lambda: np.zeros(0, np.int16))


def lr_at(step: int, total: int, cycles: int, warmup: int) -> float:
    """Learning-rate factor in [0, 1]: linear warm-up, then ``cycles`` cosine decays to 0.

    Parameters
    ----------
    step : int
        Optimiser step, from 0.
    total : int
        Total number of steps.
    cycles : int
        Number of cosine cycles (snapshot ensemble when > 1).
    warmup : int
        Warm-up steps at the start of the first cycle.
    """
    if step < warmup:
        return (step + 1) / warmup
    cycle_len = math.ceil(total / cycles)
    position = (step % cycle_len) / cycle_len
    return 0.5 * (1.0 + math.cos(math.pi * position))


def _normalise(x: torch.Tensor, card: ClassifierCard) -> torch.Tensor:
    mean = x.new_tensor(card.model.mean).view(1, 3, 1, 1)
    std = x.new_tensor(card.model.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _load_splits(
    folders: list[Path], card: ClassifierCard, config: TrainConfig
) -> dict[str, LabelledCrops]:
    index = {code: i for i, code in enumerate(card.codes)}
    crops, labels, sources, subsets = [], [], [], []
    for k, (folder, mpp) in enumerate(
        zip(folders, folder_mpps(folders, config.image_mpp), strict=True)
    ):
        items = scan_labelled_folder(folder, card.codes)
        crops.append(
            load_crops_cached(
                [item.path for item in items],
                card.model.input_size,
                card.model.fov_um,
                mpp,
                config.cache_dir,
            )
        )
        labels += [index[item.label] for item in items]
        sources += [k] * len(items)
        subsets += [split_of(i.group, config.val_fraction, config.test_fraction) for i in items]
    all_crops = np.concatenate(crops)
    all_labels = np.array(labels, dtype=np.int64)
    all_sources = np.array(sources, dtype=np.int16)
    subset = np.array(subsets)
    return {
        s: LabelledCrops(all_crops[subset == s], all_labels[subset == s], all_sources[subset == s])
        for s in ("train", "val", "test")
    }


def _channel_stats(crops: NDArray[np.uint8]) -> tuple[list[float], list[float]]:
    axes = (0, 1, 2)
    mean = crops.mean(axis=axes, dtype=np.float64) / 255.0
    std = crops.std(axis=axes, dtype=np.float64) / 255.0
    return mean.round(4).tolist(), std.round(4).tolist()


#: Temperature of the parent's and the network's probabilities in the distillation term.
DISTILL_T = 2.0


def _distillation(logits: torch.Tensor, parent_logits: torch.Tensor) -> torch.Tensor:
    """KL divergence of the network's softened probabilities from the parent's, scaled by T²
    so that its gradients weigh as the cross-entropy's do (Hinton et al. 2015)."""
    student = F.log_softmax(logits.float() / DISTILL_T, dim=1)
    target = F.log_softmax(parent_logits.float() / DISTILL_T, dim=1)
    kl = F.kl_div(student, target, log_target=True, reduction="batchmean")
    return kl * DISTILL_T**2


def augmentation_name(config: TrainConfig) -> str:
    """The augmentation a run uses (see :attr:`TrainConfig.augment`)."""
    if config.augment is not None:
        return config.augment
    return "one-lab" if config.init else "other-labs"


def sampling_name(config: TrainConfig) -> str:
    """How a run draws its batches (see :attr:`TrainConfig.sampling`)."""
    if config.sampling is not None:
        return config.sampling
    return "natural" if config.init else "balanced"


def _balanced_order(labels: NDArray[np.int64], n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` sample indices drawn with replacement so that every class is equally likely."""
    counts = np.bincount(labels)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.float64)
    return torch.multinomial(weights, n, replacement=True, generator=generator)


@torch.inference_mode()
def _accuracy(
    model: torch.nn.Module, split: LabelledCrops | None, card: ClassifierCard, device
) -> float:
    if split is None or len(split.labels) == 0:
        return float("nan")
    model.eval()
    correct = 0
    for start in range(0, len(split.labels), 128):
        x = _normalise(to_unit_tensor(split.crops[start : start + 128], device), card)
        predicted = model(x).argmax(1).cpu().numpy()
        correct += int((predicted == split.labels[start : start + 128]).sum())
    return correct / len(split.labels)


def train_classifier(
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    card: str | os.PathLike[str] | ClassifierCard,
    out: str | os.PathLike[str],
    config: TrainConfig = TrainConfig(),
    workdir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train the network of a card on a labelled folder and write the trained card.

    Parameters
    ----------
    data : path or sequence of paths
        Labelled folders (MLL layout, see :mod:`wsi_pipeline.learn.datasets`), each at the
        pixel size ``config.image_mpp`` gives it.
    card : name, path or ClassifierCard
        Template card: architecture, input size, field of view, classes (in output order),
        provenance text. Its weights, colour references and novelty model, if any, are ignored
        (training starts from scratch, or from ``config.init``).
    out : path
        Card file to write (``NAME.toml``); the weights go beside it as
        ``NAME.safetensors`` or ``NAME.snapshotK.safetensors``.
    config : TrainConfig
    workdir : path, optional
        Folder of the resumable ``checkpoint.pt`` (default: ``TMPDIR/wsi-train-NAME``). A run
        finds and resumes its checkpoint there.
    log : callable
        Receives one line per epoch.

    Returns
    -------
    TrainResult
    """
    template = resolve_card(card)
    folders = [Path(data)] if isinstance(data, str | os.PathLike) else [Path(d) for d in data]
    out = Path(out)
    workdir = Path(workdir or Path(tempfile.gettempdir()) / f"wsi-train-{out.stem}")
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    splits = _load_splits(folders, template, config)
    train = splits["train"]
    present = {template.codes[i] for i in np.unique(train.labels)}
    if not present:
        raise InputError(folders[0], "the training split holds no images")
    parent_card = resolve_card(config.init) if config.init else None
    if parent_card is None:
        # From scratch every class needs examples; fine-tuning keeps what the parent knows of
        # the classes a lab's corrections lack, and the parent's input normalisation.
        if len(present) < len(template.codes):
            missing = ", ".join(sorted(set(template.codes) - present))
            raise InputError(folders[0], f"training split has no images of {missing}")
        if config.pretrained:
            source = PRETRAINED[config.pretrained]
            mean, std = list(source.mean), list(source.std)
        else:
            mean, std = _channel_stats(train.crops)
    else:
        if config.pretrained:
            raise InputError(parent_card.path, "--pretrained starts a card; --init fine-tunes one")
        if config.snapshots > 1:
            raise InputError(
                parent_card.path, "fine-tuning trains one member per member of the parent card; "
                "--snapshots applies to training from scratch"
            )  # fmt: skip
        mean, std = list(parent_card.model.mean), list(parent_card.model.std)
    model_config = dataclasses.replace(template.model, mean=tuple(mean), std=tuple(std))
    # A trained template's colour references and novelty model describe its own networks, not
    # the ones trained here: the export fits them afresh.
    template = dataclasses.replace(template, model=model_config, adaptation={}, novelty={})
    log(
        f"{len(train.labels)} train, {len(splits['val'].labels)} val, "
        f"{len(splits['test'].labels)} test images on {device}"
    )

    starting_weights = None
    if parent_card is None:
        model = build_model(template)
        if config.pretrained:
            loaded = init_from_pretrained(model, config.pretrained)
            starting_weights = {**pretrained_provenance(config.pretrained), "tensors": len(loaded)}
            log(f"{len(loaded)} tensors from {starting_weights['package']} (ImageNet)")
        model = _on_device(model, device)
        snapshots, history = fit(model, template, train, splits["val"], config, workdir, log)
        parent = None
    else:
        model, snapshots, history, parent = _fine_tune(
            parent_card, template, splits, config, workdir, device, log
        )
    sources = {
        "sources": [str(f.resolve()) for f in folders],
        "parent": parent,
        "pretrained": starting_weights,
        "corrections": _corrections_manifests(folders),
    }
    return _export(template, snapshots, model, splits, out, config, history, device, sources)


def _corrections_manifests(folders: Sequence[Path]) -> list[dict[str, Any]]:
    """Where each corrections folder among ``folders`` came from (its ``corrections.json``,
    written by ``wsi corrections``): store, slide and edited export, with checksums."""
    found = []
    for folder in folders:
        manifest = folder / MANIFEST
        if manifest.is_file():
            record = json.loads(manifest.read_text(encoding="utf-8"))
            found.append({"folder": str(folder.resolve()), **record})
    return found


def _on_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    # torch accepts memory_format= in Module.to; its stubs list no overload with it.
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def _fine_tune(
    parent: ClassifierCard,
    template: ClassifierCard,
    splits: dict[str, LabelledCrops],
    config: TrainConfig,
    workdir: Path,
    device: torch.device,
    log: Callable[[str], None],
) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]], list[dict[str, float]], dict]:
    """Fine-tune each member of the parent's ensemble (one cosine cycle each, its own
    checkpoint folder), so the child is an ensemble too and its members' agreement still says
    how sure it is. Returns the last network, the members' weights, the history and the
    parent's identity for the provenance."""
    snapshots, history = [], []
    restarted: set[str] = set()
    for k, state in enumerate(load_state_dicts(parent)):
        model = build_model(template)
        own = model.state_dict()
        kept = {name: v for name, v in state.items() if name in own and own[name].shape == v.shape}
        model.load_state_dict(kept, strict=False)
        restarted |= set(own) - set(kept)
        teacher = None
        # A restarted layer (another class list) has no answers of the parent's to keep.
        if config.distill > 0 and not restarted:
            teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        elif config.distill > 0 and k == 0:
            log("distillation off: the template's layers differ from the parent's")
        log(f"member {k + 1} of {len(parent.weights)}")
        member, member_history = fit(
            _on_device(model, device),
            template,
            splits["train"],
            splits["val"],
            config,
            workdir / f"member{k + 1}",
            log,
            teacher=teacher,
        )
        snapshots += member
        history += member_history
    identity = {
        "name": parent.name,
        "path": str(parent.path),
        "weights_sha256": [w.sha256 for w in parent.weights],
        "layers_restarted": sorted(restarted),
    }
    return model, snapshots, history, identity


def fit(
    model: torch.nn.Module,
    card: ClassifierCard,
    train: LabelledCrops,
    val: LabelledCrops | None,
    config: TrainConfig,
    workdir: Path,
    log: Callable[[str], None] = print,
    teacher: torch.nn.Module | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, float]]]:
    """The training loop on crops in memory, from the model's current weights.

    Parameters
    ----------
    model : torch.nn.Module
        On the training device, freshly built or holding weights to fine-tune.
    card : ClassifierCard
        Gives the normalisation.
    train, val : LabelledCrops
        Training crops; validation crops scored after each epoch (optional).
    config : TrainConfig
    workdir : Path
        Holds ``checkpoint.pt``, written after every epoch and resumed from when present.
    log : callable
        Receives one line per epoch.
    teacher : torch.nn.Module, optional
        The frozen parent of a fine-tuning run, whose answers the loss keeps with weight
        ``config.distill`` (see :class:`TrainConfig`).

    Returns
    -------
    snapshots : list of dict
        State dicts at the end of each cosine cycle (one unless ``config.snapshots > 1``).
    history : list of dict
        Per epoch: epoch, step, loss, val_accuracy, lr, seconds.
    """
    device = next(model.parameters()).device
    augmentation = AUGMENTATIONS[augmentation_name(config)]
    steps_per_epoch = max(1, len(train.labels) // config.batch_size)
    total = config.epochs * steps_per_epoch
    if config.max_steps:
        total = min(total, config.max_steps)
    cycles = max(1, config.snapshots)
    cycle_len = math.ceil(total / cycles)
    warmup = min(int(config.warmup_epochs * steps_per_epoch), cycle_len // 2)

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    generator = torch.Generator().manual_seed(config.seed)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "snapshots": [], "history": []}
    checkpoint = workdir / "checkpoint.pt"
    if checkpoint.is_file():
        state = _resume(checkpoint, model, optimizer, generator)
        log(f"resumed from {checkpoint} at epoch {state['epoch']}, step {state['step']}")

    while state["step"] < total:
        started = time.perf_counter()
        model.train()
        n_drawn = steps_per_epoch * config.batch_size
        if sampling_name(config) == "balanced":
            order = _balanced_order(train.labels, n_drawn, generator)
        else:
            order = torch.randint(len(train.labels), (n_drawn,), generator=generator)
        losses = []
        for batch in order.view(steps_per_epoch, config.batch_size):
            if state["step"] >= total:
                break
            factor = lr_at(state["step"], total, cycles, warmup)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * factor
            x = to_unit_tensor(train.crops[batch.numpy()], device)
            x = _normalise(augment(x, generator, augmentation), card).contiguous(
                memory_format=torch.channels_last
            )
            y = torch.as_tensor(train.labels[batch.numpy()], device=device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
                if teacher is not None:
                    loss = loss + config.distill * _distillation(logits, teacher(x))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
            state["step"] += 1
            if state["step"] % cycle_len == 0 or state["step"] == total:
                state["snapshots"].append(
                    {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                )
        state["epoch"] += 1
        record = {
            "epoch": state["epoch"],
            "step": state["step"],
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "val_accuracy": _accuracy(model, val, card, device),
            "lr": config.lr * factor,
            "seconds": round(time.perf_counter() - started, 1),
        }
        state["history"].append(record)
        log(
            " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
            )
        )
        _save_checkpoint(checkpoint, model, optimizer, generator, state)
    return state["snapshots"][-cycles:], state["history"]


def _save_checkpoint(path: Path, model, optimizer, generator: torch.Generator, state: dict) -> None:
    payload = {
        **state,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _resume(path: Path, model, optimizer, generator: torch.Generator) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload.pop("model"))
    optimizer.load_state_dict(payload.pop("optimizer"))
    generator.set_state(payload.pop("generator"))
    return payload


def _export(
    card: ClassifierCard,
    snapshots: list[dict[str, torch.Tensor]],
    model: torch.nn.Module,
    splits: dict[str, LabelledCrops],
    out: Path,
    config: TrainConfig,
    history: list[dict[str, float]],
    device: torch.device,
    data: dict[str, Any],
) -> TrainResult:
    """Write the weights and the card, scored on the test split (per source too)."""
    from wsi_pipeline.learn.evaluate import classification_report

    names = (
        [f"{out.stem}.safetensors"]
        if len(snapshots) == 1
        else [f"{out.stem}.snapshot{k + 1}.safetensors" for k in range(len(snapshots))]
    )
    weights: list[WeightsFile] = []
    for name, state in zip(names, snapshots, strict=True):
        model.load_state_dict(state)
        weights.append(save_weights(model, out.parent / name))
    trained = dataclasses.replace(card, name=out.stem, path=out, weights=tuple(weights))
    trained, calibration = calibrate_card(trained, splits["val"], str(device))
    familiarity: dict[str, Any] = {}
    if len(splits["val"].labels):
        trained, familiarity = add_familiarity(
            trained,
            (splits["train"].crops, splits["train"].labels),
            (splits["val"].crops, splits["val"].labels),
            {Path(f).name: splits["train"].sources == k for k, f in enumerate(data["sources"])},
            AUGMENTATIONS[augmentation_name(config)],
            config.seed,
            str(device),
        )

    test = splits["test"]
    scores: dict[str, Any] = {}
    by_source: dict[str, Any] = {}
    if len(test.labels):
        classifier = Classifier(trained, device=str(device))
        predicted = classifier.predict_proba(test.crops).argmax(1)
        scores = classification_report(test.labels, predicted, trained.codes)
        by_source = source_confusion(test, predicted, trained.codes, data["sources"])
    provenance = {
        **card.provenance,
        "training": {
            **{k: v for k, v in dataclasses.asdict(config).items() if v is not None},
            "folders": data["sources"],
            **({"parent": data["parent"]} if data["parent"] else {}),
            **(
                {}
                if data["parent"]
                else {"starting_weights": data["pretrained"] or "random (from scratch)"}
            ),
            **({"corrections": data["corrections"]} if data["corrections"] else {}),
            "sampling": sampling_name(config),
            "augmentation": {
                "name": augmentation_name(config),
                **AUGMENTATIONS[augmentation_name(config)].as_dict(),
            },
            "n_train_steps": history[-1]["step"] if history else 0,
            "final_val_accuracy": history[-1]["val_accuracy"] if history else float("nan"),
            "train_seconds": round(sum(h["seconds"] for h in history), 1),
            # How this card was made, as the process was started (wsi train or Python).
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "calibration": calibration,
        **({"novelty": familiarity} if familiarity else {}),
        "test_scores": _card_scores(scores),
        **({"test_confusion_by_source": by_source} if len(data["sources"]) > 1 else {}),
    }
    trained = dataclasses.replace(trained, provenance=provenance)
    write_card(trained)
    return TrainResult(trained, history, scores)


def _card_scores(report: dict[str, Any]) -> dict[str, Any]:
    """The compact part of a report that goes into a card (no confusion matrix)."""
    compact = {k: v for k, v in report.items() if k != "confusion"}
    if "tolerant" in compact:
        compact["tolerant"] = {k: v for k, v in compact["tolerant"].items() if k != "confusion"}
    return compact


def source_confusion(
    split: LabelledCrops,
    predicted: NDArray[np.integer],
    codes: Sequence[str],
    sources: Sequence[str],
) -> dict[str, dict[str, dict[str, int]]]:
    """Where each source's cells of the classes several sources share went.

    Returns
    -------
    dict
        ``{source: {true code: {predicted code: count}}}``, for every class that at least two
        sources hold, predicted codes with a count above zero only.
    """
    holders = {
        label: set(split.sources[split.labels == label].tolist())
        for label in set(split.labels.tolist())
    }
    shared = sorted(label for label, held in holders.items() if len(held) > 1)
    table: dict[str, dict[str, dict[str, int]]] = {}
    for k, source in enumerate(sources):
        rows = {}
        for label in shared:
            chosen = predicted[(split.sources == k) & (split.labels == label)]
            if len(chosen):
                counts = np.bincount(chosen, minlength=len(codes))
                rows[codes[label]] = {codes[j]: int(c) for j, c in enumerate(counts) if c}
        table[Path(source).name] = rows
    return table


@torch.inference_mode()
def member_logits(classifier: Classifier, crops: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Every ensemble member's raw logits of crops, shape (members, N, classes)."""
    out = np.empty((len(classifier.models), len(crops), len(classifier.codes)), np.float32)
    for start in range(0, len(crops), 128):
        x = classifier.preprocess(crops[start : start + 128])
        for k, model in enumerate(classifier.models):
            out[k, start : start + len(x)] = model(x).float().cpu().numpy()
    return out


def calibrate_card(
    card: ClassifierCard, val: LabelledCrops, device: str = "cpu"
) -> tuple[ClassifierCard, dict[str, Any]]:
    """The card with the temperature that calibrates its ensemble on ``val``, and a record of
    it: temperature, validation cells, ECE before and after (see
    :mod:`wsi_pipeline.learn.calibrate`). With no validation cells the card is returned as is."""
    if not len(val.labels):
        return card, {"temperature": card.model.temperature, "n_val": 0}
    logits = member_logits(Classifier(card, device=device), val.crops)
    temperature = fit_temperature(logits, val.labels)
    record = {
        "method": "temperature scaling of every member's logits on the validation split",
        "temperature": round(temperature, 4),
        "n_val": int(len(val.labels)),
        "val_ece_before": round(
            expected_calibration_error(ensemble_probabilities(logits), val.labels), 4
        ),
        "val_ece_after": round(
            expected_calibration_error(ensemble_probabilities(logits, temperature), val.labels), 4
        ),
    }
    model = dataclasses.replace(card.model, temperature=round(temperature, 4))
    return dataclasses.replace(card, model=model), record
