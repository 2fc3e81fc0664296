"""What a classifier card does with cells of classes it was never trained on.

Two sets of cells the card has not learnt, both classified as a run classifies (no test-time
augmentation, adapted to the slide's colours with ``--adapt``) and judged by the differential's
rule (:func:`wsi_pipeline.results.counts.certain`): a cell is *uncertain* when its calibrated
confidence is under ``DEFAULT_CONFIDENCE_THRESHOLD``, when fewer than ``DEFAULT_MIN_AGREEMENT``
of the ensemble's members share its top class, or when its novelty is above 1 (NaN, a card
without a novelty model, passes). A cell that is certain is counted as its top class: for a
class the card lacks, always wrongly (``confident_wrong``).

1. **Real myeloma plasma cells** (MLL code PLM, a class no card here is trained on): SegPC-2021
   (``../shared/data/segpc-train``; CC BY-NC-SA, so only measured, never trained on). Every
   outlined plasma cell is cut at the card's field of view centred on the centroid of its
   whole-cell outline, padded past the field's border with the field's median colour
   (``unseen_lab._crop``), at :data:`SEGPC_MPP`. All the fields are one lab's stain, so all the
   crops are one slide for adaptation (one set of colour moments). Reported: where the cells go
   (certain ones by class, and every cell's argmax), each part of the rule on its own, and the
   *pooled differential*, the share of each class among the certain cells: what a count of a
   myeloma marrow would show instead of plasma cells (``_countable``: among the certain cells
   the differential counts, i.e. without artefacts, smudged, unidentifiable and other cells).
2. **Classes left out of training** (``--left-out CODE``, for a card trained without them):
   their cells in the test split of the card's own training folders (the folders, pixel sizes
   and split fractions its provenance records). Each folder is one slide: adapted to the colour
   moments of all its test crops, whatever their class, as a run sees a slide. Reported per
   left-out class and per folder: where its cells go. For the card's known classes on the same
   cells: uncertain share, novelty share and macro F1, and with ``--reference-card`` (e.g. the
   card trained on every class) the same under that card, so that the price of the novelty
   rule on known cells can be read (``known_uncertain_share_increase``).

Prints one JSON document (and writes it to ``--out``). Usage: ``python
benchmarks/novel_classes.py --card CARD [--reference-card CARD2] [--left-out CODE ...]
[--adapt | --no-adapt] [--segpc DIR] [--limit N] [--out FILE.json] [--smoke]``
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from _measure import SHARED_DATA, emit, parse_arguments
from numpy.typing import NDArray
from PIL import Image
from unseen_lab import _crop

from wsi_pipeline.core.taxonomy import cell_class
from wsi_pipeline.core.taxonomy import codes as taxonomy_codes
from wsi_pipeline.learn.datasets import (
    LabelledImage,
    folder_mpps,
    load_crops,
    scan_labelled_folder,
    split_of,
)
from wsi_pipeline.learn.evaluate import classification_report
from wsi_pipeline.model.adapt import slide_colours
from wsi_pipeline.model.classify import Classifier, Prediction
from wsi_pipeline.results.counts import (
    DEFAULT_CONFIDENCE_THRESHOLD,
    DEFAULT_MIN_AGREEMENT,
    certain,
)

REPO = Path(__file__).resolve().parents[1]
#: SegPC's pixel size: its README gives "about 0.19 um/px (red cells about 39 px across)",
#: i.e. 7.5 um / 39 px = 0.192 um/px.
SEGPC_MPP = 0.19
PLASMA_CELL = "PLM"
UNCERTAIN = "uncertain"


# --- shared ---------------------------------------------------------------------------------


def _share(mask: NDArray[np.bool_]) -> float | None:
    """Share of True in ``mask``, rounded; None when empty."""
    return round(float(np.mean(mask)), 4) if len(mask) else None


def _take(prediction: Prediction, keep: NDArray[np.bool_]) -> Prediction:
    """The cells of ``prediction`` where ``keep`` is True."""
    return Prediction(
        prediction.probabilities[keep], prediction.agreement[keep], prediction.novelty[keep]
    )


def _join(predictions: list[Prediction]) -> Prediction:
    """Several predictions as one, in order."""
    return Prediction(
        *(
            np.concatenate([getattr(p, name) for p in predictions])
            for name in ("probabilities", "agreement", "novelty")
        )
    )


def _is_certain(prediction: Prediction) -> NDArray[np.bool_]:
    """The differential's rule: which cells are counted as their top class."""
    return certain(
        prediction.probabilities.max(1), prediction.agreement, novelty=prediction.novelty
    )


