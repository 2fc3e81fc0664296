"""A classifier card on the cells of a lab none of its training data comes from (BCCD).

Every typed BCCD white-cell box (``labels.csv``) is cut at the card's field of view, at the
pixel size estimated from BCCD's red-cell boxes (see ``bccd_transfer.py``), and classified with
the card's own argmax over all its classes. Scored as issue 24 scores an unseen lab: five groups
(neutrophil = NGS or NGB, eosinophil, basophil, lymphocyte, monocyte); any other class the card
answers counts wrong. Also reported: the share of cells the card calls uncertain (calibrated
confidence under ``--min-confidence``, snapshots disagreeing, or novelty above 1) and the scores
of the others. Every cell is scored twice, as it comes (``unadapted``) and with the classifier
adapted to BCCD as one slide (``adapted``: its crops' colour moments matched to the card's
training crops'), when the card records its training colours.

Prints one JSON document. Usage: ``python benchmarks/unseen_lab.py [--card default]
[--limit N] [--out FILE.json] [--smoke]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _measure import SHARED_DATA, emit, parse_arguments
from bccd_transfer import TYPE_CODES, TYPES, load_fields
from PIL import Image

from wsi_pipeline.learn.evaluate import classification_report
from wsi_pipeline.model.adapt import slide_colours
from wsi_pipeline.model.classify import Classifier, Prediction
from wsi_pipeline.results.counts import DEFAULT_CONFIDENCE_THRESHOLD, certain

OTHER = len(TYPES)  # any class outside the five groups


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


def load_cells(
    data: Path, fov_um: float, size: int, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Crops of the typed white-cell boxes of BCCD (of its first ``limit`` typed images), their
    type indices and the estimated microns per pixel."""
    fields, mpp = load_fields(data)
    fields = fields[:limit]
    side = round(fov_um / mpp)
    crops, types = [], []
    for field in fields:
        image = np.asarray(Image.open(data / "JPEGImages" / f"{field.name}.jpg").convert("RGB"))
        for x0, y0, x1, y1 in field.boxes:
            crops.append(_crop(image, ((x0 + x1) / 2, (y0 + y1) / 2), side, size))
            types.append(field.type)
    return np.stack(crops), np.array(types), mpp


def group_of_codes(codes: tuple[str, ...]) -> np.ndarray:
    """For each of the card's classes, its BCCD type index, or :data:`OTHER`."""
    group = {code: i for i, t in enumerate(TYPES) for code in TYPE_CODES[t]}
    return np.array([group.get(code, OTHER) for code in codes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "bccd")
    parser.add_argument("--card", default="default")
    parser.add_argument("--min-confidence", type=float, default=DEFAULT_CONFIDENCE_THRESHOLD)
    parser.add_argument("--min-agreement", type=float, default=1.0)
    parser.add_argument("--limit", type=int, default=None, help="only the first N typed images")
    args = parse_arguments(parser, argv, {"card": "synthetic-demo", "limit": 8})

    started = time.perf_counter()
    classifier = Classifier(args.card, device="cpu")
    model = classifier.card.model
    crops, types, mpp = load_cells(args.data, model.fov_um, model.input_size, args.limit)
    # All of BCCD is one lab's stain: one slide, as wsi run would adapt to it.
    runs = {"unadapted": None, "adapted": slide_colours(crops)}
    results = {
        name: score_prediction(
            classifier.predict(crops, slide_colours=colours), classifier.codes, types, args
        )
        for name, colours in runs.items()
        if name == "unadapted" or classifier.adapts_to(colours)
    }
    result = {
        "card": classifier.card.name,
        "data": str(args.data),
        "estimated_mpp": round(mpp, 4),
        "cells_per_type": {t: int((types == i).sum()) for i, t in enumerate(TYPES)},
        **results,
        "min_confidence": args.min_confidence,
        "min_agreement": args.min_agreement,
        "seconds": round(time.perf_counter() - started, 1),
    }
    emit(result, args.out)
    return 0


def score_prediction(
    prediction: Prediction, codes: tuple[str, ...], types: np.ndarray, args: argparse.Namespace
) -> dict:
    """Five-group scores of all cells and of the certain ones, the uncertain share and where
    the cells went."""
    top = prediction.probabilities.argmax(1)
    predicted = group_of_codes(codes)[top]
    sure = certain(
        prediction.probabilities.max(1),
        prediction.agreement,
        args.min_confidence,
        args.min_agreement,
        prediction.novelty,
    )
    labels = (*TYPES, "OTHER")

    def scores(keep: np.ndarray) -> dict:
        report = classification_report(types[keep], predicted[keep], labels)
        per_type = {t: report["per_class"][t] for t in TYPES}
        macro_f1 = float(np.mean([per_type[t]["f1"] for t in TYPES if per_type[t]["support"]]))
        return {
            "n": int(keep.sum()),
            "accuracy": report["accuracy"],
            "macro_f1_five_groups": round(macro_f1, 4),
            "per_type": per_type,
        }

    return {
        "answered_classes": {codes[c]: int((top == c).sum()) for c in np.unique(top)},
        "all_cells": scores(np.ones(len(predicted), bool)),
        "uncertain_share": round(float(1 - sure.mean()), 4),
        "novel_share": round(float((prediction.novelty > 1).mean()), 4),
        "certain_cells": scores(sure),
    }


if __name__ == "__main__":
    raise SystemExit(main())
