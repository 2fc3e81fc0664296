"""Helpers shared by the benchmark scripts: arguments and output, phases in subprocesses,
readers, machine facts.

Every script takes ``--smoke`` (its smallest input, run in seconds by ``tests/test_benchmarks.py``)
and ``--out FILE`` (the JSON document it prints, also written there): :func:`parse_arguments`,
:func:`emit`. Each measured phase runs in a fresh interpreter so that its peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``) is its own; the child prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path

import numpy as np
import tifffile

Pair = tuple[int, int]
#: Real data beside the checkout (or ``$WSI_SHARED_DATA``), as the tests find it.
SHARED_DATA = Path(
    os.environ.get("WSI_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
PACKAGES = (
    "wsi-pipeline", "torch", "timm", "tiatoolbox", "openslide-python", "openslide-bin",
    "tifffile", "numpy", "scikit-image", "zarr", "dask", "pillow",
)  # fmt: skip


def parse_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, smoke: dict[str, object]
) -> argparse.Namespace:
    """Add ``--smoke`` and ``--out`` to a script's parser and parse its arguments.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The script's parser, with its own arguments.
    argv : sequence of str, optional
        The arguments; ``sys.argv[1:]`` when None.
    smoke : dict
        The defaults ``--smoke`` puts in place (by argument destination): the script's smallest
        input. Arguments given explicitly still win.

    Returns
    -------
    argparse.Namespace
    """
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the smallest input, in seconds: checks the script runs, measures nothing",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**smoke)
    return parser.parse_args(argv)


def emit(result: dict, out: Path | None) -> None:
    """Print a script's JSON document, and write it to ``out`` too when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")


def bare_loop(models: list, batches: list) -> None:
    """Every network of an ensemble over every batch: the work, without the classifier around
    it (synchronised on a GPU)."""
    import torch

    with torch.inference_mode():
        for batch in batches:
            for model in models:
                model(batch)
    if batches[0].is_cuda:
        torch.cuda.synchronize()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(after_imports_mb: float) -> dict:
    """Peak RSS of this phase, the part of it taken by imports, and the rest."""
    peak = peak_rss_mb()
    return {
        "peak_rss_mb": round(peak, 1),
        "rss_after_imports_mb": round(after_imports_mb, 1),
        "peak_rss_above_imports_mb": round(peak - after_imports_mb, 1),
    }


def run_phase(script: Path, phase: str, **arguments: object) -> dict:
    """Run ``script --phase PHASE --arguments JSON`` in a fresh interpreter; return its JSON.

    Raises
    ------
    RuntimeError
        When the child fails; the message is one line naming the phase and its last error line.
    """
    done = subprocess.run(
        [sys.executable, str(script), "--phase", phase, "--arguments", json.dumps(arguments)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"benchmark phase {phase!r} failed ({arguments}): {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def phase_runner(
    script: Path, phases: dict[str, Callable[..., dict]], in_process: bool
) -> Callable[..., dict]:
    """``run(phase, **arguments)``: a script's phase in a fresh interpreter (:func:`run_phase`),
    or, ``in_process``, called here with the same JSON arguments and result.

    A smoke run checks that the phases work together, not what each costs: in process it
    skips an interpreter start and a torch import per phase, most of a smoke run's time.
    """
    if not in_process:
        return partial(run_phase, script)

    def run(phase: str, **arguments: object) -> dict:
        result = phases[phase](**json.loads(json.dumps(arguments)))
        return json.loads(json.dumps(result))

    return run


@dataclass
class Stopwatch:
    """Seconds accumulated over several timed blocks."""

    seconds: float = 0.0

    @contextmanager
    def timing(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start


def tifffile_region_reader(path: Path) -> tuple[Callable[[Pair, Pair], np.ndarray], Callable]:
    """A level-0 region reader that decodes only the covering tiles with tifffile.

    Returns
    -------
    read : callable
        ``read((x, y), (width, height))`` -> (height, width, 3) uint8; the region must lie
        inside the image.
    close : callable
    """
    tif = tifffile.TiffFile(path)
    page = tif.pages[0]
    th, tw = page.tilelength, page.tilewidth
    across = -(-page.imagewidth // tw)

    def read(origin: Pair, size: Pair) -> np.ndarray:
        (x, y), (width, height) = origin, size
        cols = range(x // tw, (x + width - 1) // tw + 1)
        rows = range(y // th, (y + height - 1) // th + 1)
        mosaic = np.empty((len(rows) * th, len(cols) * tw, 3), dtype=np.uint8)
        for i, row in enumerate(rows):
            for j, col in enumerate(cols):
                index = row * across + col
                tif.filehandle.seek(page.dataoffsets[index])
                raw = tif.filehandle.read(page.databytecounts[index])
                tile = page.decode(raw, index, jpegtables=page.jpegtables)[0]
                mosaic[i * th : (i + 1) * th, j * tw : (j + 1) * tw] = tile.reshape(th, tw, 3)
        top, left = y - rows[0] * th, x - cols[0] * tw
        return mosaic[top : top + height, left : left + width]

    return read, tif.close


def machine() -> dict:
    """CPU count, the CPUs this process may use, GPU, torch threads and the current load."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }


def versions() -> dict:
    """Python, OpenSlide library and installed package versions."""
    import openslide

    found = {"python": platform.python_version(), "libopenslide": openslide.__library_version__}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def rate(amount: float, seconds: float) -> float:
    """``amount`` per second, rounded for the report (0 when nothing was timed)."""
    return round(amount / seconds, 2) if seconds > 0 else 0.0


def ratio(numerator: float, denominator: float) -> float | None:
    """A ratio rounded for the report, or None when the denominator is 0."""
    return round(numerator / denominator, 3) if denominator else None
