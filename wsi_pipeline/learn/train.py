"""Train a classifier card on a folder of labelled cell images (``wsi train``).

The images are cut once to the card's field of view and input size and kept in memory (and in a
``.npy`` cache), so an epoch costs only the network. Training samples classes evenly, augments
each batch on the fly (HematoNet-style: any rotation, flips, small translations and zoom, stain
and colour jitter), optimises with AdamW under a cosine schedule with warm-up (mixed precision on
a GPU), and writes a resumable checkpoint after every epoch. In snapshot-ensemble mode (DeepHeme)
the cosine schedule restarts ``snapshots`` times and the weights at the end of each cycle are
kept; the card lists every snapshot and inference averages them.

The split is fixed per patient (or per image when patients are unknown) by
:func:`wsi_pipeline.learn.datasets.split_of`; the held-out test split's scores go into the card.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.core.files import atomic_path
from wsi_pipeline.learn.datasets import load_crops_cached, scan_labelled_folder, split_of
from wsi_pipeline.model.cards import (
    ClassifierCard,
    WeightsFile,
    build_model,
    load_card,
    save_weights,
    write_card,
)
from wsi_pipeline.model.classify import resolve_device, to_unit_tensor

__all__ = [
    "LabelledCrops",
    "TrainConfig",
    "TrainResult",
    "augment",
    "fit",
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
    source_mpp : float or None
        Microns per pixel of the images; None when they already are crops of the card's field
        of view (as the pipeline exports them).
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
    source_mpp: float | None = None
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
    """Crops at a card's input size and their class indices (into the card's codes)."""

    crops: NDArray[np.uint8]
    labels: NDArray[np.int64]


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


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random geometric and colour augmentation of a batch of RGB images in [0, 1].

    Each image gets a uniform random rotation, a mirror flip with probability 1/2, a
    translation of up to 6 % and a zoom in [0.9, 1.1] (one affine resampling, reflected
    borders), then brightness, contrast and saturation jitter and per-channel gains (stain
    intensity and hue differences between labs and scanners).
    """
    n = x.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, generator=generator, device=x.device) * (high - low) + low

    angle = uniform(0.0, 2 * math.pi)
    scale = 1.0 / uniform(0.9, 1.1)
    flip = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    shift = uniform(-0.12, 0.12, 2)  # grid units span [-1, 1]: 0.12 is 6 % of the side
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], 1),
            torch.stack([sin * flip, cos, shift[:, 1]], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    grey = x.mean(1, keepdim=True)
    saturation = uniform(0.8, 1.2, 1, 1, 1)
    x = grey + (x - grey) * saturation
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * uniform(0.85, 1.15, 1, 1, 1)
    x = x * uniform(0.9, 1.1, 1, 1, 1) * uniform(0.95, 1.05, 3, 1, 1)
    return x.clamp_(0.0, 1.0)


def _normalise(x: torch.Tensor, card: ClassifierCard) -> torch.Tensor:
    mean = x.new_tensor(card.model.mean).view(1, 3, 1, 1)
    std = x.new_tensor(card.model.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _load_splits(data: Path, card: ClassifierCard, config: TrainConfig) -> dict[str, LabelledCrops]:
    items = scan_labelled_folder(data, card.codes)
    index = {code: i for i, code in enumerate(card.codes)}
    crops = load_crops_cached(
        [item.path for item in items],
        card.model.input_size,
        card.model.fov_um,
        config.source_mpp,
        config.cache_dir,
    )
    subsets = np.array(
        [split_of(i.group, config.val_fraction, config.test_fraction) for i in items]
    )
    labels = np.array([index[item.label] for item in items], dtype=np.int64)
    return {
        s: LabelledCrops(crops[subsets == s], labels[subsets == s])
        for s in ("train", "val", "test")
    }


def _channel_stats(crops: NDArray[np.uint8]) -> tuple[list[float], list[float]]:
    axes = (0, 1, 2)
    mean = crops.mean(axis=axes, dtype=np.float64) / 255.0
    std = crops.std(axis=axes, dtype=np.float64) / 255.0
    return mean.round(4).tolist(), std.round(4).tolist()


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
    data: str | os.PathLike[str],
    card: str | os.PathLike[str] | ClassifierCard,
    out: str | os.PathLike[str],
    config: TrainConfig = TrainConfig(),
    workdir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train the network of a card on a labelled folder and write the trained card.

    Parameters
    ----------
    data : path
        Labelled folder (MLL layout, see :mod:`wsi_pipeline.learn.datasets`).
    card : name, path or ClassifierCard
        Template card: architecture, input size, field of view, classes (in output order),
        provenance text. Its weights, if any, are ignored (training starts from scratch).
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
    template = card if isinstance(card, ClassifierCard) else load_card(card)
    out = Path(out)
    workdir = Path(workdir or Path(tempfile.gettempdir()) / f"wsi-train-{out.stem}")
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    splits = _load_splits(Path(data), template, config)
    train = splits["train"]
    if len(np.unique(train.labels)) < len(template.codes):
        missing = sorted(set(template.codes) - {template.codes[i] for i in np.unique(train.labels)})
        raise InputError(data, f"training split has no images of {', '.join(missing)}")
    mean, std = _channel_stats(train.crops)
    template = dataclasses.replace(
        template, model=dataclasses.replace(template.model, mean=tuple(mean), std=tuple(std))
    )
    log(
        f"{len(train.labels)} train, {len(splits['val'].labels)} val, "
        f"{len(splits['test'].labels)} test images on {device}"
    )

    model = build_model(template).to(device)
    # torch accepts memory_format= in Module.to; its stubs list no overload with it.
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    snapshots, history = fit(model, template, train, splits["val"], config, workdir, log)
    return _export(template, snapshots, model, splits["test"], out, config, history, device)


def fit(
    model: torch.nn.Module,
    card: ClassifierCard,
    train: LabelledCrops,
    val: LabelledCrops | None,
    config: TrainConfig,
    workdir: Path,
    log: Callable[[str], None] = print,
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

    Returns
    -------
    snapshots : list of dict
        State dicts at the end of each cosine cycle (one unless ``config.snapshots > 1``).
    history : list of dict
        Per epoch: epoch, step, loss, val_accuracy, lr, seconds.
    """
    device = next(model.parameters()).device
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
        order = _balanced_order(train.labels, steps_per_epoch * config.batch_size, generator)
        losses = []
        for batch in order.view(steps_per_epoch, config.batch_size):
            if state["step"] >= total:
                break
            factor = lr_at(state["step"], total, cycles, warmup)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * factor
            x = to_unit_tensor(train.crops[batch.numpy()], device)
            x = _normalise(augment(x, generator), card).contiguous(
                memory_format=torch.channels_last
            )
            y = torch.as_tensor(train.labels[batch.numpy()], device=device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)
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
    test: LabelledCrops,
    out: Path,
    config: TrainConfig,
    history: list[dict[str, float]],
    device: torch.device,
) -> TrainResult:
    """Write the weights and the card, scored on the test split."""
    from wsi_pipeline.learn.evaluate import classification_report
    from wsi_pipeline.model.classify import Classifier

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

    scores: dict[str, Any] = {}
    if len(test.labels):
        classifier = Classifier(trained, device=str(device))
        predicted = classifier.predict_proba(test.crops).argmax(1)
        scores = classification_report(test.labels, predicted, trained.codes)
    provenance = {
        **card.provenance,
        "training": {
            **{k: v for k, v in dataclasses.asdict(config).items() if v is not None},
            "n_train_steps": history[-1]["step"] if history else 0,
            "final_val_accuracy": history[-1]["val_accuracy"] if history else float("nan"),
            "train_seconds": round(sum(h["seconds"] for h in history), 1),
        },
        "test_scores": _card_scores(scores),
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