def _novel_share(prediction: Prediction) -> float | None:
    """Share of cells with novelty above 1; None for a card without a novelty model."""
    if np.isnan(prediction.novelty).all():
        return None
    return _share(prediction.novelty > 1.0)


def _tally(names: list[str]) -> dict[str, int]:
    """How many times each name occurs, most frequent first."""
    return dict(Counter(names).most_common())


def outcome(prediction: Prediction, codes: tuple[str, ...], true_code: str) -> dict[str, Any]:
    """Where cells of class ``true_code`` go under the differential's rule.

    Parameters
    ----------
    prediction : Prediction
        The card's prediction of the cells.
    codes : tuple of str
        The card's class codes, in the order of the probability columns.
    true_code : str
        The cells' class, which the card may lack.

    Returns
    -------
    dict
        ``n``; ``uncertain_share``; ``confident_wrong_share`` (certain and called another
        class) and ``confident_right_share`` (certain and called ``true_code``, 0 when the card
        lacks it); ``novel_share`` (novelty above 1; None without a novelty model); and
        ``called``, the certain cells by class plus the uncertain ones.
    """
    top = prediction.probabilities.argmax(1)
    sure = _is_certain(prediction)
    right = sure & (top == codes.index(true_code)) if true_code in codes else np.zeros_like(sure)
    return {
        "n": int(len(top)),
        "uncertain_share": _share(~sure),
        "confident_wrong_share": _share(sure & ~right),
        "confident_right_share": _share(right),
        "novel_share": _novel_share(prediction),
        "called": _tally([codes[t] if s else UNCERTAIN for t, s in zip(top, sure, strict=True)]),
    }


def rule_parts(prediction: Prediction) -> dict[str, float | None]:
    """The share of cells each part of the uncertain rule catches on its own."""
    return {
        "low_confidence_share": _share(
            prediction.probabilities.max(1) < DEFAULT_CONFIDENCE_THRESHOLD
        ),
        "low_agreement_share": _share(prediction.agreement < DEFAULT_MIN_AGREEMENT),
        "novel_share": _novel_share(prediction),
    }


# --- part 1: SegPC plasma cells -------------------------------------------------------------


def load_plasma_cells(
    data: Path, fov_um: float, size: int, limit: int | None = None
) -> tuple[NDArray[np.uint8], NDArray[np.int64], int]:
    """Crops of SegPC's outlined plasma cells at a card's field of view.

    Parameters
    ----------
    data : Path
        The ``segpc-train`` folder (``images/<stem>.jpg``, ``cells/<stem>.geojson``).
    fov_um : float
        The card's field of view.
    size : int
        The card's input size.
    limit : int, optional
        Read only the first ``limit`` fields (by name).

    Returns
    -------
    crops : ndarray of uint8, shape (N, size, size, 3)
    fields : ndarray of int, shape (N,)
        Index of each cell's field.
    n_fields : int
        Fields read.
    """
    side = round(fov_um / SEGPC_MPP)
    files = sorted((data / "cells").glob("*.geojson"))[:limit]
    crops, fields = [], []
    for k, file in enumerate(files):
        image = np.asarray(Image.open(data / "images" / f"{file.stem}.jpg").convert("RGB"))
        for feature in json.loads(file.read_text())["features"]:
            centroid = shapely.Polygon(feature["geometry"]["coordinates"][0]).centroid
            crops.append(_crop(image, (centroid.x, centroid.y), side, size))
            fields.append(k)
    empty = np.empty((0, size, size, 3), np.uint8)
    return (np.stack(crops) if crops else empty), np.array(fields, np.int64), len(files)


def plasma_cells(
    classifier: Classifier, data: Path, adapt: bool, limit: int | None
) -> dict[str, Any]:
    """Part 1: what the card makes of real myeloma plasma cells (see the module's notes)."""
    if not (data / "cells").is_dir() or not (data / "images").is_dir():
        return {"skipped": f"no SegPC data (cells/ and images/) in {data}"}
    model = classifier.card.model
    crops, fields, n_fields = load_plasma_cells(data, model.fov_um, model.input_size, limit)
    if not len(crops):
        return {"skipped": f"no plasma cell in the {n_fields} fields read from {data}"}
    colours = slide_colours(crops) if adapt else None
    prediction = classifier.predict(crops, tta=0, slide_colours=colours)
    codes = classifier.codes
    sure = _is_certain(prediction)
    top = prediction.probabilities.argmax(1)
    counted = [codes[t] for t in top[sure]]
    return {
        "data": str(data),
        "mpp": SEGPC_MPP,
        "crop_px": round(model.fov_um / SEGPC_MPP),
        "n_fields": n_fields,
        "n_fields_with_cells": int(len(np.unique(fields))),
        "adapted": classifier.adapts_to(colours),
        "card_has_class": PLASMA_CELL in codes,
        **outcome(prediction, codes, PLASMA_CELL),
        "argmax_called": _tally([codes[t] for t in top]),
        "rule_parts": rule_parts(prediction),
        "pooled_differential": _shares(counted),
        "pooled_differential_countable": _shares([c for c in counted if cell_class(c).counted]),
    }


