"""Issue 7's benchmark suite: every stage and end to end on two standard synthetic smears.

Generates (once, into a cache folder) a small and a large synthetic marrow smear with a fixed
seed, then measures, each phase in its own subprocess so its peak RSS is its own:

* ``read``: the planned tiles read four ways, interleaved tile by tile in one process:
  :meth:`wsi_pipeline.image.slide.Slide.read_region` at the classifier's resolution and at level 0,
  tifffile decoding the level-0 JPEG tiles of the same regions, and OpenSlide ``read_region``
  of the same regions;
* ``detect``: :func:`wsi_pipeline.run.stages.detect_tiles` over every planned tile (read, detect,
  crop), beside plain reading of the same tiles, so the detection share is known;
* ``classify``: ``Classifier.predict_proba`` on real cell crops (``--backend auto``), a bare
  torch ``model(batch)`` loop over the same preprocessed tensors, TIAToolbox's
  ``PatchPredictor`` (patch mode) wrapping the same timm networks, and ``predict_proba`` on every
  other installed backend (``backend_<name>``; on a CPU), interleaved round by round on the same
  device and batch size;
* ``end_to_end``: :func:`wsi_pipeline.run.local.run_slide` with and without saliency, then
  (without saliency) the classifier alone on all of the run's own crops, one forward pass at a
  time on its workers as the pipeline runs it (``Classifier.stream``), in the same process: the
  reference of ``end_to_end_vs_classifier``. On a CPU the large slide runs once more with one
  classifier worker fewer, run and reference alike: the ratio when reading and detection have a
  core to themselves (``end_to_end_vs_classifier_spare_core``). The run's CPU time gives the
  most any schedule could reach on a busy CPU (``end_to_end_cpu_bound_vs_classifier``).

Prints one JSON document with seconds, megapixels or cells per second, peak RSS, the ratios of
issue 7 and their aims, the machine and the versions. Megapixels are level-0 pixels.

Usage: ``python benchmarks/run.py [--sizes 20000 60000] [--cache DIR] [--classifier NAME]
[--out FILE.json] [--smoke]`` (about 8 min on 2 cores the first time, 1 GB of cached slides;
5.5 min once they are cached)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
from _measure import (
    Stopwatch,
    bare_loop,
    emit,
    machine,
    memory,
    parse_arguments,
    peak_rss_mb,
    phase_runner,
    rate,
    ratio,
    tifffile_region_reader,
    versions,
)

SCRIPT = Path(__file__).resolve()
SEED = 0  # the seed bench_slide_io.write_in_subprocess writes with
AIMS = {
    "read_vs_tifffile": (">=", 0.9),
    "classify_vs_bare_loop": (">=", 0.9),
    "end_to_end_vs_classifier": (">=", 0.8),
    "peak_rss_large_vs_small": ("<=", 1.2),
}
NOT_HASHED = "not computed by the benchmark"  # plan_slide skips hashing when given a checksum
#: Crops read from an end-to-end run's store at a time to classify them again alone (reading is
#: not timed). All of them are classified: the same work as the run and about as long, where
#: 1,024-crop rounds on this machine came out 5 to 10 % slower than the whole set.
REFERENCE_BLOCK = 1024


# --- phases (each runs in a child process and returns JSON-ready figures) --------------------


def _plan(slide, card_path: str):
    """The run's plan of a slide (default options), without hashing the file."""
    from wsi_pipeline.model.cards import load_card
    from wsi_pipeline.run.options import RunOptions
    from wsi_pipeline.run.stages import plan_slide

    card = load_card(card_path)
    return card, plan_slide(slide, card, RunOptions(classifier=card_path), checksum=NOT_HASHED)


def _spread(items: list, count: int) -> list:
    """At most ``count`` items spread evenly over the list."""
    if len(items) <= count:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def _warm_page_cache(path: Path, block: int = 1 << 24) -> None:
    """Read the file once so every reader finds it in the page cache."""
    with open(path, "rb") as stream:
        while stream.read(block):
            pass


