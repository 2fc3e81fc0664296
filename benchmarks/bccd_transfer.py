"""A lab adapts the ``default`` card to its own smears through ``wsi corrections``: BCCD.

BCCD (another lab, microscope and stain; Wright/Giemsa blood smears, ``../shared/data/bccd``)
plays the lab. Its images whose white cells have one known type (``labels.csv``) are dealt, by
image and within each type, into ``--folds`` folds. For each fold, the other folds are the *pool*
an expert reviews and the fold is *held out*, never used for training. Each part is laid out as
one slide: a mosaic of its images on white glass, a tiled TIFF at the pixel size estimated from
the red-cell boxes (7.5 µm / median box side). Then, exactly as a lab would:

1. ``wsi run pool.tif`` with the ``default`` card writes the store and the QuPath GeoJSON.
2. The expert reviews the pool image by image, in a seeded random order, until ``N`` cells are
   reviewed (N = 25, 50, 100, 200): a cell in a white-cell box gets the box's type (neutrophil:
   ``NGS``), a second cell in one box and a cell outside every box become ``Artefact (ART)``, a
   box without a cell gets a point of its type (an added cell). The reviewed cells are exported
   as QuPath does, and ``wsi corrections --scope reviewed`` turns them into a labelled folder.
3. ``wsi train --init default`` fine-tunes the lab card on that folder: every member of the
   parent's ensemble, all layers, AdamW 3e-4, batch 16, about ``--presentations`` crops seen
   per member, ``wsi train``'s defaults for fine-tuning otherwise (one-lab augmentation, the
   parent's answers kept with weight ``--distill``), 20 % of the cells for calibration.
4. ``wsi run heldout.tif`` with the parent and with each lab card; each held-out white-cell box
   matched by a detected cell (centre inside the box) is scored by its type. The type of a cell
   is the argmax of the card's probabilities summed per BCCD type (``NGS`` + ``NGB`` for
   neutrophils; classes outside the five types are left out), as for a blood differential.

What a lab card forgets is measured too: its recall of the marrow classes BCCD never shows
(blasts, promyelocytes), on the MLL crops of the ``default`` card's own test split (never trained
on), against the parent's (``retained``).

The held-out predictions of all folds are pooled (every typed cell is held out once). Macro F1
is over the types with at least ``--min-support`` pooled cells: BCCD has one basophil in all,
which no split can score. ``corrected`` counts the reviewed cells whose class changed or that
were added; ``reviewed`` counts all (summed over folds in the pooled rows).

Usage: ``python benchmarks/bccd_transfer.py [--data DIR] [--work DIR] [--plot PNG]
[--out FILE.json] [--smoke]``; prints one JSON document.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import zarr
from _measure import SHARED_DATA, emit, parse_arguments
from PIL import Image

from wsi_pipeline.core.taxonomy import cell_class
from wsi_pipeline.learn.datasets import load_crops, split_of
from wsi_pipeline.learn.evaluate import classification_report
from wsi_pipeline.model.cards import resolve_card
from wsi_pipeline.model.classify import Classifier

BIN = Path(sys.executable).parent
TYPES = ("BASOPHIL", "EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")
#: The card's classes that make up each BCCD type; the first is the expert's label.
TYPE_CODES = {
    "BASOPHIL": ("BAS",),
    "EOSINOPHIL": ("EOS",),
    "LYMPHOCYTE": ("LYT",),
    "MONOCYTE": ("MON",),
    "NEUTROPHIL": ("NGS", "NGB"),
}
RBC_DIAMETER_UM = 7.5
GAP_PX = 48  # white glass between the images of a mosaic


@dataclass
class Field:
    """One BCCD image: its white-cell boxes (xmin, ymin, xmax, ymax) and their type."""

    name: str
    type: int
    boxes: np.ndarray


def _boxes(annotation: Path) -> dict[str, list[tuple[int, ...]]]:
    boxes: dict[str, list[tuple[int, ...]]] = {}
    for obj in ET.parse(annotation).getroot().iter("object"):
        box = obj.find("bndbox")
        coords = tuple(int(float(box.find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.setdefault(obj.find("name").text, []).append(coords)
    return boxes


def load_fields(data: Path) -> tuple[list[Field], float]:
    """The images whose white cells have one known type, and the estimated µm per pixel."""
    with open(data / "labels.csv", newline="") as stream:
        labels = {row["image"]: row["wbc_types"] for row in csv.DictReader(stream)}
    annotations = {name: _boxes(data / "Annotations" / f"{name}.xml") for name in labels}
    sides = [
        ((x1 - x0) + (y1 - y0)) / 2
        for boxes in annotations.values()
        for x0, y0, x1, y1 in boxes.get("RBC", [])
    ]
    fields = []
    for name, listed in labels.items():
        kinds = {t.strip() for t in listed.split(",") if t.strip()}
        wbcs = annotations[name].get("WBC", [])
        if len(kinds) == 1 and wbcs:  # unknown, or two types we cannot tell apart: skipped
            fields.append(Field(name, TYPES.index(kinds.pop()), np.array(wbcs, dtype=float)))
    return fields, RBC_DIAMETER_UM / float(np.median(sides))


def assign_folds(fields: list[Field], k: int, seed: int) -> np.ndarray:
    """Fold of each image: within each type, the images dealt round-robin in a seeded order."""
    rng = np.random.default_rng(seed)
    folds = np.empty(len(fields), dtype=int)
    for kind in range(len(TYPES)):
        members = sorted(
            (i for i, f in enumerate(fields) if f.type == kind), key=lambda i: fields[i].name
        )
        for rank, index in enumerate(rng.permutation(members)):
            folds[index] = rank % k
    return folds


def write_mosaic(fields: list[Field], data: Path, path: Path) -> dict[str, tuple[int, ...]]:
    """Lay the BCCD images out on white glass as one tiled TIFF; each image's place
    (x, y, w, h), by image name."""
    return write_image_mosaic([data / "JPEGImages" / f"{f.name}.jpg" for f in fields], path)


def write_image_mosaic(images: list[Path], path: Path) -> dict[str, tuple[int, ...]]:
    """Lay images of one size out on white glass as one tiled TIFF; each image's place
    (x, y, w, h), by file stem."""
    w, h = Image.open(images[0]).size
    columns = math.ceil(math.sqrt(len(images) * h / w))
    rows = math.ceil(len(images) / columns)
    shape = (rows * (h + GAP_PX) + GAP_PX, columns * (w + GAP_PX) + GAP_PX, 3)
    mosaic = np.full(shape, 255, np.uint8)
    corners = {}
    for k, file in enumerate(images):
        y, x = GAP_PX + (k // columns) * (h + GAP_PX), GAP_PX + (k % columns) * (w + GAP_PX)
        image = np.asarray(Image.open(file).convert("RGB"))[:h, :w]  # a larger one is cut
        mosaic[y : y + image.shape[0], x : x + image.shape[1]] = image
        corners[file.stem] = (x, y, image.shape[1], image.shape[0])
    tifffile.imwrite(path, mosaic, tile=(256, 256), photometric="rgb", compression="zlib")
    return corners


def wsi(*args: object) -> str:
    done = subprocess.run([BIN / "wsi", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"wsi {' '.join(map(str, args))}: {done.stderr.strip()}")
    return done.stdout


def count(slide: Path, out: Path, card: str | Path, mpp: float, *options: str) -> Path:
    """``wsi run`` on a mosaic, with any further ``options``; the store."""
    wsi("run", slide, "--out", out, "--classifier", card, "--mpp", mpp, "--region", "all",
        "--saliency", "none", "--device", "cpu", "--quiet", *options)  # fmt: skip
    return out / f"{slide.stem}.zarr"


def box_of_cells(xy: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """For each cell, the box whose centre is nearest among those holding the cell (-1: none);
    one cell per box (the nearest), the others -1."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    inside = (
        (xy[:, None, 0] >= boxes[None, :, 0]) & (xy[:, None, 0] <= boxes[None, :, 2])
        & (xy[:, None, 1] >= boxes[None, :, 1]) & (xy[:, None, 1] <= boxes[None, :, 3])
    )  # fmt: skip
    apart = np.hypot(*(xy[:, None] - centres[None]).transpose(2, 0, 1))
    distance = np.where(inside, apart, np.inf)
    which = np.full(len(xy), -1)
    for box in range(len(boxes)):
        if np.isfinite(distance[:, box]).any():
            cell = int(distance[:, box].argmin())
            if which[cell] < 0:
                which[cell] = box
    return which


