"""White-cell detection on the real BCCD smear photographs against their WBC boxes.

Each image is opened as a one-level slide at 0.07 µm/px (the median red-cell box is 104 px for
red cells about 7.5 µm across) and run through the detector with one set of parameters. A
detection counts when its centre falls inside a WBC box, one detection per box (a maximum
bipartite matching), so a cell split in two costs precision.

Usage: ``python benchmarks/bccd_detection.py [--data ../shared/data/bccd] [--limit N]``;
prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from wsi_pipeline.image.detect import DetectParams, detect_cells
from wsi_pipeline.image.slide import open_slide

BCCD_MPP = 0.07
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"


def wbc_boxes(annotation: Path) -> np.ndarray:
    """WBC boxes ``(xmin, ymin, xmax, ymax)`` of one Pascal-VOC annotation file."""
    boxes = [
        [float(obj.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax")]
        for obj in ET.parse(annotation).getroot().iter("object")
        if obj.findtext("name") == "WBC"
    ]
    return np.array(boxes, dtype=float).reshape(-1, 4)


def matched_boxes(x: np.ndarray, y: np.ndarray, boxes: np.ndarray) -> int:
    """Number of boxes matched one-to-one with a detection whose centre lies inside."""
    if len(x) == 0 or len(boxes) == 0:
        return 0
    inside = (
        (x[:, None] >= boxes[None, :, 0])
        & (x[:, None] <= boxes[None, :, 2])
        & (y[:, None] >= boxes[None, :, 1])
        & (y[:, None] <= boxes[None, :, 3])
    )
    rows, cols = linear_sum_assignment(inside, maximize=True)
    return int(inside[rows, cols].sum())


def evaluate(data: Path, params: DetectParams, limit: int | None = None) -> dict:
    """Recall and precision of :func:`detect_cells` over the BCCD images."""
    images = sorted((data / "JPEGImages").glob("*.jpg"))[:limit]
    if not images:
        raise FileNotFoundError(f"{data}: no JPEGImages/*.jpg (is this the BCCD folder?)")
    n_boxes = n_detections = n_matched = 0
    missed, extra = [], []
    start = time.perf_counter()
    for image in images:
        with open_slide(image, mpp=BCCD_MPP) as slide:
            width, height = slide.info.dimensions
            rgb = slide.read_region((0, 0), (width, height), BCCD_MPP)
        cells = detect_cells(rgb, BCCD_MPP, params=params)
        boxes = wbc_boxes(data / "Annotations" / f"{image.stem}.xml")
        matched = matched_boxes(cells.x, cells.y, boxes)
        n_boxes += len(boxes)
        n_detections += len(cells)
        n_matched += matched
        if matched < len(boxes):
            missed.append(image.stem)
        if matched < len(cells):
            extra.append(image.stem)
    seconds = time.perf_counter() - start
    return {
        "images": len(images),
        "wbc_boxes": n_boxes,
        "detections": n_detections,
        "matched": n_matched,
        "recall": n_matched / max(n_boxes, 1),
        "precision": n_matched / max(n_detections, 1),
        "images_with_missed_boxes": missed,
        "images_with_extra_detections": extra,
        "mpp": BCCD_MPP,
        "work_mpp": params.work_mpp,
        "seconds": round(seconds, 2),
        "images_per_s": round(len(images) / seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the bccd/ folder")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    args = parser.parse_args(argv)
    json.dump(evaluate(args.data, DetectParams(), args.limit), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
