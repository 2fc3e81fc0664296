"""Saliency on real marrow cells: where each Grad-CAM layer looks, SmoothGrad's grid artefact,
and the speed of the old and the new implementation.

On the first ``--per-class`` crops of every class of the MLL folder, cut as the card expects
(its field of view, 0.106 µm/px sources, its input size), with the card's first member:

* ``layers``: Grad-CAM of the top class at each candidate stage: the share of the map's mass
  inside Otsu masks of the cell and of its nucleus (:func:`cell_masks`) and that share over the
  mask's area share ("enrichment"), and the correlation of the maps of the top two classes (a
  class-specific layer gives them different maps);
* ``smoothgrad``: plain SmoothGrad and the jittered default on every 4th of those crops: the
  stride-2 spectral power share (:func:`wsi_pipeline.model.explain.stride_power_share`) and
  the mass inside the cell;
* ``speed``: cells per second and peak RSS of the old implementation (pytorch-grad-cam at the
  last stage; SmoothGrad one pass per noise sample, weights not frozen, as ``explain_cells``
  ran it) and the new one (as ``explain_cells`` runs it now), each in a fresh interpreter
  (``_measure.run_phase``), median of ``--rounds`` after a warm-up.

Writes ``benchmarks/saliency.json`` (or ``--out``; ``--smoke`` writes nothing unless given
``--out``) and prints it.

Usage: ``python benchmarks/saliency.py [--mll ../shared/data/mll] [--per-class 20]
[--out FILE.json] [--smoke]`` (about 4 min on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _measure import (
    SHARED_DATA,
    emit,
    machine,
    memory,
    parse_arguments,
    peak_rss_mb,
    phase_runner,
    rate,
    versions,
)
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import disk, opening

MLL = SHARED_DATA / "mll"
MLL_MPP = 0.106  # the folder's pixel size (see its README)
STAGES = (-1, -2, -3, -4)


def load_mll(folder: Path, per_class: int, size: int, fov_um: float) -> np.ndarray:
    """The first ``per_class`` images of every class folder, cut to the card's field of view."""
    from wsi_pipeline.learn.datasets import load_crops

    paths = [
        path
        for code in sorted(p for p in folder.iterdir() if p.is_dir())
        for path in sorted(code.iterdir())[:per_class]
    ]
    return load_crops(paths, size, fov_um, MLL_MPP)


def _central(mask: np.ndarray) -> np.ndarray:
    """The hole-filled component of ``mask`` with most pixels near the crop centre."""
    labels, n = ndi.label(mask)
    h, w = mask.shape
    yy, xx = np.mgrid[:h, :w]
    near = np.hypot(yy - h / 2, xx - w / 2) < h / 6
    counts = np.bincount(labels[near], minlength=n + 1)
    counts[0] = 0
    if counts.max() == 0:
        return np.zeros_like(mask)
    return ndi.binary_fill_holes(labels == counts.argmax())


