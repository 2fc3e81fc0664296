"""Detection CPU time per cell of this checkout against an earlier commit, side by side.

The earlier commit is checked out into a temporary git worktree; each round runs both versions,
one after the other, in their own subprocess on the same synthetic slide's tiles (read once per
subprocess, not timed), and the best round of each counts. Only ``detect_cells`` is timed, by
the process's CPU clock, with the slide's stain (or threshold, in versions before stain
estimation) learned once from 8 of its tiles as the pipeline does.

Usage: ``python benchmarks/detect_versions.py [--base 20f6aad] [--size 6000] [--rounds 3]``;
prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import emit, parse_arguments

REPO = Path(__file__).resolve().parents[1]
TILE_MPP, TILE_SIZE, OVERLAP_UM = 1 / 3, 1024, 48.0


def time_detection(slide_path: Path) -> dict:
    """CPU seconds of ``detect_cells`` over every tile of a slide, with whichever package
    version is importable."""
    import numpy as np

    from wsi_pipeline.image import detect
    from wsi_pipeline.image.slide import open_slide
    from wsi_pipeline.image.tiles import plan_tiles

    with open_slide(slide_path) as slide:
        tiles = plan_tiles(slide.info.dimensions, slide.mpp, TILE_MPP, TILE_SIZE, OVERLAP_UM)
        images = [slide.read_region(t.origin, t.read_size, TILE_MPP) for t in tiles]
        level0_mpp = slide.mpp
    samples = [images[i] for i in np.linspace(0, len(images) - 1, 8).round().astype(int)]
    if hasattr(detect, "slide_params"):
        params = detect.slide_params(samples, TILE_MPP)
    else:  # before per-slide stain estimation
        params = detect.DetectParams(threshold=detect.slide_threshold(samples, TILE_MPP))
    start, cells = time.process_time(), 0
    for tile, rgb in zip(tiles, images, strict=True):
        cells += len(detect.detect_cells(rgb, TILE_MPP, tile.origin, params, level0_mpp))
    seconds = time.process_time() - start
    return {"cells": cells, "tiles": len(tiles), "cpu_seconds": seconds}


def run_version(source: Path, slide_path: Path) -> dict:
    """:func:`time_detection` in a subprocess importing the package from ``source``."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    out = subprocess.run(
        [sys.executable, __file__, "--one", str(slide_path)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=source,
    ).stdout
    return json.loads(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="20f6aad", help="the earlier commit")
    parser.add_argument("--size", type=int, default=6000, help="synthetic slide side, pixels")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = parse_arguments(parser, argv, {"size": 1500, "rounds": 1})
    if args.one:
        print(json.dumps(time_detection(args.one)))
        return 0
    from wsi_pipeline.synth.smear import write_synthetic_slide

    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder) / "base"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.base],
            check=True,
            capture_output=True,
        )
        try:
            slide_path = Path(folder) / "bench.svs"
            write_synthetic_slide(slide_path, size=(args.size, args.size), seed=0)
            runs: dict[str, list[dict]] = {"base": [], "head": []}
            for _ in range(args.rounds):
                runs["base"].append(run_version(base, slide_path))
                runs["head"].append(run_version(REPO, slide_path))
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)],
                check=True,
                capture_output=True,
            )
    best = {
        name: min(r["cpu_seconds"] / r["cells"] * 1000 for r in rounds)
        for name, rounds in runs.items()
    }
    report = {
        "base": args.base,
        "slide_px": args.size,
        "ms_cpu_per_cell": {name: round(value, 3) for name, value in best.items()},
        "head_vs_base": round(best["head"] / best["base"], 3),
        "runs": runs,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