def mosaic_boxes(fields: list[Field], corners: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every white-cell box in mosaic pixels, its type and its image's index."""
    boxes, types, owners = [], [], []
    for k, field in enumerate(fields):
        x, y = corners[field.name][:2]
        boxes.append(field.boxes + [x, y, x, y])
        types += [field.type] * len(field.boxes)
        owners += [k] * len(field.boxes)
    return np.concatenate(boxes), np.array(types), np.array(owners)


def review(
    geojson: Path, fields: list[Field], corners: dict, n_cells: int, seed: int
) -> tuple[list[dict], int]:
    """The features an expert reviewing ``n_cells`` detected cells, image by image in a seeded
    order, exports; and how many of them were corrected (class changed, or added)."""
    features = json.loads(geojson.read_text())["features"]
    cells = [f for f in features if f["properties"].get("objectType") == "cell"]
    xy = np.array([_centre(f) for f in cells])
    boxes, types, owners = mosaic_boxes(fields, corners)
    matched = box_of_cells(xy, boxes)
    image_of_cell = np.array([_image_at(p, corners, fields) for p in xy])
    exported, corrected, reviewed = [], 0, 0
    for k in np.random.default_rng(seed).permutation(len(fields)):
        if reviewed >= n_cells:
            break
        for c in np.flatnonzero(image_of_cell == k):
            label = (
                cell_class(TYPE_CODES[TYPES[types[matched[c]]]][0]).label
                if matched[c] >= 0
                else cell_class("ART").label
            )
            feature = cells[c]
            corrected += feature["properties"]["classification"]["name"] != label
            feature["properties"]["classification"] = {"name": label}
            exported.append(feature)
            reviewed += 1
        for box in np.flatnonzero((owners == k) & ~np.isin(np.arange(len(boxes)), matched)):
            centre = ((boxes[box, :2] + boxes[box, 2:]) / 2).tolist()
            label = cell_class(TYPE_CODES[TYPES[types[box]]][0]).label
            exported.append(_point(centre, label))
            corrected += 1
            reviewed += 1
    return exported, corrected


def _centre(feature: dict) -> tuple[float, float]:
    ring = np.array(feature["nucleusGeometry"]["coordinates"][0][:-1])
    return tuple(ring.mean(0))


def _image_at(point, corners: dict, fields: list[Field]) -> int:
    """Index of the image of the mosaic holding ``point`` (-1: the glass between)."""
    for k, field in enumerate(fields):
        x, y, w, h = corners[field.name]
        if x <= point[0] < x + w and y <= point[1] < y + h:
            return k
    return -1


def _point(centre: list[float], label: str) -> dict:
    """A point an expert adds in QuPath (an annotation with a new random id)."""
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": {"type": "Point", "coordinates": centre},
        "properties": {"objectType": "annotation", "classification": {"name": label}},
    }


