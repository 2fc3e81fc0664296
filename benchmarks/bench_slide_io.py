"""Slide I/O: synthetic SVS write speed and peak memory, then read-back speed of three readers.

Each slide is written by :func:`wsi_pipeline.synth.smear.write_synthetic_slide` in its own
subprocess, which reports its wall time, CPU time and peak resident memory (``getrusage``), so
the writer's memory is measured alone. Writing slides of several sizes shows that peak memory
follows the width (one band), not the area. The ``--size`` slide is then read back over the same
set of 1024 x 1024 level-0 regions three ways:
:meth:`wsi_pipeline.image.slide.Slide.read_region` at the native microns per pixel, raw
``openslide.OpenSlide.read_region``, and tifffile decoding the JPEG tiles that cover each
region. The page cache is warmed first so every reader sees the same disk state.

Usage: ``python benchmarks/bench_slide_io.py [--size 20000] [--sizes 5000 10000] [--regions 24]
[--out FILE.json] [--smoke]``; prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
from _measure import emit, parse_arguments, tifffile_region_reader

from wsi_pipeline.image.slide import open_slide

REGION = 1024
MPP = 0.25

# Runs in the child: write one slide, then report timings and the child's own peak RSS.
_WRITER = """
import json, resource, sys, time
from wsi_pipeline.synth.smear import write_synthetic_slide
path, width, height = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
start, cpu0 = time.perf_counter(), time.process_time()
write_synthetic_slide(path, size=(width, height), seed=0)
wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak_kib / 1024}))
"""


def write_in_subprocess(path: Path, size: int) -> dict:
    """Write a ``size`` x ``size`` synthetic slide in a fresh interpreter and return its figures."""
    done = subprocess.run(
        [sys.executable, "-c", _WRITER, str(path), str(size), str(size)],
        check=True,
        capture_output=True,
        text=True,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    megapixels = size * size / 1e6
    return {
        "size": [size, size],
        "megapixels": round(megapixels, 1),
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "wall_s": round(figures["wall_s"], 2),
        "write_mp_per_s": round(megapixels / figures["wall_s"], 2),
        "write_mp_per_cpu_s": round(megapixels / figures["cpu_s"], 2),
        "peak_rss_mb": round(figures["peak_rss_mb"], 1),
    }


def region_origins(size: int, count: int, seed: int = 0) -> list[tuple[int, int]]:
    """Distinct random level-0 origins of REGION-sized regions inside a ``size``-square slide."""
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in rng.integers(0, size - REGION, 2)) for _ in range(count)]


def time_reader(read: Callable[[tuple[int, int]], np.ndarray], origins: list) -> float:
    """Megapixels per second of ``read`` over all ``origins``."""
    start = time.perf_counter()
    for origin in origins:
        region = read(origin)
        assert region.shape == (REGION, REGION, 3)
    return len(origins) * REGION * REGION / 1e6 / (time.perf_counter() - start)


def read_back(path: Path, size: int, count: int) -> dict:
    """Read the same regions through wsi_pipeline.image.slide, OpenSlide and tifffile."""
    path.read_bytes()  # warm the page cache for every reader alike
    origins = region_origins(size, count)
    with open_slide(path) as slide:
        ours = time_reader(lambda o: slide.read_region(o, (REGION, REGION), MPP), origins)
    with openslide.OpenSlide(path) as osr:
        raw = time_reader(
            lambda o: np.asarray(osr.read_region(o, 0, (REGION, REGION)).convert("RGB")), origins
        )
    read_region, close = tifffile_region_reader(path)

    def read(origin: tuple[int, int]) -> np.ndarray:
        return read_region(origin, (REGION, REGION))

    try:
        tiles = time_reader(read, origins)
    finally:
        close()
    return {
        "regions": count,
        "region_px": REGION,
        "wsi_pipeline_slide_mp_per_s": round(ours, 2),
        "openslide_mp_per_s": round(raw, 2),
        "tifffile_tiles_mp_per_s": round(tiles, 2),
        "slide_vs_openslide": round(ours / raw, 3),
        "tifffile_vs_openslide": round(tiles / raw, 3),
        "slide_vs_tifffile": round(ours / tiles, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000, help="edge of the read-back slide")
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=None, help="more edges for the memory check"
    )
    parser.add_argument("--regions", type=int, default=24, help="1024 px regions to read")
    args = parse_arguments(parser, argv, {"size": 2048, "sizes": [1536], "regions": 2})
    sizes = sorted({args.size, *(args.sizes if args.sizes is not None else [args.size // 4])})
    with tempfile.TemporaryDirectory(prefix="bench-slide-io-") as folder:
        writes = [write_in_subprocess(Path(folder) / f"synth-{s}.svs", s) for s in sizes]
        small, large = writes[0], writes[-1]
        result = {
            "write": writes,
            "rss_ratio_large_small": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
            "area_ratio_large_small": round(large["megapixels"] / small["megapixels"], 1),
            "width_ratio_large_small": round(large["size"][0] / small["size"][0], 1),
            "read": read_back(Path(folder) / f"synth-{args.size}.svs", args.size, args.regions),
        }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