def _shares(names: list[str]) -> dict[str, float]:
    """Each name's share of ``names``, most frequent first."""
    return {name: round(n / len(names), 4) for name, n in _tally(names).items()}


# --- part 2: classes left out of training ---------------------------------------------------


def training_folders(classifier: Classifier) -> list[tuple[str, Path | None, float | None]]:
    """The card's training folders as recorded, where each is (None when not found) and its
    pixel size (None: the images are crops of the card's field of view).

    Relative paths (older cards) are taken from the project's root, where they were trained.
    """
    training = classifier.card.provenance.get("training", {})
    recorded = [str(f) for f in training.get("folders", [])]
    found = []
    for name, size in zip(recorded, folder_mpps(recorded, training.get("image_mpp")), strict=True):
        path = Path(name) if Path(name).is_absolute() else REPO / name
        found.append((name, path if path.is_dir() else None, size))
    return found


def split_fractions(classifier: Classifier) -> tuple[float, float]:
    """The card's (validation, test) fractions."""
    training = classifier.card.provenance.get("training", {})
    return float(training.get("val_fraction", 0.1)), float(training.get("test_fraction", 0.1))


def test_cells(folder: Path, fractions: tuple[float, float]) -> list[LabelledImage]:
    """Every test-split image of a labelled folder, of every class code found."""
    return [
        item for item in scan_labelled_folder(folder) if split_of(item.group, *fractions) == "test"
    ]


def predict_folder(
    classifier: Classifier, paths: list[Path], mpp: float | None, adapt: bool
) -> tuple[Prediction, bool]:
    """A card's prediction of one folder's images as one slide, and whether it was adapted."""
    model = classifier.card.model
    crops = load_crops(paths, model.input_size, model.fov_um, mpp)
    colours = slide_colours(crops) if adapt else None
    adapted = classifier.adapts_to(colours)
    return classifier.predict(crops, tta=0, slide_colours=colours), adapted


def known_scores(prediction: Prediction, truth: NDArray[np.int64], codes: tuple[str, ...]) -> dict:
    """Uncertain and novel shares, macro F1 and accuracy of cells of known classes."""
    report = classification_report(truth, prediction.probabilities.argmax(1), codes)
    return {
        "n": int(len(truth)),
        "uncertain_share": _share(~_is_certain(prediction)),
        "novel_share": _novel_share(prediction),
        "macro_f1": report["macro"]["f1"],
        "accuracy": report["accuracy"],
    }