def predictions(store: Path, fields: list[Field], corners: dict) -> tuple[np.ndarray, np.ndarray]:
    """True and predicted BCCD type of each held-out white cell a store's cells match."""
    root = zarr.open_group(store, mode="r")
    codes = list(root.attrs["class_codes"])
    xy = np.column_stack([root["cells/x"][:], root["cells/y"][:]])
    probabilities = root["cells/probabilities"][:]
    boxes, types, _ = mosaic_boxes(fields, corners)
    matched = box_of_cells(xy, boxes)
    hit = matched >= 0
    columns = [[codes.index(c) for c in TYPE_CODES[t] if c in codes] for t in TYPES]
    summed = np.stack([probabilities[:, k].sum(1) for k in columns], axis=1)
    return types[matched[hit]], summed[hit].argmax(1)


def scores(truth: np.ndarray, predicted: np.ndarray, min_support: int) -> dict:
    """Macro F1 over the types with ``min_support`` cells, and every type's F1 and support."""
    report = classification_report(truth, predicted, TYPES)
    scored = [t for t in TYPES if report["per_class"][t]["support"] >= min_support]
    return {
        "cells_scored": int(len(truth)),
        "macro_f1": round(float(np.mean([report["per_class"][t]["f1"] for t in scored])), 4),
        "types_scored": scored,
        "f1_per_type": {t: round(report["per_class"][t]["f1"], 4) for t in TYPES},
        "support": {t: report["per_class"][t]["support"] for t in TYPES},
    }