def _level0_size(tile, level0_mpp: float) -> tuple[int, int]:
    """Level-0 pixels the slide reader decodes for a tile (as ``Slide.read_region`` sizes it)."""
    scale = tile.mpp / level0_mpp
    return tuple(max(1, math.ceil(n * scale)) for n in tile.read_size)


def phase_read(slide: str, card: str, tiles: int) -> dict:
    """Megapixels per second of three readers over the same planned tiles, interleaved."""
    import openslide

    from wsi_pipeline.image.slide import open_slide

    path = Path(slide)
    after_imports = peak_rss_mb()
    _warm_page_cache(path)
    # Two handles: each keeps its own decoded tiles, so the second reader of a region does not
    # find the first one's. The picks are far apart, so neither reuses its own.
    with open_slide(path) as opened, open_slide(path) as again, openslide.OpenSlide(path) as raw:
        _, plan = _plan(opened, card)
        picks = _spread(plan.tiles, tiles)
        sizes = [_level0_size(t, opened.mpp) for t in picks]
        tif_read, tif_close = tifffile_region_reader(path)
        readers: dict[str, Callable] = {
            "wsi_pipeline": lambda t, s: opened.read_region(t.origin, t.read_size, t.mpp),
            # The same level-0 pixels without resampling: the reader's own cost, like for like.
            "wsi_pipeline_level0": lambda t, s: again.read_region(t.origin, s),
            "tifffile": lambda t, s: tif_read(t.origin, s),
            "openslide": lambda t, s: np.asarray(raw.read_region(t.origin, 0, s).convert("RGB")),
        }
        try:
            for read in readers.values():  # warm-up: decoders, JPEG tables, allocator
                read(picks[0], sizes[0])
            watches = {name: Stopwatch() for name in readers}
            for tile, size in zip(picks, sizes, strict=True):
                for name, read in readers.items():
                    with watches[name].timing():
                        read(tile, size)
        finally:
            tif_close()
        level = opened.best_level(picks[0].mpp / opened.mpp)
    megapixels = sum(w * h for w, h in sizes) / 1e6
    return {
        "tiles_planned": len(plan.tiles),
        "tiles_read": len(picks),
        "slide_level_read": level,
        "level0_megapixels": round(megapixels, 1),
        **{
            name: {"seconds": round(w.seconds, 2), "mp_per_s": rate(megapixels, w.seconds)}
            for name, w in watches.items()
        },
        **memory(after_imports),
    }


def phase_detect(slide: str, card: str, crops_out: str | None, keep: int) -> dict:
    """``detect_tiles`` over every planned tile, beside plain reads of the same tiles."""
    from wsi_pipeline.image.slide import open_slide
    from wsi_pipeline.run.stages import detect_tiles

    path = Path(slide)
    after_imports = peak_rss_mb()
    _warm_page_cache(path)
    plan_watch, read_watch, detect_watch = Stopwatch(), Stopwatch(), Stopwatch()
    cells, kept = 0, []
    with open_slide(path) as opened:
        with plan_watch.timing():
            model_card, plan = _plan(opened, card)
        for tile in plan.tiles:
            with read_watch.timing():
                opened.read_region(tile.origin, tile.read_size, tile.mpp)
        for tile in plan.tiles:
            with detect_watch.timing():
                found = detect_tiles(opened, [tile], model_card, plan.detect_params)
            cells += len(found)
            if sum(len(k) for k in kept) < keep:
                kept.append(found.crops)
        megapixels = sum(math.prod(_level0_size(t, opened.mpp)) for t in plan.tiles) / 1e6
    if crops_out:
        _save_atomic(Path(crops_out), np.concatenate(kept)[:keep])
    detect_only = detect_watch.seconds - read_watch.seconds
    return {
        "tiles": len(plan.tiles),
        "cells": cells,
        "level0_megapixels": round(megapixels, 1),
        "plan_seconds": round(plan_watch.seconds, 2),
        "read_seconds": round(read_watch.seconds, 2),
        "detect_tiles_seconds": round(detect_watch.seconds, 2),
        "detect_tiles_mp_per_s": rate(megapixels, detect_watch.seconds),
        "detect_tiles_cells_per_s": rate(cells, detect_watch.seconds),
        "detect_without_read_seconds": round(detect_only, 2),
        "detect_without_read_mp_per_s": rate(megapixels, detect_only),
        **memory(after_imports),
    }


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as stream:
        np.save(stream, array)
    os.replace(stream.name, path)


