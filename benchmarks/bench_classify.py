"""Cells per second of ``wsi_pipeline.model.classify`` beside a bare ``model(batch)`` loop.

Both run in this process on the same crops, device, batch size and network, interleaved round
by round so that load from other processes hits both alike; the median round is reported. The
bare loop gets its input already converted to normalised float tensors (that conversion is
not timed), while ``Classifier.predict_proba`` starts from uint8 NumPy crops and ends with
NumPy probabilities, so the ratio is the full cost of the wrapper.

Usage: ``python benchmarks/bench_classify.py [--card default] [--n 1024] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from wsi_pipeline.model.classify import get_classifier


def _bare_loop(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Seconds for ``model(batch)`` over the batches, synchronised on a GPU."""
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(batch)
    if batches[0].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _wrapped(classifier, crops: np.ndarray) -> float:
    started = time.perf_counter()
    classifier.predict_proba(crops)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--n", type=int, default=1024, help="crops per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    classifier = get_classifier(args.card, args.device, args.batch_size)
    if len(classifier.models) != 1:
        parser.error("pick a single-model card: the bare loop runs one network")
    size = classifier.card.model.input_size
    crops = np.random.default_rng(0).integers(0, 256, (args.n, size, size, 3), dtype=np.uint8)
    step = classifier.batch_size
    batches = [classifier.preprocess(crops[i : i + step]) for i in range(0, args.n, step)]
    model = classifier.models[0]
    _bare_loop(model, batches[:2])  # warm-up: allocator, kernels, caches
    _wrapped(classifier, crops[: 2 * step])

    bare, wrapped = [], []
    for _ in range(args.rounds):
        bare.append(_bare_loop(model, batches))
        wrapped.append(_wrapped(classifier, crops))
    bare_rate = args.n / statistics.median(bare)
    wrapped_rate = args.n / statistics.median(wrapped)
    print(
        json.dumps(
            {
                "card": classifier.card.name,
                "architecture": classifier.card.model.architecture,
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
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
