"""White-cell detection on real smear photographs of two labs, against their white-cell boxes.

Data sets (``../shared/data``, see its README):

- ``bccd``: 292 Wright/Giemsa blood smears, 640 x 480 JPEG, Pascal-VOC boxes; 0.07 µm/px (the
  median red-cell box is 104 px for red cells about 7.5 µm across).
- ``raabin``: 350 Raabin-WBC smears (magenta Giemsa, 100x oil), 575 x 575 JPEG, YOLO boxes;
  0.061 µm/px (isolated red cells have a median diameter of 123 px).

Each image is opened as a one-level slide at its data set's pixel size and run through the
detector with default parameters, exactly as ``wsi-run`` would run a single image. A detection
counts when its centre falls inside a white-cell box, one detection per box (a maximum bipartite
matching), so a cell split in two costs precision. Every figure is also given for the two halves
of each set (by the SHA-1 of the file name) so a change tuned on one half can be checked on the
other. ``ms_cpu_per_cell`` is the detector's CPU time (this process) per detection;
``mean_cell_box_iou`` compares the bounding box of each matched cell's segmented outline with
its white-cell box, which outlines the whole cell (a proxy for whole-cell IoU without masks).

``marrow`` is real bone-marrow cells of the MLL set (21 µm crops, one annotated cell centred
in each): the share of crops whose centre lies in a detected cell's outline or within 4 µm of
a detected nucleus's centre, per class.

``not_cells`` is what a white-cell detector should not count: PBC's platelet and platelet-clump
fields (single images, each with its own stain estimate, as ``wsi-run`` runs an image) and the
MLL set's artefacts (``ART``: smudges, debris, red-cell clumps; 21 µm crops, one stain pooled
as for ``marrow``). Detection passes them on; the classifier's ``ART`` class and the uncertain
rule are the second line. For each set: detections per image, and the share of the detections
that the shipped ``default`` card would count in the differential (a counted class, certain by
the pipeline's default confidence and agreement rule).

``synthetic`` runs the same detector tile by tile over synthetic slides as ``wsi-run`` does (one
stain estimate and threshold per slide) and scores the whole-cell outlines against the true cells
(round, of known diameter): ``mean_cell_iou`` is the mean IoU of each matched cell's outline with
its true disk.

Usage: ``python benchmarks/detection.py [--data ../shared/data]
[--sets bccd raabin marrow not_cells synthetic] [--limit N]``; prints one JSON document.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from _measure import emit, parse_arguments
from PIL import Image
from scipy.optimize import linear_sum_assignment

from wsi_pipeline.image.detect import DetectedCells, DetectParams, detect_cells, slide_params
from wsi_pipeline.image.slide import open_slide
from wsi_pipeline.image.tiles import plan_tiles
from wsi_pipeline.synth.smear import match_ground_truth, write_synthetic_slide

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def voc_boxes(annotation: Path) -> np.ndarray:
    """WBC boxes ``(xmin, ymin, xmax, ymax)`` of one Pascal-VOC annotation file."""
    boxes = [
        [float(obj.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax")]
        for obj in ET.parse(annotation).getroot().iter("object")
        if obj.findtext("name") == "WBC"
    ]
    return np.array(boxes, dtype=float).reshape(-1, 4)


def yolo_boxes(labels: Path, width: int, height: int, wbc_class: int = 0) -> np.ndarray:
    """White-cell boxes ``(xmin, ymin, xmax, ymax)`` in pixels of one YOLO label file."""
    rows = np.loadtxt(labels, ndmin=2).reshape(-1, 5)
    rows = rows[rows[:, 0] == wbc_class, 1:] * [width, height, width, height]
    centre, size = rows[:, :2], rows[:, 2:]
    return np.column_stack([centre - size / 2, centre + size / 2])


@dataclass(frozen=True)
class DetectionSet:
    """A folder of smear images with white-cell boxes, at one pixel size."""

    name: str
    folder: str
    mpp: float
    images: Callable[[Path], list[Path]]
    boxes: Callable[[Path, Path, tuple[int, int]], np.ndarray]


SETS = {
    "bccd": DetectionSet(
        "bccd",
        "bccd",
        0.07,
        lambda root: sorted((root / "JPEGImages").glob("*.jpg")),
        lambda root, image, _: voc_boxes(root / "Annotations" / f"{image.stem}.xml"),
    ),
    "raabin": DetectionSet(
        "raabin",
        "raabin-train",
        0.061,
        lambda root: sorted((root / "images").glob("*.jpg")),
        lambda root, image, size: yolo_boxes(root / "labels" / f"{image.stem}.txt", *size),
    ),
}


def half_of(image: Path) -> str:
    """``"a"`` or ``"b"``: a fixed half of a data set, by the SHA-1 of the file name."""
    return "a" if hashlib.sha1(image.name.encode()).digest()[0] < 128 else "b"


def match_boxes(x: np.ndarray, y: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Detections and boxes matched one-to-one, each detection's centre inside its box: the
    indices of the matched detections and of their boxes."""
    if len(x) == 0 or len(boxes) == 0:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    inside = (
        (x[:, None] >= boxes[None, :, 0])
        & (x[:, None] <= boxes[None, :, 2])
        & (y[:, None] >= boxes[None, :, 1])
        & (y[:, None] <= boxes[None, :, 3])
    )
    rows, cols = linear_sum_assignment(inside, maximize=True)
    matched = inside[rows, cols]
    return rows[matched], cols[matched]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of paired boxes ``(x0, y0, x1, y1)``, shape (N, 4) each."""
    low, high = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    overlap = np.prod(np.clip(high - low, 0, None), axis=1)
    area = lambda box: np.prod(box[:, 2:] - box[:, :2], axis=1)  # noqa: E731
    return overlap / (area(a) + area(b) - overlap)


@dataclass
class ImageScore:
    """Boxes, detections and matches of one image, and the detector's CPU seconds on it."""

    image: str
    half: str
    boxes: int
    detections: int
    matched: int
    cpu_seconds: float
    cell_box_iou: list[float]