def tiatoolbox_predictor(classifier):
    """TIAToolbox ``PatchPredictor`` around the classifier's own networks (nothing downloaded).

    The wrapped model takes TIAToolbox's uint8 NHWC batches, scales and normalises them as the
    card says and returns the ensemble's mean softmax, so both sides compute the same thing.
    """
    import torch
    from tiatoolbox import rcParam
    from tiatoolbox.models import PatchPredictor
    from tiatoolbox.models.models_abc import ModelABC

    rcParam["torch_compile_mode"] = "disable"  # ours runs eagerly too

    spec = classifier.card.model
    device = classifier.device

    class CardEnsemble(ModelABC):
        """The card's networks as one TIAToolbox model."""

        def __init__(self) -> None:
            super().__init__()
            self.members = torch.nn.ModuleList(classifier.models)
            self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = (x - self.mean) / self.std
            return sum(m(x).softmax(1) for m in self.members) / len(self.members)

        @staticmethod
        def infer_batch(model, batch_data, *, device: str) -> np.ndarray:
            x = batch_data.to(device).permute(0, 3, 1, 2).float().div_(255.0)
            with torch.inference_mode():
                return model(x).cpu().numpy()

        @staticmethod
        def postproc(image: np.ndarray) -> np.ndarray:
            return image.argmax(axis=-1)

    return PatchPredictor(
        model=CardEnsemble(), batch_size=classifier.batch_size, device=str(device), verbose=False
    )


def phase_classify(card: str, crops: str, device: str, batch_size: int | None, rounds: int) -> dict:
    """Cells per second: ``predict_proba`` vs a bare loop vs TIAToolbox, and on each backend, on
    the same crops, with malloc tuned as a pipeline run tunes it (all gain from it)."""
    import torch
    from tiatoolbox.models import IOPatchPredictorConfig  # before the memory baseline

    from wsi_pipeline.model.backends import BACKENDS, installed
    from wsi_pipeline.model.classify import Classifier
    from wsi_pipeline.run.tuning import tune_malloc

    tune_malloc()

    after_imports = peak_rss_mb()
    load = Stopwatch()
    with load.timing():
        classifier = Classifier(card, device=device, batch_size=batch_size)
    cells = np.load(crops)
    step = classifier.batch_size
    batches = [classifier.preprocess(cells[i : i + step]) for i in range(0, len(cells), step)]
    predictor = tiatoolbox_predictor(classifier)
    size = classifier.card.model.input_size
    ioconfig = IOPatchPredictorConfig(
        input_resolutions=[{"units": "baseline", "resolution": 1.0}],
        patch_input_shape=(size, size),
        stride_shape=(size, size),
    )
    results: dict[str, np.ndarray] = {}

    def tiatoolbox() -> None:
        out = predictor.run(
            cells,
            patch_mode=True,
            ioconfig=ioconfig,
            output_type="dict",
            return_probabilities=True,
        )
        results["tiatoolbox"] = np.asarray(out["probabilities"])

    def wsi_pipeline() -> None:
        results["wsi_pipeline"] = classifier.predict_proba(cells)

    backends = {classifier.backend: classifier}
    if classifier.device.type == "cpu":  # the ONNX backends run on a CPU only
        for name in BACKENDS[1:]:
            if installed(name) and name not in backends:
                backends[name] = Classifier(card, device, batch_size, backend=name)
    ways = {
        "wsi_pipeline": wsi_pipeline,
        "bare_loop": lambda: bare_loop(classifier.models, batches),
        "tiatoolbox": tiatoolbox,
        **{f"backend_{name}": partial(c.predict_proba, cells) for name, c in backends.items()},
    }
    for way in ways.values():  # warm-up round, not timed
        way()
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            way()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    agree = float(np.abs(results["wsi_pipeline"] - results["tiatoolbox"]).max())
    return {
        "crops": len(cells),
        "device": str(classifier.device),
        "batch_size": step,
        "backend": classifier.backend,
        "ensemble_members": len(classifier.models),
        "rounds": rounds,
        "model_load_seconds": round(load.seconds, 2),
        "torch_threads": torch.get_num_threads(),
        **{
            name: {"median_seconds": round(median[name], 3), "cells_per_s": rate(len(cells), s)}
            for name, s in median.items()
        },
        "tiatoolbox_max_abs_probability_difference": agree,
        **memory(after_imports),
    }


