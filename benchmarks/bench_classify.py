"""Cells per second of ``wsi_pipeline.model.classify`` beside a bare ``model(batch)`` loop.

Both run in this process on the same crops, device, batch size and networks (every member of
the card's ensemble), interleaved round by round so that load from other processes hits both
alike; the median round is reported. The bare loop gets its input already converted to
normalised float tensors (that conversion is not timed), while ``Classifier.predict_proba``
starts from uint8 NumPy crops and ends with NumPy probabilities, so the ratio is the full cost
of the wrapper.

Usage: ``python benchmarks/bench_classify.py [--card default] [--n 1024] [--rounds 5]
[--out FILE.json] [--smoke]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from _measure import bare_loop, emit, parse_arguments

from wsi_pipeline.model.classify import get_classifier


def _seconds(work: Callable[[], object]) -> float:
    """Wall seconds of one call of ``work``."""
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--n", type=int, default=1024, help="crops per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parse_arguments(parser, argv, {"card": "synthetic-demo", "n": 8, "rounds": 1})

    classifier = get_classifier(args.card, args.device, args.batch_size)
    size = classifier.card.model.input_size
    crops = np.random.default_rng(0).integers(0, 256, (args.n, size, size, 3), dtype=np.uint8)
    step = classifier.batch_size
    batches = [classifier.preprocess(crops[i : i + step]) for i in range(0, args.n, step)]
    models = classifier.models
    bare_loop(models, batches[:2])  # warm-up: allocator, kernels, caches
    classifier.predict_proba(crops[: 2 * step])

    bare, wrapped = [], []
    for _ in range(args.rounds):
        bare.append(_seconds(lambda: bare_loop(models, batches)))
        wrapped.append(_seconds(lambda: classifier.predict_proba(crops)))
    bare_rate = args.n / statistics.median(bare)
    wrapped_rate = args.n / statistics.median(wrapped)
    result = {
        "card": classifier.card.name,
        "architecture": classifier.card.model.architecture,
        "ensemble_members": len(models),
        "input_size": size,
        "device": str(classifier.device),
        "batch_size": step,
        "crops_per_round": args.n,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "bare_loop_cells_per_s": round(bare_rate, 1),
        "classify_cells_per_s": round(wrapped_rate, 1),
        "ratio": round(wrapped_rate / bare_rate, 3),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
