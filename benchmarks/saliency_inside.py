"""Does the classifier look at the cell? Saliency mass inside each cell's contour vs its area.

HematoNet reports that its saliency falls on the cell rather than the background. For every
explained cell of a result store this prints, per method, the share of the saliency mass inside
the detected cell contour, next to the share of the crop that contour covers (what a map with no
preference would give), as one JSON document.

    python benchmarks/saliency_inside.py OUT/slide.zarr [--out FILE.json]
    python benchmarks/saliency_inside.py --smoke   # a tiny synthetic slide, run here first
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import zarr
from _measure import emit, parse_arguments

from wsi_pipeline.model.explain import contour_masks, saliency_share_inside
from wsi_pipeline.results.store import read_summary


def saliency_inside(store: str) -> dict:
    """Median and mean saliency share inside the contours, the area share, and their ratio."""
    read_summary(store)  # refuses an incomplete store
    root = zarr.open_group(store, mode="r")
    index = root["saliency/cell_index"][:]
    if not len(index):
        raise SystemExit(f"{store}: no explained cells (run without --saliency none)")
    centres = np.column_stack([root["cells/x"].oindex[index], root["cells/y"].oindex[index]])
    size = root["crops"].shape[1]
    masks = contour_masks(
        root["cells/contour"].oindex[index],
        centres,
        float(root.attrs["classifier"]["model"]["fov_um"]),
        root.attrs["slide"]["mpp"],
        size,
    )
    area = masks.mean(axis=(1, 2))
    result = {"store": store, "cells": len(index), "area_share_mean": round(float(area.mean()), 3)}
    for method in ("gradcam", "smoothgrad"):
        maps = root[f"saliency/{method}"][:]
        if not len(maps):
            continue
        share = saliency_share_inside(maps, masks)
        result[method] = {
            "inside_share_median": round(float(np.nanmedian(share)), 3),
            "inside_share_mean": round(float(np.nanmean(share)), 3),
            "enrichment_mean": round(float(np.nanmean(share / area)), 2),
            "cells_with_more_inside_than_area": int(np.sum(share > area)),
        }
    return result


def smoke_store(folder: Path) -> str:
    """The store of a tiny synthetic slide run here with the small ``synthetic-demo`` card."""
    from wsi_pipeline.image.slide import open_slide
    from wsi_pipeline.run.local import run_slide
    from wsi_pipeline.run.options import RunOptions
    from wsi_pipeline.synth.smear import write_synthetic_slide

    path = folder / "smoke.svs"
    write_synthetic_slide(path, size=(1500, 1000), seed=0)
    options = RunOptions(classifier="synthetic-demo", device="cpu", region="all", saliency_cells=1)
    with open_slide(path) as slide:
        return str(run_slide(slide, folder / "out", options, progress=False).store)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", nargs="?", help="a complete <slide-stem>.zarr with saliency")
    args = parse_arguments(parser, argv, {})
    if args.store is None and not args.smoke:
        parser.error("give a store (or --smoke)")
    with tempfile.TemporaryDirectory(prefix="saliency-inside-") as folder:
        emit(saliency_inside(args.store or smoke_store(Path(folder))), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