def phase_end_to_end(
    slide: str,
    card: str,
    device: str,
    batch_size: int | None,
    saliency: bool,
    out: str,
    torch_threads: int | None = None,
) -> dict:
    """``run_slide`` on one slide with default options (model loaded beforehand, not timed);
    without saliency, then the classifier alone on the run's own crops. ``torch_threads`` caps
    the classifier's threads (its workers on a CPU) in both, leaving the other cores to the
    rest of the run; by default the classifier has all of them.

    ``cpu_seconds`` is the process's CPU time (every thread, user and system) over the run: on
    a busy CPU, ``cells / (cpu_seconds / cores)`` is the most any schedule of the same work
    could reach.
    """
    import torch
    import zarr

    from wsi_pipeline.image.slide import open_slide
    from wsi_pipeline.model.classify import get_classifier
    from wsi_pipeline.run.local import run_slide
    from wsi_pipeline.run.options import SALIENCY_METHODS, RunOptions

    options = RunOptions(
        classifier=card,
        device=device,
        batch_size=batch_size,
        saliency=SALIENCY_METHODS if saliency else (),
    )
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    after_imports = peak_rss_mb()
    load = Stopwatch()
    with load.timing():
        classifier = get_classifier(card, device, batch_size)  # cached: run_slide reuses it
    with tempfile.TemporaryDirectory(dir=out) as folder, open_slide(slide) as opened:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = run_slide(opened, Path(folder), options, progress=False)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        run_memory = memory(after_imports)
        if not saliency:
            alone = _classifier_alone(classifier, zarr.open_group(result.store, mode="r")["crops"])
    cells = result.differential.total_cells
    figures = {
        "saliency": list(options.saliency) or "none",
        "seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "cells": cells,
        "cells_per_s": rate(cells, wall),
        "classifier_workers": classifier.workers,
        "backend": classifier.backend,
        "model_load_seconds": round(load.seconds, 2),
        "stage_seconds": {name: round(v, 2) for name, v in result.timings.items()},
        **run_memory,
    }
    if not saliency:
        figures["classifier_alone"] = alone
    return figures


def _classifier_alone(classifier, crops) -> dict:
    """The classifier alone on every crop of a run (a zarr array), one forward pass at a time on
    its workers, as the pipeline runs it (``Classifier.stream``)."""
    seconds, cpu, step, count = 0.0, 0.0, classifier.pass_size, crops.shape[0]
    for first in range(0, count, REFERENCE_BLOCK):
        block = crops[first : first + REFERENCE_BLOCK]
        passes = (block[at : at + step] for at in range(0, len(block), step))
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in classifier.stream(classifier.predict_proba, passes):
            pass
        seconds += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
    return {
        "crops": count,
        "batch_size": classifier.batch_size,
        "crops_per_forward_pass": step,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "cells_per_s": rate(count, seconds),
    }


PHASES: dict[str, Callable[..., dict]] = {
    "read": phase_read,
    "detect": phase_detect,
    "classify": phase_classify,
    "end_to_end": phase_end_to_end,
}


# --- orchestration (parent process) ----------------------------------------------------------


def ensure_slide(cache: Path, size: int) -> tuple[Path, dict]:
    """The cached ``size``-square smear, written first (in a subprocess) when missing."""
    from bench_slide_io import write_in_subprocess

    path = cache / f"smear-{size}-seed{SEED}.svs"
    if path.exists():
        return path, {"cached": True, "file_mb": round(path.stat().st_size / 1e6, 1)}
    return path, {"cached": False, **write_in_subprocess(path, size)}