def left_out_classes(
    classifier: Classifier,
    left_out: list[str],
    adapt: bool,
    reference: Classifier | None = None,
) -> dict[str, Any]:
    """Part 2: where the left-out classes' test cells go, and what the known classes pay.

    Parameters
    ----------
    classifier : Classifier
        The card trained without ``left_out``.
    left_out : list of str
        Class codes left out of its training.
    adapt : bool
        Adapt each folder, as one slide, to its colours.
    reference : Classifier, optional
        A card trained with every class, scored on the same cells.
    """
    codes = classifier.codes
    fractions = split_fractions(classifier)
    known = [c for c in codes if c not in left_out]
    cards = [classifier] if reference is None else [classifier, reference]
    labels: list[str] = []
    sources: list[int] = []
    predictions: list[list[Prediction]] = [[] for _ in cards]
    folders, missing, adapted = [], [], []
    for name, path, mpp in training_folders(classifier):
        if path is None:
            missing.append(name)
            continue
        items = test_cells(path, fractions)
        for k, card in enumerate(cards):
            prediction, was_adapted = predict_folder(card, [i.path for i in items], mpp, adapt)
            predictions[k].append(prediction)
            if k == 0:
                adapted.append(was_adapted)
        labels += [i.label for i in items]
        sources += [len(folders)] * len(items)
        folders.append(name)
    if not folders:
        return {"skipped": f"none of the card's training folders was found: {missing}"}
    label = np.array(labels)
    source = np.array(sources)
    joined = [_join(p) for p in predictions]
    report: dict[str, Any] = {
        "split": {"val_fraction": fractions[0], "test_fraction": fractions[1], "subset": "test"},
        "folders": {
            name: {"n_test": int((source == k).sum()), "adapted": adapted[k]}
            for k, name in enumerate(folders)
        },
        "folders_missing": missing,
        "other_classes": _tally([c for c in labels if c not in codes and c not in left_out]),
    }

    classes: dict[str, Any] = {}
    for code in left_out:
        cells = label == code
        entry: dict[str, Any] = {"card_has_class": code in codes}
        if not cells.any():
            classes[code] = {**entry, "n": 0}
            continue
        entry.update(outcome(_take(joined[0], cells), codes, code))
        entry["by_folder"] = {
            name: outcome(_take(joined[0], cells & (source == k)), codes, code)
            for k, name in enumerate(folders)
            if (cells & (source == k)).any()
        }
        if reference is not None:
            entry["reference"] = outcome(_take(joined[1], cells), reference.codes, code)
        classes[code] = entry
    report["left_out"] = classes

    cells = np.isin(label, known)
    truth = np.array([codes.index(c) for c in label[cells]], np.int64)
    report["known"] = {"classes": known, **known_scores(_take(joined[0], cells), truth, codes)}
    if reference is not None:
        known_report = report["known"]
        known_report.update(_reference_known(reference, classifier, joined[1], label, cells))
        if known_report["uncertain_share"] is not None:
            known_report["known_uncertain_share_increase"] = round(
                known_report["uncertain_share"] - known_report["known_uncertain_share_reference"], 4
            )
    return report


def _reference_known(
    reference: Classifier,
    classifier: Classifier,
    prediction: Prediction,
    label: NDArray[np.str_],
    cells: NDArray[np.bool_],
) -> dict[str, Any]:
    """The known classes' scores under the reference card, and the change from it."""
    theirs = _take(prediction, cells)
    uncertain = _share(~_is_certain(theirs))
    out: dict[str, Any] = {
        "reference_card": reference.card.name,
        "known_uncertain_share_reference": uncertain,
        "novel_share_reference": _novel_share(theirs),
    }
    if set(label[cells]) <= set(reference.codes):
        truth = np.array([reference.codes.index(c) for c in label[cells]], np.int64)
        scores = classification_report(truth, theirs.probabilities.argmax(1), reference.codes)
        out["macro_f1_reference"] = scores["macro"]["f1"]
    # split_of's test split is the names below test_fraction: a smaller one in the reference
    # card may have trained it on some of these cells (if it was trained on these folders).
    if split_fractions(reference)[1] < split_fractions(classifier)[1]:
        out["warning"] = (
            f"card {reference.card.name!r} kept a smaller test fraction "
            f"({split_fractions(reference)[1]}): some of these cells may be in its training split"
        )
    return out


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", default="default", help="card name or path")
    parser.add_argument("--reference-card", default=None, help="e.g. the card with every class")
    parser.add_argument(
        "--left-out",
        action="append",
        default=[],
        choices=taxonomy_codes(),
        metavar="CODE",
        help="a class the card was trained without (repeatable)",
    )
    parser.add_argument(
        "--adapt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="adapt each slide to its colours (default: on)",
    )
    parser.add_argument("--segpc", type=Path, default=SHARED_DATA / "segpc-train")
    parser.add_argument("--limit", type=int, default=None, help="read only N SegPC fields")
    args = parse_arguments(parser, argv, {"card": "synthetic-demo", "limit": 2})

    started = time.perf_counter()
    classifier = Classifier(args.card, device="cpu")
    reference = Classifier(args.reference_card, device="cpu") if args.reference_card else None
    result: dict[str, Any] = {
        "card": classifier.card.name,
        "card_path": str(classifier.card.path),
        "codes": list(classifier.codes),
        "novelty_model": classifier.novelty is not None,
        "adapt": args.adapt,
        "rule": {
            "min_confidence": DEFAULT_CONFIDENCE_THRESHOLD,
            "min_agreement": DEFAULT_MIN_AGREEMENT,
            "max_novelty": 1.0,
        },
        "plasma_cells": plasma_cells(classifier, args.segpc, args.adapt, args.limit),
    }
    if args.left_out or reference is not None:
        result["left_out_classes"] = left_out_classes(
            classifier, args.left_out, args.adapt, reference
        )
    result["seconds"] = round(time.perf_counter() - started, 1)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
