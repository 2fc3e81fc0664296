"""Scores of classifiers on labelled folders (``wsi evaluate``).

Per class precision, recall, F1 and support; macro and support-weighted means; balanced
accuracy; the confusion matrix (CSV and PNG); and the "tolerant" variant of all of these, in
which confusing neighbouring maturation stages (PMO-MYB-MMZ-NGB-NGS, PEB-EBO) counts as correct,
as Matek et al. (2021) report. Several cards on one folder give a side-by-side table.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.core.files import atomic_path
from wsi_pipeline.core.taxonomy import TOLERATED_CONFUSIONS
from wsi_pipeline.learn.calibrate import expected_calibration_error
from wsi_pipeline.learn.datasets import load_crops, scan_labelled_folder, split_of
from wsi_pipeline.model.adapt import slide_colours
from wsi_pipeline.model.cards import ClassifierCard, load_card
from wsi_pipeline.results.counts import certain

__all__ = [
    "classification_report",
    "comparison_table",
    "confusion_matrix",
    "evaluate_folder",
    "tolerate",
    "write_confusion_csv",
    "write_confusion_png",
]


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> NDArray[np.int64]:
    """Counts ``C[i, j]`` of cells of true class ``i`` predicted as ``j``."""
    matrix = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def tolerate(y_true: ArrayLike, y_pred: ArrayLike, codes: Sequence[str]) -> NDArray[np.int64]:
    """Predictions with tolerated confusions (neighbouring maturation stages) set to the truth."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred).copy()
    accepted = np.array(
        [
            frozenset((codes[t], codes[p])) in TOLERATED_CONFUSIONS
            for t, p in zip(y_true, y_pred, strict=True)
        ],
        dtype=bool,
    )
    y_pred[accepted] = y_true[accepted]
    return y_pred


def _scores(matrix: NDArray[np.int64], codes: Sequence[str]) -> dict[str, Any]:
    """Per-class and averaged scores of a confusion matrix (0 where a ratio is undefined)."""
    tp = np.diag(matrix).astype(float)
    support = matrix.sum(1).astype(float)
    predicted = matrix.sum(0).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(tp / predicted)
        recall = np.nan_to_num(tp / support)
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    present = support > 0  # classes absent from the truth do not enter the means
    weights = support / support.sum() if support.sum() else support
    return {
        "per_class": {
            code: {
                "precision": round(float(precision[i]), 4),
                "recall": round(float(recall[i]), 4),
                "f1": round(float(f1[i]), 4),
                "support": int(support[i]),
            }
            for i, code in enumerate(codes)
        },
        "accuracy": round(float(tp.sum() / max(support.sum(), 1)), 4),
        "balanced_accuracy": round(float(recall[present].mean()) if present.any() else 0.0, 4),
        "macro": {
            name: round(float(values[present].mean()) if present.any() else 0.0, 4)
            for name, values in (("precision", precision), ("recall", recall), ("f1", f1))
        },
        "weighted": {
            name: round(float((values * weights).sum()), 4)
            for name, values in (("precision", precision), ("recall", recall), ("f1", f1))
        },
    }


def classification_report(
    y_true: ArrayLike, y_pred: ArrayLike, codes: Sequence[str]
) -> dict[str, Any]:
    """Scores of integer predictions against integer labels, plain and tolerant.

    Parameters
    ----------
    y_true, y_pred : array-like of int
        Indices into ``codes``.
    codes : sequence of str
        Class codes in index order.

    Returns
    -------
    dict
        JSON-able: ``classes``, ``n``, ``per_class``, ``accuracy``, ``balanced_accuracy``,
        ``macro``, ``weighted``, ``confusion`` (rows: truth), and ``tolerant`` with the same
        scores after :func:`tolerate` (and its own ``confusion``).
    """
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    matrix = confusion_matrix(y_true, y_pred, len(codes))
    tolerant = confusion_matrix(y_true, tolerate(y_true, y_pred, codes), len(codes))
    return {
        "classes": list(codes),
        "n": int(len(y_true)),
        **_scores(matrix, codes),
        "confusion": matrix.tolist(),
        "tolerant": {**_scores(tolerant, codes), "confusion": tolerant.tolist()},
    }