def benchmark_card(name: str, cache: Path) -> tuple[str, str]:
    """The card to run and what its weights are: its own, or an untrained copy when it has none."""
    from wsi_pipeline.model.cards import build_model, load_card, save_weights, write_card

    card = load_card(name)
    if card.weights:
        return str(card.path), "trained weights of the card"
    path = cache / f"{card.name}-untrained.toml"
    if not path.exists():
        weights = save_weights(build_model(card), cache / f"{card.name}-untrained.safetensors")
        untrained = dataclasses.replace(card, path=path, weights=(weights,))
        write_card(untrained, path)
    return str(path), "untrained copy (the card has no weights yet): speed only, no accuracy"


def aims_met(ratios: dict) -> dict:
    """Each ratio of issue 7 against its aim."""
    met = {}
    for name, (sense, target) in AIMS.items():
        value = ratios.get(name)
        ok = None if value is None else (value >= target if sense == ">=" else value <= target)
        met[name] = {"aim": f"{sense} {target}", "value": value, "met": ok}
    return met


def measure(args: argparse.Namespace) -> dict:
    """Run every phase and assemble the report."""
    started = time.perf_counter()
    cache = args.cache.expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    small, large = args.sizes
    generation, slides = {}, {}
    for size in (small, large):
        slides[size], generation[str(size)] = ensure_slide(cache, size)
    card, weights_note = benchmark_card(args.classifier, cache)
    common = {"card": card}
    model = {"device": args.device, "batch_size": args.batch_size}
    measuring = time.perf_counter()
    crops = cache / f"crops-{small}-seed{SEED}.npy"
    run_phase = phase_runner(SCRIPT, PHASES, in_process=args.smoke)
    stages: dict[str, dict] = {"read": {}, "detect": {}, "end_to_end": {}}
    for size in (small, large):
        stages["read"][str(size)] = run_phase(
            "read", slide=str(slides[size]), tiles=args.read_tiles, **common
        )
        stages["detect"][str(size)] = run_phase(
            "detect",
            slide=str(slides[size]),
            crops_out=str(crops) if size == small else None,
            keep=args.crops,
            **common,
        )
    stages["classify"] = run_phase(
        "classify", crops=str(crops), rounds=args.rounds, **common, **model
    )
    for size in (small, large):
        runs = [False, True] if size in args.saliency_sizes else [False]
        stages["end_to_end"][str(size)] = [
            run_phase(
                "end_to_end",
                slide=str(slides[size]),
                saliency=saliency,
                out=str(cache),
                **common,
                **model,
            )
            for saliency in runs
        ]
    read, classify = stages["read"][str(large)], stages["classify"]
    e2e_small, e2e_large = stages["end_to_end"][str(small)][0], stages["end_to_end"][str(large)][0]
    host = machine()
    spare = None
    if e2e_large["classifier_workers"] > 1 and (host["gpu"] is None or args.device == "cpu"):
        spare = stages["end_to_end_spare_core"] = run_phase(
            "end_to_end",
            slide=str(slides[large]),
            saliency=False,
            out=str(cache),
            torch_threads=e2e_large["classifier_workers"] - 1,
            **common,
            **model,
        )
    alone = e2e_large["classifier_alone"]["cells_per_s"]
    cpu_bound = rate(e2e_large["cells"] * host["cpus_usable"], e2e_large["cpu_seconds"])
    ratios = {
        "read_vs_tifffile": ratio(read["wsi_pipeline"]["mp_per_s"], read["tifffile"]["mp_per_s"]),
        "read_level0_vs_tifffile": ratio(
            read["wsi_pipeline_level0"]["mp_per_s"], read["tifffile"]["mp_per_s"]
        ),
        "read_vs_openslide": ratio(read["wsi_pipeline"]["mp_per_s"], read["openslide"]["mp_per_s"]),
        "classify_vs_bare_loop": ratio(
            classify["wsi_pipeline"]["cells_per_s"], classify["bare_loop"]["cells_per_s"]
        ),
        "end_to_end_vs_classifier": ratio(e2e_large["cells_per_s"], alone),
        "end_to_end_cpu_bound_vs_classifier": ratio(cpu_bound, alone),
        "end_to_end_vs_cpu_bound": ratio(e2e_large["cells_per_s"], cpu_bound),
        "end_to_end_vs_classifier_spare_core": (
            ratio(spare["cells_per_s"], spare["classifier_alone"]["cells_per_s"]) if spare else None
        ),
        "end_to_end_vs_classify_phase": ratio(
            e2e_large["cells_per_s"], classify["wsi_pipeline"]["cells_per_s"]
        ),
        "peak_rss_large_vs_small": ratio(e2e_large["peak_rss_mb"], e2e_small["peak_rss_mb"]),
        "peak_rss_above_imports_large_vs_small": ratio(
            e2e_large["peak_rss_above_imports_mb"], e2e_small["peak_rss_above_imports_mb"]
        ),
        "classify_fastest_backend_vs_torch": ratio(
            max(v["cells_per_s"] for k, v in classify.items() if k.startswith("backend_")),
            classify["backend_torch"]["cells_per_s"],
        ),
        "tiatoolbox_vs_wsi_pipeline": ratio(
            classify["tiatoolbox"]["cells_per_s"], classify["wsi_pipeline"]["cells_per_s"]
        ),
    }
    return {
        "benchmark": "wsi-pipeline issue 7: benchmarks/run.py",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {
            "sizes": [small, large],
            "area_ratio_large_vs_small": round((large / small) ** 2, 2),
            "seed": SEED,
            "cache": str(cache),
            "classifier": args.classifier,
            "card_path": card,
            "weights": weights_note,
            "device": args.device,
            "batch_size": args.batch_size or "classifier default",
            "read_tiles_per_slide": args.read_tiles,
            "classify_crops": args.crops,
            "classify_rounds": args.rounds,
            "saliency_sizes": args.saliency_sizes,
            "ratios_from": "read and end to end on the large slide (saliency none), end to end "
            "against the classifier alone on that run's crops right after it; classify on real "
            "crops of the small slide; peak RSS of end to end (saliency none)",
            "cpu_bound": "the large slide's cells per second if the run's CPU time were spread "
            "over every usable core without a gap: cells x cores / cpu_seconds",
            "spare_core": "end_to_end_spare_core: the large slide again with one classifier "
            "worker fewer (torch threads), in the run and in its classifier-alone reference, so "
            "reading and detection have a core of their own (CPU only)",
        },
        "machine": host,
        "versions": versions(),
        "generation": generation,
        "stages": stages,
        "ratios": ratios,
        "aims": aims_met(ratios),
        "seconds": {
            "generation": round(measuring - started, 1),
            "measuring": round(time.perf_counter() - measuring, 1),
        },
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs=2,
        default=[20000, 60000],
        metavar=("SMALL", "LARGE"),
        help="edges of the two square slides in level-0 px (issue 7's standard slides; the "
        "large one holds about 20,000 white cells); the area ratio must be >= 9",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("~/.cache/wsi-pipeline/bench"),
        help="folder of the generated slides (reused when present)",
    )
    parser.add_argument("--classifier", default="synthetic-demo", help="card name or path")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the device's")
    parser.add_argument(
        "--read-tiles",
        type=int,
        default=144,
        help="tiles read per reader (nearly all of the small slide's: steadier ratios)",
    )
    parser.add_argument("--crops", type=int, default=256, help="cell crops classified")
    parser.add_argument("--rounds", type=int, default=3, help="classification rounds")
    parser.add_argument(
        "--saliency-sizes",
        type=int,
        nargs="*",
        default=None,
        help="sizes also run end to end with saliency (default: the small one)",
    )
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--arguments", default="{}", help=argparse.SUPPRESS)
    smoke = {"sizes": [1500, 4500], "read_tiles": 2, "crops": 16, "rounds": 1, "saliency_sizes": []}
    args = parse_arguments(parser, argv, smoke)
    small, large = args.sizes
    if not 0 < small < large or (large / small) ** 2 < 9:
        parser.error(f"--sizes {small} {large}: need 0 < SMALL < LARGE with LARGE >= 3 x SMALL")
    if args.saliency_sizes is None:
        args.saliency_sizes = [small]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase:
        print(json.dumps(PHASES[args.phase](**json.loads(args.arguments))))
        return 0
    emit(measure(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
