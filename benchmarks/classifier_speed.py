"""Cells per second of several classifier cards and backends, side by side in one process.

Each card's :class:`~wsi_pipeline.model.classify.Classifier`, on each backend (by default every
installed one: torch, onnxruntime, openvino), classifies the same uint8 crops (its whole path:
normalisation, every snapshot, the calibrated softmax and, where the card has one, the novelty
score) on the CPU, in rounds that alternate between them so that load from other processes hits
them alike; the best round is reported (other processes only ever slow a round down), with each
rate as a ratio of the first's, and the largest probability difference from the first backend.

Usage: ``python benchmarks/classifier_speed.py --card OLD --card NEW [--backend torch
--backend onnxruntime] [--n 512] [--rounds 5] [--out FILE.json] [--smoke]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _measure import emit, machine, parse_arguments, ratio, versions

from wsi_pipeline.model.backends import BACKENDS, installed
from wsi_pipeline.model.classify import Classifier


def cells_per_second(classifier: Classifier, crops: np.ndarray) -> float:
    """One round: every crop through ``predict``."""
    started = time.perf_counter()
    classifier.predict(crops)
    return len(crops) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", action="append", help="card name or path (repeat: 1 or more)")
    parser.add_argument("--n", type=int, default=512, help="crops per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--backend",
        action="append",
        choices=BACKENDS[1:],
        help="backend (repeat; default: every installed one, torch first)",
    )
    args = parse_arguments(parser, argv, {"card": ["synthetic-demo"], "n": 8, "rounds": 1})
    if not args.card:
        parser.error("give at least one --card")
    chosen = args.backend or [b for b in BACKENDS[1:] if installed(b)]

    classifiers = [
        Classifier(card, device="cpu", backend=backend) for card in args.card for backend in chosen
    ]
    rng = np.random.default_rng(0)
    crops = {
        c.card.name: rng.integers(0, 256, (args.n, s, s, 3), dtype=np.uint8)
        for c in classifiers
        for s in [c.card.model.input_size]
    }
    names = {c: f"{c.card.path.as_posix()}@{c.backend}" for c in classifiers}
    rates: dict[str, list[float]] = {name: [] for name in names.values()}
    # Warm-up: oneDNN builds its primitives, an ONNX backend exports or compiles, on first use.
    answers = {names[c]: c.predict_proba(crops[c.card.name][:64]) for c in classifiers}
    for _ in range(args.rounds):
        for classifier in classifiers:
            rate = cells_per_second(classifier, crops[classifier.card.name])
            rates[names[classifier]].append(rate)
    best = {name: max(r) for name, r in rates.items()}
    first = next(iter(best.values()))
    reference = {c.card.name: answers[names[c]] for c in reversed(classifiers)}  # first backend
    result = {
        "cells_per_second": {name: round(rate, 1) for name, rate in best.items()},
        "median_cells_per_second": {n: round(statistics.median(r), 1) for n, r in rates.items()},
        "ratio_to_first": {name: ratio(rate, first) for name, rate in best.items()},
        "max_probability_difference_from_first_backend": {
            names[c]: float(np.abs(answers[names[c]] - reference[c.card.name]).max())
            for c in classifiers
        },
        "members": {names[c]: len(c.models) for c in classifiers},
        "novelty": {names[c]: c.novelty is not None for c in classifiers},
        "n": args.n,
        "rounds": args.rounds,
        "statistic": "best round of each",
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "versions": versions(),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
