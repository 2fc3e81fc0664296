"""What a training run is asked to do (``wsi train``'s options) and the choices that follow
from it: the augmentation and how batches are drawn, which differ between training from scratch
and fine-tuning a parent card."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainConfig", "augmentation_name", "sampling_name"]


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
        forgetting, Li and Hoiem 2017): the KL divergence, at temperature
        :data:`~wsi_pipeline.learn.loop.DISTILL_T`, of the network's probabilities from the
        frozen parent's is added to the loss, so classes a lab's few corrections never show
        keep what the parent knew of them. 0 turns it off; it is off too when the template's
        class list differs from the parent's.
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
