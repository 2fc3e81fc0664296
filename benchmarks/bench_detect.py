"""Detection speed, synthetic precision/recall and peak memory at two slide sizes.

Each size runs in its own subprocess (so peak RSS is that run's own): write a synthetic slide,
then stream its tiles through ``detect_cells`` keeping only owned cells, and match the cells to
the ground truth within half a cell diameter. Prints one JSON document.

Usage: ``python benchmarks/bench_detect.py [--sizes 4000 12000] [--seeds 0 1 2]
[--out FILE.json] [--smoke]``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _measure import emit, parse_arguments

from wsi_pipeline.image.detect import DetectedCells, detect_cells, slide_params
from wsi_pipeline.image.slide import open_slide
from wsi_pipeline.image.tiles import plan_tiles
from wsi_pipeline.synth.smear import match_ground_truth, write_synthetic_slide

TILE_MPP, TILE_SIZE, OVERLAP_UM = 1 / 3, 1024, 32.0
STAIN_SAMPLE_TILES = 8  # as the pipeline: the threshold is learned once per slide


def match_truth(truth: np.ndarray, cells: DetectedCells, mpp: float) -> int:
    """Ground-truth cells matched one-to-one within half their diameter."""
    truth_xy = np.column_stack([truth["x"], truth["y"]])
    cells_xy = np.column_stack([cells.x, cells.y])
    return len(match_ground_truth(truth_xy, truth["diameter_um"], cells_xy, mpp)[0])


def run_one(size: int, seed: int) -> dict:
    """Write, detect and score one square synthetic slide; return its figures."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.svs"
        csv = write_synthetic_slide(path, size=(size, size), seed=seed)
        truth = np.genfromtxt(csv, delimiter=",", names=True, dtype=None, encoding="utf-8")
        found, start = [], time.perf_counter()
        with open_slide(path) as slide:
            tiles = plan_tiles(slide.info.dimensions, slide.mpp, TILE_MPP, TILE_SIZE, OVERLAP_UM)
            picks = np.linspace(0, len(tiles) - 1, STAIN_SAMPLE_TILES).round().astype(int)
            samples = [
                slide.read_region(tiles[i].origin, tiles[i].read_size, TILE_MPP) for i in picks
            ]
            params = slide_params(samples, TILE_MPP)
            del samples
            detect_seconds = 0.0
            for tile in tiles:
                rgb = slide.read_region(tile.origin, tile.read_size, tile.mpp)
                tic = time.perf_counter()
                cells = detect_cells(rgb, tile.mpp, tile.origin, params, slide.mpp)
                detect_seconds += time.perf_counter() - tic
                found.append(cells.select(tile.owns(cells.x, cells.y)))
            cells = DetectedCells.concat(found)
            matched = match_truth(truth, cells, slide.mpp)
        total = time.perf_counter() - start
    return {
        "size": size,
        "seed": seed,
        "tiles": len(tiles),
        "truth": len(truth),
        "detections": len(cells),
        "recall": matched / max(len(truth), 1),
        "precision": matched / max(len(cells), 1),
        "detect_tiles_per_s": len(tiles) / detect_seconds,
        "detect_cells_per_s": len(cells) / detect_seconds,
        "read_and_detect_s": round(total, 2),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 12000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--one", type=int, nargs=2, metavar=("SIZE", "SEED"), help=argparse.SUPPRESS
    )
    args = parse_arguments(parser, argv, {"sizes": [1500, 3000], "seeds": [0]})
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return 0
    runs = []
    for size in args.sizes:
        for seed in args.seeds if size == min(args.sizes) else args.seeds[:1]:
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(size), str(seed)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs.append(json.loads(out))
    small, large = min(args.sizes), max(args.sizes)
    rss = {r["size"]: r["peak_rss_mb"] for r in runs}
    truth = sum(r["truth"] for r in runs)
    detections = sum(r["detections"] for r in runs)
    matched_recall = sum(r["recall"] * r["truth"] for r in runs)
    report = {
        "tile": {"mpp": TILE_MPP, "size_px": TILE_SIZE, "overlap_um": OVERLAP_UM},
        "recall": matched_recall / truth,
        "precision": matched_recall / detections,
        "detect_tiles_per_s": runs[-1]["detect_tiles_per_s"],
        "detect_cells_per_s": runs[-1]["detect_cells_per_s"],
        "peak_rss_mb": rss,
        "rss_ratio_large_to_small": rss[large] / rss[small],
        "area_ratio_large_to_small": (large / small) ** 2,
        "runs": runs,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
