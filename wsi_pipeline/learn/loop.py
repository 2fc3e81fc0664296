"""The training loop on crops in memory: AdamW under a cosine schedule with warm-up, restarted
``snapshots`` times for a snapshot ensemble (DeepHeme), each batch redrawn as another lab would
have made it (:mod:`wsi_pipeline.learn.augment`), mixed precision on a GPU, optionally keeping a
frozen parent's answers in the loss (distillation), and a resumable checkpoint after every epoch
(:mod:`wsi_pipeline.learn.checkpoint`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from wsi_pipeline.learn.augment import AUGMENTATIONS, augment
from wsi_pipeline.learn.checkpoint import CHECKPOINT, resume, save_checkpoint
from wsi_pipeline.learn.config import TrainConfig, augmentation_name, sampling_name
from wsi_pipeline.learn.datasets import LabelledCrops
from wsi_pipeline.model.cards import ClassifierCard
from wsi_pipeline.model.classify import to_unit_tensor

__all__ = ["DISTILL_T", "fit", "lr_at", "on_device"]


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


#: Temperature of the parent's and the network's probabilities in the distillation term.
DISTILL_T = 2.0


def _distillation(logits: torch.Tensor, parent_logits: torch.Tensor) -> torch.Tensor:
    """KL divergence of the network's softened probabilities from the parent's, scaled by T²
    so that its gradients weigh as the cross-entropy's do (Hinton et al. 2015)."""
    student = F.log_softmax(logits.float() / DISTILL_T, dim=1)
    target = F.log_softmax(parent_logits.float() / DISTILL_T, dim=1)
    kl = F.kl_div(student, target, log_target=True, reduction="batchmean")
    return kl * DISTILL_T**2


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


def on_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The network on ``device``, channels-last (the layout the loop's batches take)."""
    model = model.to(device)
    # torch accepts memory_format= in Module.to; its stubs list no overload with it.
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


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
    checkpoint = workdir / CHECKPOINT
    if checkpoint.is_file():
        state = resume(checkpoint, model, optimizer, generator)
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
        save_checkpoint(checkpoint, model, optimizer, generator, state)
    return state["snapshots"][-cycles:], state["history"]
