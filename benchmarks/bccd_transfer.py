"""Transfer check of the ``default`` classifier on BCCD (other microscope, other lab).

Crops of 32 µm are cut around every BCCD white-cell box whose type is known (``labels.csv``;
images whose boxes cannot be matched to one type are skipped) at the pixel size estimated from
the red-cell boxes (7.5 µm / median box side). The five BCCD types are scored:

* before fine-tuning: ``default``'s probabilities summed per type (NGS + NGB for neutrophils;
  its immature and erythroid classes are left out of the argmax);
* after fine-tuning: 5-fold cross-validation by image, each fold fine-tuning every member of
  ``default``'s ensemble (all layers, small learning rate) on the other four folds with the
  types mapped to its classes, then scoring the held-out fold; the held-out predictions of all
  folds are pooled.

Prints one JSON document. Usage: ``python benchmarks/bccd_transfer.py [--data DIR]``
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_pipeline.learn.evaluate import classification_report
from wsi_pipeline.learn.train import LabelledCrops, TrainConfig, fit
from wsi_pipeline.model.classify import Classifier

REPO = Path(__file__).resolve().parents[1]
TYPES = ("BASOPHIL", "EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")
#: default's classes that make up each BCCD type; the first one is the fine-tuning target.
TYPE_CODES = {
    "BASOPHIL": ("BAS",),
    "EOSINOPHIL": ("EOS",),
    "LYMPHOCYTE": ("LYT",),
    "MONOCYTE": ("MON",),
    "NEUTROPHIL": ("NGS", "NGB"),
}
RBC_DIAMETER_UM = 7.5


@dataclass
class Cells:
    crops: np.ndarray
    types: np.ndarray  # index into TYPES
    images: list[str]


def _boxes(annotation: Path) -> dict[str, list[tuple[int, int, int, int]]]:
    boxes: dict[str, list[tuple[int, int, int, int]]] = {}
    for obj in ET.parse(annotation).getroot().iter("object"):
        box = obj.find("bndbox")
        coords = tuple(int(float(box.find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.setdefault(obj.find("name").text, []).append(coords)
    return boxes


def _estimate_mpp(all_boxes: list[dict]) -> float:
    sides = [
        ((x1 - x0) + (y1 - y0)) / 2
        for boxes in all_boxes
        for x0, y0, x1, y1 in boxes.get("RBC", [])
    ]
    return RBC_DIAMETER_UM / float(np.median(sides))


def _crop(image: np.ndarray, centre: tuple[float, float], side: int, size: int) -> np.ndarray:
    """A ``side``-px square around ``centre`` resized to ``size``; background colour past the
    border (mirroring would duplicate the cell)."""
    h, w = image.shape[:2]
    padded = np.empty((h + 2 * side, w + 2 * side, 3), np.uint8)
    padded[:] = np.median(image.reshape(-1, 3), 0).astype(np.uint8)
    padded[side : side + h, side : side + w] = image
    x0, y0 = round(centre[0] - side / 2) + side, round(centre[1] - side / 2) + side
    square = Image.fromarray(padded[y0 : y0 + side, x0 : x0 + side])
    return np.asarray(square.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0))


def load_cells(data: Path, fov_um: float, size: int) -> tuple[Cells, float]:
    """Crops of the typed WBC boxes of BCCD and the estimated microns per pixel."""
    with open(data / "labels.csv", newline="") as stream:
        labels = {row["image"]: row["wbc_types"] for row in csv.DictReader(stream)}
    annotations = {name: _boxes(data / "Annotations" / f"{name}.xml") for name in labels}
    mpp = _estimate_mpp(list(annotations.values()))
    side = round(fov_um / mpp)
    crops, types, images = [], [], []
    for name, listed in labels.items():
        kinds = {t.strip() for t in listed.split(",") if t.strip()}
        wbcs = annotations[name].get("WBC", [])
        if len(kinds) != 1 or not wbcs:  # unknown, or two types we cannot tell apart
            continue
        kind = TYPES.index(kinds.pop())
        image = np.asarray(Image.open(data / "JPEGImages" / f"{name}.jpg").convert("RGB"))
        for x0, y0, x1, y1 in wbcs:
            crops.append(_crop(image, ((x0 + x1) / 2, (y0 + y1) / 2), side, size))
            types.append(kind)
            images.append(name)
    return Cells(np.stack(crops), np.array(types), images), mpp


def type_predictions(probabilities: np.ndarray, codes: tuple[str, ...]) -> np.ndarray:
    """Argmax over the BCCD types of the summed probabilities of their classes."""
    summed = np.stack(
        [probabilities[:, [codes.index(c) for c in TYPE_CODES[t]]].sum(1) for t in TYPES], 1
    )
    return summed.argmax(1)


def folds_by_image(images: list[str], types: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold of each cell: images dealt round-robin within each type, in a seeded order."""
    rng = np.random.default_rng(seed)
    first_type = {}
    for image, kind in zip(images, types, strict=True):
        first_type.setdefault(image, kind)
    fold_of_image = {}
    for kind in range(len(TYPES)):
        names = sorted(n for n, t in first_type.items() if t == kind)
        for i, name in enumerate(rng.permutation(names)):
            fold_of_image[name] = i % k
    return np.array([fold_of_image[name] for name in images])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "bccd")
    parser.add_argument("--card", default="default")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    classifier = Classifier(args.card, device="cpu")
    card, codes = classifier.card, classifier.codes
    cells, mpp = load_cells(args.data, card.model.fov_um, card.model.input_size)
    before = type_predictions(classifier.predict_proba(cells.crops), codes)

    targets = np.array([codes.index(TYPE_CODES[TYPES[t]][0]) for t in cells.types])
    folds = folds_by_image(cells.images, cells.types, args.folds, args.seed)
    config = TrainConfig(
        epochs=args.epochs, batch_size=32, lr=args.lr, warmup_epochs=0.5, seed=args.seed
    )
    after = np.empty_like(before)
    for fold in range(args.folds):
        held_out = folds == fold
        members = [copy.deepcopy(model) for model in classifier.models]
        train = LabelledCrops(cells.crops[~held_out], targets[~held_out])
        with tempfile.TemporaryDirectory() as workdir:
            for k, model in enumerate(members):  # each its own checkpoint folder
                fit(model, card, train, None, config, Path(workdir, str(k)), log=lambda _: None)
        tuned = Classifier(card, device="cpu", models=[model.eval() for model in members])
        after[held_out] = type_predictions(tuned.predict_proba(cells.crops[held_out]), codes)

    def compact(report: dict) -> dict:
        keep = ("n", "per_class", "accuracy", "balanced_accuracy", "macro", "weighted")
        return {k: report[k] for k in keep}

    print(
        json.dumps(
            {
                "card": card.name,
                "estimated_mpp": round(mpp, 4),
                "crop_side_px": round(card.model.fov_um / mpp),
                "n_cells": int(len(cells.types)),
                "n_images": len(set(cells.images)),
                "cells_per_type": {t: int((cells.types == i).sum()) for i, t in enumerate(TYPES)},
                "before_fine_tuning": compact(classification_report(cells.types, before, TYPES)),
                "after_fine_tuning_cv": compact(classification_report(cells.types, after, TYPES)),
                "fine_tuning": {
                    "folds": args.folds,
                    "split": "by image, stratified by type",
                    "epochs": args.epochs,
                    "lr": args.lr,
                    "batch_size": 32,
                },
                "seconds": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