def cell_masks(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rough masks of the centred cell (Otsu on optical density) and of its nucleus (Otsu on
    the nuclear stain inside the cell)."""
    from wsi_pipeline.image.stain import nuclear_stain, optical_density

    cells, nuclei = [], []
    for crop in crops:
        density = optical_density(crop).sum(axis=-1)
        cell = _central(opening(density > threshold_otsu(density), disk(2)))
        stain = nuclear_stain(crop)
        level = threshold_otsu(stain[cell] if cell.any() else stain)
        cells.append(cell)
        nuclei.append(_central(opening(stain > level, disk(1))) & cell)
    return np.array(cells), np.array(nuclei)


def _inside(maps: np.ndarray, masks: np.ndarray, keep: np.ndarray) -> dict:
    from wsi_pipeline.model.explain import saliency_share_inside

    share = saliency_share_inside(maps, masks)[keep]
    area = masks.mean(axis=(1, 2))[keep]
    return {
        "share": round(float(np.nanmean(share)), 3),
        "enrichment": round(float(np.nanmean(share / area)), 2),
    }


def quality(card: str, folder: Path, per_class: int) -> dict:
    """The ``layers`` and ``smoothgrad`` sections (see the module docstring)."""
    from wsi_pipeline.model import explain
    from wsi_pipeline.model.classify import Classifier

    classifier = Classifier(card, device="cpu")
    spec = classifier.card.model
    model = copy.deepcopy(classifier.models[0]).requires_grad_(False)
    norm = {"mean": spec.mean, "std": spec.std}
    crops = load_mll(folder, per_class, spec.input_size, spec.fov_um)
    ranked = np.argsort(classifier.predict_proba(crops), axis=1)
    top, second = ranked[:, -1], ranked[:, -2]
    cells, nuclei = cell_masks(crops)
    keep = cells.any(axis=(1, 2)) & nuclei.any(axis=(1, 2))
    layers = {}
    for stage in STAGES:
        maps = explain.gradcam(model, crops, top, stage=stage, **norm)
        other = explain.gradcam(model, crops, second, stage=stage, **norm)
        flat, other_flat = maps.reshape(len(maps), -1), other.reshape(len(maps), -1)
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(flat, other_flat, strict=True)]
        blank = torch.zeros(1, 3, spec.input_size, spec.input_size)
        grid = model.stages[: len(model.stages) + stage + 1](model.stem(blank))
        layers[str(stage)] = {
            "grid": list(grid.shape[-2:]),
            "cell": _inside(maps, cells, keep),
            "nucleus": _inside(maps, nuclei, keep),
            "top1_top2_correlation": round(float(np.nanmean(corr)), 2),
        }
    every = slice(None, None, 4)
    smooth = {}
    chance = 3 / (spec.input_size**2 - 1)
    for name, jitter in (("plain", False), ("jitter", True)):
        maps = explain.smoothgrad(model, crops[every], top[every], jitter=jitter, **norm)
        share = explain.stride_power_share(maps)
        smooth[name] = {
            "stride2_power_share_median": round(float(np.median(share)), 4),
            "stride2_power_share_mean": round(float(np.mean(share)), 4),
            "cell": _inside(maps, cells[every], keep[every]),
        }
    return {
        "crops": len(crops),
        "with_masks": int(keep.sum()),
        "area_share": {
            "cell": round(float(cells.mean(axis=(1, 2))[keep].mean()), 3),
            "nucleus": round(float(nuclei.mean(axis=(1, 2))[keep].mean()), 3),
        },
        "layers": layers,
        "smoothgrad": {
            "crops": len(crops[every]),
            "stride2_chance_share": round(chance, 5),
            **smooth,
        },
    }


def _old_gradcam(model, crops, targets, mean, std) -> None:
    """pytorch-grad-cam at the last stage, as the previous ``explain.gradcam`` ran it."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from wsi_pipeline.model.explain import _to_input

    device = next(model.parameters()).device
    with GradCAM(model, [model.stages[-1]]) as cam:
        for i in range(0, len(crops), 32):
            x = _to_input(crops[i : i + 32], mean, std, device)
            cam(x, [ClassifierOutputTarget(int(t)) for t in targets[i : i + 32]])


def _old_smoothgrad(model, crops, targets, mean, std, n_samples=25, sigma=0.15) -> None:
    """The previous ``explain.smoothgrad``: 32 crops a pass, one pass per noise sample."""
    from wsi_pipeline.model.explain import _to_input

    device = next(model.parameters()).device
    classes = torch.as_tensor(targets)
    for i in range(0, len(crops), 32):
        x = _to_input(crops[i : i + 32], mean, std, device)
        spread = sigma * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
        shape = (n_samples, *x.shape[1:])
        noise = np.stack(
            [
                np.random.default_rng([0, k]).standard_normal(shape, np.float32)
                for k in range(i, i + len(x))
            ]
        )
        for sample in range(n_samples):
            noisy = (x + spread * torch.from_numpy(noise[:, sample])).requires_grad_(True)
            with torch.enable_grad():
                chosen = model(noisy).gather(1, classes[i : i + len(x), None]).sum()
                torch.autograd.grad(chosen, noisy)


def phase_speed(card: str, mll: str, per_class: int, method: str, way: str, rounds: int) -> dict:
    """Cells per second of one method, old or new way, in this fresh interpreter."""
    from wsi_pipeline.model import explain
    from wsi_pipeline.model.classify import Classifier

    after_imports = peak_rss_mb()
    classifier = Classifier(card, device="cpu")
    spec = classifier.card.model
    crops = load_mll(Path(mll), per_class, spec.input_size, spec.fov_um)
    targets = classifier.predict_proba(crops).argmax(axis=1)
    model = copy.deepcopy(classifier.models[0])
    if way == "new":
        model.requires_grad_(False)  # as explain_cells runs it
    run = {
        ("gradcam", "old"): _old_gradcam,
        ("gradcam", "new"): explain.gradcam,
        ("smoothgrad", "old"): _old_smoothgrad,
        ("smoothgrad", "new"): explain.smoothgrad,
    }[method, way]
    run(model, crops[:4], targets[:4], mean=spec.mean, std=spec.std)  # warm-up
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        run(model, crops, targets, mean=spec.mean, std=spec.std)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "crops": len(crops),
        "median_seconds": round(median, 2),
        "cells_per_s": rate(len(crops), median),
        **memory(after_imports),
    }


PHASES = {"speed": phase_speed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", default="default")
    parser.add_argument("--mll", type=Path, default=MLL, help="the MLL folder (one per class)")
    parser.add_argument("--per-class", type=int, default=20, help="crops per class for quality")
    parser.add_argument("--speed-per-class", type=int, default=4, help="crops per class, speed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--arguments", default="{}", help=argparse.SUPPRESS)
    parser.set_defaults(out=Path(__file__).with_name("saliency.json"))
    smoke = {
        "card": "synthetic-demo",
        "per_class": 1,
        "speed_per_class": 1,
        "rounds": 1,
        "out": None,
    }
    args = parse_arguments(parser, argv, smoke)
    if args.phase:
        print(json.dumps(PHASES[args.phase](**json.loads(args.arguments))))
        return 0
    run_phase = phase_runner(Path(__file__), PHASES, in_process=args.smoke)
    speed: dict[str, dict] = {}
    for method in ("gradcam", "smoothgrad"):
        for way in ("old", "new"):
            speed.setdefault(method, {})[way] = run_phase(
                "speed",
                card=args.card,
                mll=str(args.mll),
                per_class=args.speed_per_class,
                method=method,
                way=way,
                rounds=args.rounds,
            )
        old, new = speed[method]["old"]["cells_per_s"], speed[method]["new"]["cells_per_s"]
        speed[method]["speedup"] = round(new / old, 2)
    report = {
        "card": args.card,
        "quality": quality(args.card, args.mll, args.per_class),
        "speed": speed,
        "machine": machine(),
        "versions": versions(),
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
