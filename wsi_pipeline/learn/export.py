"""Writing a trained card: its weights (one file per snapshot), the temperature that calibrates
the ensemble on the validation split, its familiarity (colour references and novelty model), its
scores on the test split (per source too) and the provenance of how it was made."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from wsi_pipeline.learn.augment import AUGMENTATIONS
from wsi_pipeline.learn.calibrate import (
    ensemble_probabilities,
    expected_calibration_error,
    fit_temperature,
)
from wsi_pipeline.learn.config import TrainConfig, augmentation_name, sampling_name
from wsi_pipeline.learn.datasets import LabelledCrops
from wsi_pipeline.learn.evaluate import classification_report
from wsi_pipeline.learn.familiarity import add_familiarity
from wsi_pipeline.model.cards import ClassifierCard, WeightsFile, save_weights, write_card
from wsi_pipeline.model.classify import Classifier

__all__ = ["TrainResult", "calibrate_card", "export", "member_logits", "source_confusion"]


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


def export(
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