def score_images(
    data: Path, dataset: DetectionSet, params: DetectParams, limit: int | None = None
) -> Iterator[ImageScore]:
    """Detect white cells in each image of a data set and match them to its boxes."""
    root = data / dataset.folder
    images = dataset.images(root)[:limit]
    if not images:
        raise FileNotFoundError(f"{root}: no images (is this the {dataset.name} folder?)")
    for image in images:
        with open_slide(image, mpp=dataset.mpp) as slide:
            size = slide.info.dimensions
            rgb = slide.read_region((0, 0), size, dataset.mpp)
        start = time.process_time()
        cells = detect_cells(rgb, dataset.mpp, params=params)
        cpu = time.process_time() - start
        boxes = dataset.boxes(root, image, size)
        found, truth = match_boxes(cells.x, cells.y, boxes)
        iou = box_iou(cells.bbox[found].astype(float), boxes[truth])
        yield ImageScore(
            image.stem, half_of(image), len(boxes), len(cells), len(found), cpu, iou.tolist()
        )


def summarise(scores: list[ImageScore]) -> dict:
    """Recall, precision and CPU time per cell of some images' scores."""
    boxes = sum(s.boxes for s in scores)
    detections = sum(s.detections for s in scores)
    matched = sum(s.matched for s in scores)
    return {
        "images": len(scores),
        "wbc_boxes": boxes,
        "detections": detections,
        "matched": matched,
        "recall": round(matched / max(boxes, 1), 4),
        "precision": round(matched / max(detections, 1), 4),
        "ms_cpu_per_cell": round(1000 * sum(s.cpu_seconds for s in scores) / max(detections, 1), 3),
        "mean_cell_box_iou": round(float(np.mean([v for s in scores for v in s.cell_box_iou])), 4),
    }


def evaluate(
    data: Path, dataset: str, params: DetectParams | None = None, limit: int | None = None
) -> dict:
    """Figures of one data set: all images, each half, and the images with misses or extras."""
    scores = list(score_images(data, SETS[dataset], params or DetectParams(), limit))
    return {
        **summarise(scores),
        "mpp": SETS[dataset].mpp,
        "halves": {h: summarise([s for s in scores if s.half == h]) for h in ("a", "b")},
        "images_with_missed_boxes": [s.image for s in scores if s.matched < s.boxes],
        "images_with_extra_detections": [s.image for s in scores if s.matched < s.detections],
    }


