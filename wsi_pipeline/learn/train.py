"""Train a classifier card on folders of labelled cell images (``wsi train``).

The images of every folder are cut once to the card's field of view and input size, at that
folder's own pixel size, and kept in memory (and in a ``.npy`` cache), so an epoch costs only
the network. The split is fixed per patient (or per image when patients are unknown) by
:func:`wsi_pipeline.learn.datasets.split_of`; the held-out test split's scores go into the card.
Training starts from scratch (with ImageNet weights where ``pretrained`` says so) or from a
trained card's weights (``init``: fine-tuning). The rest of a run lives beside this module:

- :mod:`~wsi_pipeline.learn.config`: the options (:class:`TrainConfig`) and the choices they
  imply for scratch and for fine-tuning;
- :mod:`~wsi_pipeline.learn.loop`: the training loop (class-balanced or natural batches, each
  redrawn as another lab would have made it, AdamW under cosine cycles with warm-up; more than
  one cycle gives a snapshot ensemble, DeepHeme, whose members inference averages);
- :mod:`~wsi_pipeline.learn.checkpoint`: the resumable checkpoint written after every epoch;
- :mod:`~wsi_pipeline.learn.finetune`: fine-tuning every member of a parent card's ensemble;
- :mod:`~wsi_pipeline.learn.export`: the weights, the calibration, the familiarity, the test
  scores and the card. With several folders (sources), the test split's confusion of the
  classes two sources share is written into the card per source: a model that learnt a
  source's look instead of its cells calls one source's neutrophils blasts.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.learn.config import TrainConfig
from wsi_pipeline.learn.datasets import (
    SUBSETS,
    LabelledCrops,
    folder_mpps,
    load_crops_cached,
    scan_labelled_folder,
    split_of,
)
from wsi_pipeline.learn.export import TrainResult, export
from wsi_pipeline.learn.finetune import corrections_manifests, fine_tune
from wsi_pipeline.learn.loop import fit, on_device
from wsi_pipeline.model.cards import ClassifierCard, build_model, resolve_card
from wsi_pipeline.model.classify import resolve_device
from wsi_pipeline.model.pretrained import PRETRAINED, init_from_pretrained
from wsi_pipeline.model.pretrained import provenance as pretrained_provenance

# TrainConfig and TrainResult are what callers pass to and get from train_classifier, so they
# are importable from here, where it is.
__all__ = ["TrainConfig", "TrainResult", "train_classifier"]

#: Every option at its default (a frozen dataclass, so one instance serves every call).
DEFAULT_CONFIG = TrainConfig()


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
        for s in SUBSETS
    }


def _channel_stats(crops: NDArray[np.uint8]) -> tuple[list[float], list[float]]:
    axes = (0, 1, 2)
    mean = crops.mean(axis=axes, dtype=np.float64) / 255.0
    std = crops.std(axis=axes, dtype=np.float64) / 255.0
    return mean.round(4).tolist(), std.round(4).tolist()


def train_classifier(
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    card: str | os.PathLike[str] | ClassifierCard,
    out: str | os.PathLike[str],
    config: TrainConfig = DEFAULT_CONFIG,
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
        model = on_device(model, device)
        snapshots, history = fit(model, template, train, splits["val"], config, workdir, log)
        parent = None
    else:
        model, snapshots, history, parent = fine_tune(
            parent_card, template, splits, config, workdir, device, log
        )
    sources = {
        "sources": [str(f.resolve()) for f in folders],
        "parent": parent,
        "pretrained": starting_weights,
        "corrections": corrections_manifests(folders),
    }
    return export(template, snapshots, model, splits, out, config, history, device, sources)