#: Marrow classes a blood lab's corrections never show; MLL crops are 0.106 µm/px.
RETAINED_CODES = ("BLA", "PMO")
MLL_MPP = 0.106


def retained_recall(card: str | Path, marrow: Path) -> dict[str, float]:
    """Recall of :data:`RETAINED_CODES` on the MLL crops of the ``default`` card's test split."""
    parent = resolve_card("default")
    fractions = parent.provenance["training"]
    classifier = Classifier(card, device="cpu")
    recall = {}
    for code in RETAINED_CODES:
        paths = [
            path
            for path in sorted((marrow / code).glob("*.jpg"))
            if split_of(path.name, fractions["val_fraction"], fractions["test_fraction"]) == "test"
        ]
        crops = load_crops(paths, parent.model.input_size, parent.model.fov_um, MLL_MPP)
        predicted = classifier.predict_proba(crops).argmax(1)
        recall[code] = round(float(np.mean(predicted == classifier.codes.index(code))), 4)
    return recall


def plot(curve: list[dict], parent: dict, path: Path) -> None:
    """Pooled held-out F1 against the number of corrected cells, per type and macro."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corrected = [float(np.mean(row["corrected_per_fold"])) for row in curve]
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=150)
    for kind in parent["types_scored"]:
        ax.plot(corrected, [row["f1_per_type"][kind] for row in curve], ".-", lw=0.8,
                alpha=0.5, label=kind.lower())  # fmt: skip
    ax.plot(corrected, [row["macro_f1"] for row in curve], "o-", color="black", lw=2,
            label="macro F1")  # fmt: skip
    for x, row in zip(corrected, curve, strict=True):
        label = f"{row['reviewed_per_fold']} reviewed"
        ax.annotate(label, (x, row["macro_f1"]), textcoords="offset points", xytext=(0, -12),
                    ha="center", fontsize=6)  # fmt: skip
    ax.axhline(parent["macro_f1"], color="grey", linestyle="--", label="default (parent), macro")
    ax.axhline(0.85, color="tab:red", linestyle=":", label="aim 0.85")
    ax.set_xscale("log")
    ax.set_xticks(corrected, [f"{x:.0f}" for x in corrected])
    ax.minorticks_off()
    ax.set_xlabel("corrected cells (class changed or added), mean per fold")
    ax.set_ylabel("F1 on held-out BCCD cells")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=6, loc="lower right", ncol=2)
    ax.set_title("A lab card from an expert's corrections (BCCD, pooled over folds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def run_fold(
    fold: int, fields: list[Field], folds: np.ndarray, mpp: float, work: Path, args
) -> tuple[dict, dict]:
    """On one fold: the held-out (true, predicted) types of the parent (key ``"parent"``) and
    of the lab card of each number of reviewed cells (key N), and the (reviewed, corrected)
    counts of each review; each lab card's scores are logged to stderr."""
    data = args.data
    pool = [f for f, g in zip(fields, folds, strict=True) if g != fold]
    held_out = [f for f, g in zip(fields, folds, strict=True) if g == fold]
    work.mkdir(parents=True, exist_ok=True)
    pool_corners = write_mosaic(pool, data, work / "pool.tif")
    held_corners = write_mosaic(held_out, data, work / "heldout.tif")
    pool_store = count(work / "pool.tif", work / "pool", "default", mpp)
    found = {"parent": predictions(count(work / "heldout.tif", work / "parent", "default", mpp),
                                   held_out, held_corners)}  # fmt: skip
    counts = {}
    for n in args.reviewed:
        name = f"lab-n{n}"
        exported, corrected = review(
            work / "pool" / "pool.geojson", pool, pool_corners, n, seed=100 + fold
        )
        edited = work / f"{name}.geojson"
        edited.write_text(json.dumps({"type": "FeatureCollection", "features": exported}))
        folder = work / f"{name}-corrections"
        wsi("corrections", pool_store, edited, "--out", folder, "--scope", "reviewed")
        epochs = max(1, math.ceil(args.presentations / (0.8 * len(exported))))
        wsi("train", folder, "--init", "default", "--out", work / f"{name}.toml",
            "--epochs", epochs, "--batch-size", 16, "--lr", 3e-4, "--val-fraction", 0.2,
            "--test-fraction", 0, "--distill", args.distill, "--device", "cpu",
            "--workdir", work / f"{name}-work")  # fmt: skip
        store = count(work / "heldout.tif", work / name, work / f"{name}.toml", mpp)
        found[n] = predictions(store, held_out, held_corners)
        counts[n] = (len(exported), corrected, retained_recall(work / f"{name}.toml", args.marrow))
        row = {"fold": fold, "n": n, "reviewed": len(exported), "corrected": corrected,
               "retained": counts[n][2]}  # fmt: skip
        print(json.dumps({**row, **scores(*found[n], 1)}), file=sys.stderr, flush=True)
    return found, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "bccd")
    parser.add_argument("--work", type=Path, default=None, help="keep the work here")
    parser.add_argument("--reviewed", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument(
        "--run-folds", type=int, default=None, help="run only the first K folds (default: all)"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N typed images")
    parser.add_argument("--marrow", type=Path, default=SHARED_DATA / "mll", help="MLL crops")
    parser.add_argument("--presentations", type=int, default=1200)
    parser.add_argument("--distill", type=float, default=1.0, help="wsi train --distill")
    parser.add_argument("--min-support", type=int, default=5)
    parser.add_argument("--plot", type=Path, default=None)
    smoke = {"limit": 12, "folds": 2, "run_folds": 1, "reviewed": [10], "presentations": 16}
    args = parse_arguments(parser, argv, smoke)

    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="bccd-transfer-"))
    fields, mpp = load_fields(args.data)
    fields = fields[: args.limit]
    folds = assign_folds(fields, args.folds, seed=0)
    per_fold = [
        run_fold(k, fields, folds, mpp, work / f"fold{k}", args)
        for k in range(args.folds)[: args.run_folds]
    ]

    def pooled(key) -> dict:
        truth = np.concatenate([found[key][0] for found, _ in per_fold])
        predicted = np.concatenate([found[key][1] for found, _ in per_fold])
        return scores(truth, predicted, args.min_support)

    curve = [
        {
            "reviewed_per_fold": n,
            "reviewed": sum(counts[n][0] for _, counts in per_fold),
            "corrected_per_fold": [counts[n][1] for _, counts in per_fold],
            "retained_recall": {
                code: round(float(np.mean([counts[n][2][code] for _, counts in per_fold])), 4)
                for code in RETAINED_CODES
            },
            **pooled(n),
        }
        for n in args.reviewed
    ]
    parent = {**pooled("parent"), "retained_recall": retained_recall("default", args.marrow)}
    if args.plot:
        plot(curve, parent, args.plot)
    result = {
        "estimated_mpp": round(mpp, 4),
        "images": len(fields),
        "white_cells": int(sum(len(f.boxes) for f in fields)),
        "folds": args.folds,
        "folds_run": len(per_fold),
        "parent": parent,
        "curve": curve,
        "fine_tuning": {
            "lr": 3e-4,
            "batch_size": 16,
            "presentations": args.presentations,
            "val_fraction": 0.2,
            "init": "default",
            "distill": args.distill,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