def write_confusion_csv(report: dict[str, Any], path: Path) -> Path:
    """The confusion matrix as CSV: a header of predicted codes, one row per true code."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["true\\predicted", *report["classes"]])
    for code, row in zip(report["classes"], report["confusion"], strict=True):
        writer.writerow([code, *row])
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def write_confusion_png(report: dict[str, Any], path: Path, title: str = "") -> Path:
    """The confusion matrix as a PNG: row-normalised colour, counts written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(report["confusion"], dtype=float)
    codes = report["classes"]
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    side = 1.5 + 0.45 * len(codes)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(codes)), codes, rotation=90)
    ax.set_yticks(range(len(codes)), codes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"n = {report['n']}, macro F1 = {report['macro']['f1']:.3f}")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            colour = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, str(int(count)), ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def comparison_table(reports: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of per-class F1 and the summary scores, one column per card."""
    names = list(reports)
    codes = sorted({code for r in reports.values() for code in r["per_class"]})

    def cell(report: dict[str, Any], code: str) -> str:
        scores = report["per_class"].get(code)
        return f"{scores['f1']:.3f}" if scores else "n/a"

    rows = [
        f"| {code} F1 | " + " | ".join(cell(reports[n], code) for n in names) + " |"
        for code in codes
    ]
    for label, get in (
        ("macro F1", lambda r: r["macro"]["f1"]),
        ("weighted F1", lambda r: r["weighted"]["f1"]),
        ("balanced accuracy", lambda r: r["balanced_accuracy"]),
        ("tolerant macro F1", lambda r: r["tolerant"]["macro"]["f1"]),
        ("tolerant balanced accuracy", lambda r: r["tolerant"]["balanced_accuracy"]),
    ):
        rows.append(f"| {label} | " + " | ".join(f"{get(reports[n]):.3f}" for n in names) + " |")
    for label, key in (
        ("expected calibration error", "ece"),
        ("uncertain share", "uncertain_share"),
    ):
        values = [reports[n].get(key) for n in names]
        rows.append(
            f"| {label} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in values) + " |"
        )
    header = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)
    return "\n".join([header, *rows])


def evaluate_folder(
    folder: str | os.PathLike[str],
    classifiers: Sequence[str | os.PathLike[str]] = ("default",),
    mpp: float | None = None,
    subset: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    tta: int = 0,
    adapt: bool = True,
    backend: str = "auto",
) -> dict[str, Any]:
    """Score one or more classifier cards on a labelled folder (``wsi evaluate``).

    The folder is one slide: with ``adapt`` (and a card that records its training colours),
    the classifier adapts to the colour moments of all the scored images, as ``wsi run`` adapts
    to a slide's cells, so the scores are those a run would give.

    Parameters
    ----------
    folder : path
        Labelled folder in the MLL layout (see :mod:`wsi_pipeline.learn.datasets`).
    classifiers : sequence of card names or paths
    mpp : float, optional
        Microns per pixel of the images; None when they already are crops of each card's field
        of view (pipeline exports).
    subset : {"train", "val", "test"}, optional
        Score only that part of each card's own split (the fractions recorded in its card at
        training), e.g. "test" for its held-out report. A card never trained on ``folder`` is
        scored on the split of the first compared card that was (a lab card's parent on the
        lab card's held-out corrections). Default: every image.
    out_dir : path, optional
        Where ``<card>.confusion.csv``, ``<card>.confusion.png`` and ``<card>.predictions.csv``
        (one row per image: true and predicted class, confidence, snapshot agreement, whether
        it counts as uncertain) are written.
    device, batch_size, tta, backend
        As for :class:`wsi_pipeline.model.classify.Classifier`.
    adapt : bool
        Adapt each card to the folder (see :mod:`wsi_pipeline.model.adapt`).

    Returns
    -------
    dict
        JSON-able: ``folder``, ``subset``, ``reports`` (card name to
        :func:`classification_report` plus ``ece``, the expected calibration error;
        ``uncertain_share``, the share of scored images the differential would count as
        uncertain (confidence, agreement or novelty), ``novel_share``, those whose novelty is
        above 1, ``adapted``, whether the card adapted to the folder's colours, ``backend``,
        what ran it, and
        ``certain_accuracy``, the accuracy of the others; ``n_unrecognised``,
        images whose class the card has no output for, left out of its scores, with
        ``unrecognised_uncertain_share`` and ``unrecognised_called``, where they went; a name
        already used by an earlier card gets ``-2``, ``-3``, ...), ``comparison`` (Markdown
        table) and ``files``.
    """
    from wsi_pipeline.model.classify import get_classifier

    if subset not in (None, "train", "val", "test"):
        raise InputError(folder, f"unknown subset {subset!r}; expected train, val or test")
    items = scan_labelled_folder(folder)
    cards = [load_card(name) for name in classifiers]
    # A card trained on this folder splits it; a card that never saw it (the parent of a lab
    # card, say) is scored on that same part, so that the two are compared on the same cells.
    splitter = next((c for c in cards if _trained_on(c, Path(folder))), None)
    reports: dict[str, dict[str, Any]] = {}
    files: list[str] = []
    for card in cards:
        label = _unique_label(card.name, reports)
        classifier = get_classifier(card.path, device, batch_size, backend)
        split_by = card if splitter is None or _trained_on(card, Path(folder)) else splitter
        chosen = [i for i in items if subset is None or _subset_of(i.group, split_by) == subset]
        known = np.array([i.label in card.codes for i in chosen], dtype=bool)
        if not known.any():
            raise InputError(folder, f"no images of the classes of card {card.name!r}")
        crops = load_crops([i.path for i in chosen], card.model.input_size, card.model.fov_um, mpp)
        colours = slide_colours(crops) if adapt else None
        prediction = classifier.predict(crops, tta, colours)
        predicted = prediction.probabilities.argmax(1)
        sure = certain(
            prediction.probabilities.max(1), prediction.agreement, novelty=prediction.novelty
        )
        truth = np.array(
            [card.codes.index(i.label) if k else -1 for i, k in zip(chosen, known, strict=True)]
        )
        report = classification_report(truth[known], predicted[known], card.codes)
        report["ece"] = round(
            expected_calibration_error(prediction.probabilities[known], truth[known]), 4
        )
        report["uncertain_share"] = round(float(1 - sure[known].mean()), 4)
        report["adapted"] = classifier.adapts_to(colours)
        report["backend"] = classifier.backend
        novel = prediction.novelty > 1
        report["novel_share"] = round(float(novel[known].mean()), 4)
        right = predicted[known] == truth[known]
        report["certain_accuracy"] = (
            round(float(right[sure[known]].mean()), 4) if sure[known].any() else None
        )
        report["n_unrecognised"] = int((~known).sum())
        if (~known).any():
            report["unrecognised_uncertain_share"] = round(float(1 - sure[~known].mean()), 4)
            called = [
                card.codes[p] if s else "uncertain"
                for p, s in zip(predicted[~known], sure[~known], strict=True)
            ]
            report["unrecognised_called"] = {c: called.count(c) for c in sorted(set(called))}
        reports[label] = report
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            files.append(str(write_confusion_csv(report, out / f"{label}.confusion.csv")))
            files.append(str(write_confusion_png(report, out / f"{label}.confusion.png")))
            rows = [
                (str(i.path), i.label, card.codes[p], f"{c:.4f}", f"{a:.3f}", int(not s))
                for i, p, c, a, s in zip(
                    chosen,
                    predicted,
                    prediction.probabilities.max(1),
                    prediction.agreement,
                    sure,
                    strict=True,
                )
            ]
            files.append(str(_write_predictions(rows, out / f"{label}.predictions.csv")))
    return {
        "folder": str(folder),
        "subset": subset or "all",
        "reports": reports,
        "comparison": comparison_table(reports),
        "files": files,
    }


def _write_predictions(rows: Sequence[tuple], path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(("image", "true", "predicted", "confidence", "agreement", "uncertain"))
        writer.writerows(rows)
    return path


def _unique_label(name: str, taken: Mapping[str, Any]) -> str:
    """``name``, or ``name-2``, ``name-3``, ... when an earlier card has that name (a retrained
    card scored beside the shipped one)."""
    label, k = name, 1
    while label in taken:
        k += 1
        label = f"{name}-{k}"
    return label


def _trained_on(card: ClassifierCard, folder: Path) -> bool:
    """Whether ``folder`` is one of the folders ``card`` was trained on."""
    trained = card.provenance.get("training", {}).get("folders", [])
    return any(Path(f).resolve() == folder.resolve() for f in trained)


def _subset_of(group: str, card: ClassifierCard) -> str:
    training = card.provenance.get("training", {})
    return split_of(group, training.get("val_fraction", 0.1), training.get("test_fraction", 0.1))