def evaluate_synthetic(seeds: range = range(8), size: tuple[int, int] = (3000, 2000)) -> dict:
    """Recall, precision and whole-cell IoU on synthetic slides, detected tile by tile."""
    mpp, n_truth, n_found, ious = 1 / 3, 0, 0, []
    cpu = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for seed in seeds:
            path = Path(folder) / f"s{seed}.svs"
            truth = np.genfromtxt(
                write_synthetic_slide(path, size=size, seed=seed),
                delimiter=",",
                names=True,
                dtype=None,
                encoding="utf-8",
            )
            with open_slide(path) as slide:
                tiles = plan_tiles(slide.info.dimensions, slide.mpp, mpp, 1024, 48.0)
                images = [slide.read_region(t.origin, t.read_size, mpp) for t in tiles]
                start = time.process_time()
                params = slide_params(images, mpp)
                found = []
                for tile, rgb in zip(tiles, images, strict=True):
                    cells = detect_cells(rgb, mpp, tile.origin, params, slide.mpp)
                    found.append(cells.select(tile.owns(cells.x, cells.y)))
                cpu += time.process_time() - start
                level0_mpp = slide.mpp
            cells = DetectedCells.concat(found)
            truth_xy = np.column_stack([truth["x"], truth["y"]])
            matched, hits = match_ground_truth(
                truth_xy, truth["diameter_um"], np.column_stack([cells.x, cells.y]), level0_mpp
            )
            for t, c in zip(matched, hits, strict=True):
                radius = truth["diameter_um"][t] / 2 / level0_mpp
                disk = shapely.Point(truth_xy[t]).buffer(radius, quad_segs=16)
                outline = shapely.make_valid(shapely.Polygon(cells.contour[c]))
                ious.append(outline.intersection(disk).area / outline.union(disk).area)
            n_truth, n_found = n_truth + len(truth_xy), n_found + len(cells)
    return {
        "slides": len(seeds),
        "cells": n_truth,
        "detections": n_found,
        "recall": round(len(ious) / max(n_truth, 1), 4),
        "precision": round(len(ious) / max(n_found, 1), 4),
        "mean_cell_iou": round(float(np.mean(ious)), 4),
        "ms_cpu_per_cell": round(1000 * cpu / max(n_found, 1), 3),
    }


#: Real bone-marrow cells of the MLL set, one centred per 21 µm crop, at 0.106 µm/px.
MLL_MPP = 0.106
MLL_CELL_CLASSES = ("BLA", "PMO", "NGS", "LYT", "MON", "EOS")


