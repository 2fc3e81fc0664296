"""Slides per minute of a folder run on a local Dask cluster with 1 and with 2 process workers.

Prints one JSON document: for each worker count the wall time, slides per minute and cells,
and the speed-up of 2 workers over 1. The slides are synthetic smears generated once into a cache
folder; every run writes into a fresh output folder so nothing is reused.

    python benchmarks/bench_cohort.py [--slides 6] [--size 4000 3000] [--workers 1 2]
        [--out FILE.json] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from _measure import emit, parse_arguments

from wsi_pipeline.run.cluster import dask_client, load_workflow
from wsi_pipeline.run.folder import run_cohort
from wsi_pipeline.run.options import RunOptions
from wsi_pipeline.synth.smear import write_synthetic_slide


def standard_slides(cache: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """``count`` synthetic smears of ``size``, generated once (seeds 100, 101, ...)."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = [cache / f"cohort-{size[0]}x{size[1]}-{100 + i}.svs" for i in range(count)]
    for seed, path in enumerate(paths, start=100):
        if not path.exists():
            write_synthetic_slide(path, size=size, seed=seed)
    return paths


def timed_run(slides: list[Path], workers: int, options: RunOptions) -> dict:
    """Wall time of one folder run on a fresh local cluster of ``workers`` processes."""
    workflow = dataclasses.replace(load_workflow("local-cpu"), workers=workers)
    with tempfile.TemporaryDirectory() as out, dask_client(workflow) as client:
        client.wait_for_workers(workers)
        start = time.perf_counter()
        rows = list(run_cohort(slides, Path(out), options, client))
        seconds = time.perf_counter() - start
    failed = [r["slide"] for r in rows if r["status"] != "complete"]
    if failed:
        raise RuntimeError(f"slides did not complete: {failed}")
    return {
        "workers": workers,
        "seconds": round(seconds, 1),
        "slides_per_minute": round(60 * len(rows) / seconds, 2),
        "cells": int(sum(r["cells"] for r in rows)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=6, help="slides in the folder")
    parser.add_argument("--size", type=int, nargs=2, default=(4000, 3000), metavar=("W", "H"))
    parser.add_argument("--workers", type=int, nargs="+", default=(1, 2))
    parser.add_argument("--classifier", default="synthetic-demo")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/wsi-pipeline/bench")
    smoke = {"slides": 1, "size": (1500, 1000), "workers": (1,)}
    args = parse_arguments(parser, argv, smoke)

    slides = standard_slides(args.cache, args.slides, tuple(args.size))
    # Saliency is a fixed cost per slide, measured by benchmarks/run.py; leave it out here.
    options = RunOptions(classifier=args.classifier, saliency=(), device="cpu")
    runs = [timed_run(slides, n, options) for n in args.workers]
    result = {
        "benchmark": "cohort",
        "cpu_count": os.cpu_count(),
        "slides": len(slides),
        "slide_size": list(args.size),
        "classifier": args.classifier,
        "runs": runs,
        "speed_up": round(runs[-1]["slides_per_minute"] / runs[0]["slides_per_minute"], 2),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
