"""Cells per second of several classifier cards, side by side in one process.

Each card's :class:`~wsi_pipeline.model.classify.Classifier` classifies the same uint8 crops
(its whole path: normalisation, every snapshot, the calibrated softmax and, where the card has
one, the novelty score), in rounds that alternate between the cards so that load from other
processes hits them alike; the median round is reported, with each card's rate as a ratio of the
first card's.

Usage: ``python benchmarks/classifier_speed.py --card OLD --card NEW [--n 512] [--rounds 5]
[--out FILE.json] [--smoke]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _measure import emit, machine, parse_arguments, ratio, versions

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
    args = parse_arguments(parser, argv, {"card": ["synthetic-demo"], "n": 8, "rounds": 1})
    if not args.card:
        parser.error("give at least one --card")

    classifiers = [Classifier(card, device="cpu") for card in args.card]
    rng = np.random.default_rng(0)
    crops = {
        c.card.name: rng.integers(0, 256, (args.n, s, s, 3), dtype=np.uint8)
        for c in classifiers
        for s in [c.card.model.input_size]
    }
    rates: dict[str, list[float]] = {c.card.path.as_posix(): [] for c in classifiers}
    for classifier in classifiers:  # warm-up: oneDNN builds its primitives on the first pass
        classifier.predict(crops[classifier.card.name][:64])
    for _ in range(args.rounds):
        for classifier in classifiers:
            rate = cells_per_second(classifier, crops[classifier.card.name])
            rates[classifier.card.path.as_posix()].append(rate)
    medians = {card: statistics.median(r) for card, r in rates.items()}
    first = next(iter(medians.values()))
    result = {
        "cells_per_second": {card: round(rate, 1) for card, rate in medians.items()},
        "ratio_to_first": {card: ratio(rate, first) for card, rate in medians.items()},
        "members": {c.card.path.as_posix(): len(c.models) for c in classifiers},
        "novelty": {c.card.path.as_posix(): c.novelty is not None for c in classifiers},
        "n": args.n,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "versions": versions(),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