def evaluate_marrow_crops(data: Path, per_class: int = 100, reach_um: float = 4.0) -> dict:
    """Share of real marrow cells found: each MLL crop's centre (the annotated cell) lies in a
    detected cell's outline or within ``reach_um`` of a detected nucleus's centre.

    One stain is estimated for the whole set, pooled over 40 crops, as a slide's is over its
    tiles: the crops are tight around the cell, so each holds little glass or red cell."""
    from wsi_pipeline.learn.datasets import scan_labelled_folder

    items = [i for i in scan_labelled_folder(data / "mll") if i.label in MLL_CELL_CLASSES]
    chosen = {code: [i for i in items if i.label == code][:per_class] for code in MLL_CELL_CLASSES}
    images = {
        i.path: np.asarray(Image.open(i.path).convert("RGB")) for c in chosen.values() for i in c
    }
    params = slide_params(list(images.values())[:: max(1, len(images) // 40)], MLL_MPP)
    found: dict[str, list[bool]] = {code: [] for code in chosen}
    cpu, n_cells = 0.0, 0
    for code, members in chosen.items():
        for item in members:
            rgb = images[item.path]
            start = time.process_time()
            cells = detect_cells(rgb, MLL_MPP, params=params)
            cpu += time.process_time() - start
            n_cells += len(cells)
            centre = np.array(rgb.shape[1::-1]) / 2
            near = np.hypot(cells.x - centre[0], cells.y - centre[1]) * MLL_MPP < reach_um
            point = shapely.Point(centre)
            around = [shapely.Polygon(c).buffer(0).contains(point) for c in cells.contour]
            found[code].append(bool(near.any() or any(around)))
    every = [hit for hits in found.values() for hit in hits]
    return {
        "crops": len(every),
        "recall": round(float(np.mean(every)), 4),
        "recall_by_class": {code: round(float(np.mean(h)), 4) for code, h in found.items()},
        "ms_cpu_per_cell": round(1000 * cpu / max(n_cells, 1), 3),
    }


#: SegPC-2021's myeloma marrow fields, read as ``wsi-run FOLDER --mpp 0.17 --region all`` would.
SEGPC_MPP = 0.17


def _outline(feature: dict, key: str) -> shapely.Geometry:
    return shapely.make_valid(shapely.geometry.shape(feature[key]))


def _field_density(rgb: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """Optical density above the glass, summed over channels, of every pixel of a field."""
    from wsi_pipeline.image.stain import optical_density

    return np.clip(optical_density(rgb) - glass.astype(np.float32), 0, None).sum(axis=2)


def _mean_inside(values: np.ndarray, polygon: np.ndarray) -> float:
    """Mean of ``values`` over the pixels inside a polygon of ``(x, y)`` vertices."""
    import cv2

    mask = np.zeros(values.shape, np.uint8)
    cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 1)
    return float(values[mask > 0].mean()) if mask.any() else 0.0


def evaluate_marrow_fields(data: Path, limit: int | None = None) -> dict:
    """Plasma-cell recall and whole-cell and nucleus IoU on real myeloma marrow fields.

    Each field of ``segpc-train`` runs through the pipeline's own plan and detect stages as
    ``wsi-run FOLDER --mpp 0.17 --region all`` runs it (its stain and threshold learned from the
    field). A detection matches a plasma cell when its centre lies inside the expert's outline
    of the whole cell, one detection per cell; IoU compares each matched detection's outlines
    with the expert's. Only plasma cells are outlined, so precision is not measured; instead
    ``pale_nuclei`` counts detections whose "nucleus" is less than half as dense as the field's
    expert-outlined nuclei: red cells or cytoplasm outlined as a white cell.
    """
    from wsi_pipeline.model.cards import resolve_card
    from wsi_pipeline.run.options import RunOptions
    from wsi_pipeline.run.stages import detect_tiles, plan_slide

    root = data / "segpc-train"
    images = sorted((root / "images").glob("*.jpg"))[:limit]
    if not images:
        raise FileNotFoundError(f"{root}: no images (is this the segpc-train folder?)")
    card = resolve_card("default")
    options = RunOptions(region="all", adapt=False, mpp=SEGPC_MPP)
    cells_total, found, cell_iou, nucleus_iou, cpu, detections = 0, 0, [], [], 0.0, 0
    crowded, losing, warned, fallback, pale = 0, 0, 0, 0, 0
    for image in images:
        features = json.loads((root / "cells" / f"{image.stem}.geojson").read_text())["features"]
        cells = [_outline(f, "geometry") for f in features]
        nuclei = [_outline(f, "nucleusGeometry") for f in features]
        with open_slide(image, mpp=SEGPC_MPP) as slide:
            start = time.process_time()
            plan = plan_slide(slide, card, options, checksum="-")
            detected = detect_tiles(slide, plan.tiles, card, plan.detect_params).columns
            cpu += time.process_time() - start
        x, y = detected["x"], detected["y"]
        inside = np.array(
            [
                [cell.contains(shapely.Point(px, py)) for cell in cells]
                for px, py in zip(x, y, strict=True)
            ]
        ).reshape(len(x), len(cells))
        rows, cols = linear_sum_assignment(inside, maximize=True)
        hit = inside[rows, cols]
        for i, j in zip(rows[hit], cols[hit], strict=True):
            for outlines, key, ious in (
                (cells, "contour", cell_iou),
                (nuclei, "nucleus_contour", nucleus_iou),
            ):
                mine = shapely.make_valid(shapely.Polygon(detected[key][i]))
                ious.append(mine.intersection(outlines[j]).area / mine.union(outlines[j]).area)
        cells_total, found, detections = (
            cells_total + len(cells),
            found + hit.sum(),
            detections + len(x),
        )
        if len(cells) >= 3:
            crowded += 1
            losing += hit.sum() < len(cells) * 2 / 3
        detection = plan.attrs["detection"]
        warned += bool(detection["warnings"])
        fallback += not detection["stain"]["estimated"]
        rgb = np.asarray(Image.open(image).convert("RGB"))
        density = _field_density(rgb, np.asarray(detection["stain"]["glass_od"]))
        expert = np.median(
            [
                _mean_inside(density, np.asarray(n.exterior.coords))
                for n in nuclei
                if n.geom_type == "Polygon"
            ]
            or [np.inf]
        )
        pale += sum(_mean_inside(density, c) < 0.5 * expert for c in detected["nucleus_contour"])
    return {
        "fields": len(images),
        "mpp": SEGPC_MPP,
        "plasma_cells": cells_total,
        "recall": round(found / max(cells_total, 1), 4),
        "fields_with_3_or_more": crowded,
        "fields_losing_over_a_third": int(losing),
        "mean_cell_iou": round(float(np.mean(cell_iou)), 4),
        "mean_nucleus_iou": round(float(np.mean(nucleus_iou)), 4),
        "detections": detections,
        "pale_nuclei": int(pale),
        "fields_warned": warned,
        "fields_reference_stain": fallback,
        "ms_cpu_per_cell": round(1000 * cpu / max(detections, 1), 3),
    }


#: PBC's CellaVision fields, 0.100 µm/px (estimated from their red cells; see the default card).
PBC_MPP = 0.100


def _counted_share(crops: np.ndarray) -> float:
    """Share of crops the shipped ``default`` card counts in a differential as a white cell."""
    from wsi_pipeline.core.taxonomy import cell_class
    from wsi_pipeline.model.classify import Classifier
    from wsi_pipeline.results.counts import certain

    if not len(crops):
        return 0.0
    classifier = Classifier("default", device="cpu")
    prediction = classifier.predict(crops)
    top = prediction.probabilities.argmax(1)
    confidence = prediction.probabilities.max(1)
    counted = np.array([cell_class(classifier.codes[k]).counted for k in top])
    return float((counted & certain(confidence, prediction.agreement)).mean())


def evaluate_not_cells(data: Path, limit: int | None = None) -> dict:
    """Detections per image of platelet fields and marrow artefacts, and the share of those
    detections the ``default`` card would count (see the module's docstring)."""
    from wsi_pipeline.image.crops import crop_from_array
    from wsi_pipeline.model.cards import resolve_card

    model = resolve_card("default").model
    sets = {
        "pbc_platelets": (sorted((data / "pbc-platelets").glob("*.jpg"))[:limit], PBC_MPP),
        "mll_artefacts": (sorted((data / "mll" / "ART").glob("*.jpg"))[:limit], MLL_MPP),
    }
    result = {}
    for name, (paths, mpp) in sets.items():
        images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        pooled = name == "mll_artefacts"  # tight crops: one stain for the set, as for marrow
        params = slide_params(images[:: max(1, len(images) // 40)], mpp) if pooled else None
        crops, cpu = [], 0.0
        for rgb in images:
            start = time.process_time()
            cells = detect_cells(rgb, mpp, params=params or DetectParams())
            cpu += time.process_time() - start
            if len(cells):
                xy = np.column_stack([cells.x, cells.y])
                crops.append(
                    crop_from_array(rgb, mpp, xy, fov_um=model.fov_um, size_px=model.input_size)
                )
        found = (
            np.concatenate(crops)
            if crops
            else np.empty((0, model.input_size, model.input_size, 3), np.uint8)
        )
        result[name] = {
            "images": len(images),
            "detections": len(found),
            "detections_per_image": round(len(found) / max(len(images), 1), 4),
            "counted_share_of_detections": round(_counted_share(found), 4),
            "ms_cpu_per_image": round(1000 * cpu / max(len(images), 1), 3),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    names = [*sorted(SETS), "marrow", "marrow_fields", "not_cells", "synthetic"]
    parser.add_argument("--sets", nargs="+", choices=names, default=names)
    parser.add_argument("--limit", type=int, default=None, help="first N images of each set")
    parser.add_argument("--per-class", type=int, default=100, help="marrow crops per class")
    parser.add_argument("--synthetic-slides", type=int, default=8, help="synthetic slides")
    smoke = {"limit": 2, "per_class": 2, "synthetic_slides": 1}
    args = parse_arguments(parser, argv, smoke)
    special = {
        "synthetic": lambda: evaluate_synthetic(range(args.synthetic_slides)),
        "marrow": lambda: evaluate_marrow_crops(args.data, args.per_class),
        "marrow_fields": lambda: evaluate_marrow_fields(args.data, args.limit),
        "not_cells": lambda: evaluate_not_cells(args.data, args.limit),
    }
    result = {
        name: special[name]() if name in special else evaluate(args.data, name, limit=args.limit)
        for name in args.sets
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
