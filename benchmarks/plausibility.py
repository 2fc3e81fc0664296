"""What the findings say of cells from labs a card knows and of a lab it never saw.

The graded findings (``wsi_pipeline.results.plausibility``) should stay quiet on the labs the
card was trained on and speak up on another lab's smears. Measured here with the ``default``
card, without tuning anything to the result:

* **known labs**: the crops of the card's own test split (never trained on) of MLL (marrow) and
  PBC (blood), classified as the pipeline classifies; the share of uncertain cells (the
  default rule: calibrated confidence under 0.5 or fewer than 60 % of the snapshots agreeing)
  and the severity it gets. The sets are balanced by class, so their reference-range findings
  say nothing and are not reported.
* **an unseen lab**: every BCCD image (Wright/Giemsa blood smears of another lab, microscope
  and camera) laid out as one slide, as ``bccd_transfer.py`` does, counted by ``wsi run
  --specimen blood``; every finding above ``info``, the uncertain share and the differential's
  largest groups. BCCD's own labels (one type per image) give the expected mix beside it.
* **another unseen lab**: the 350 Raabin-WBC smear photographs (magenta-toned Giemsa, Iran),
  counted the same way; they carry no white-cell types, so only the findings are reported.

Prints one JSON document. Usage: ``python benchmarks/plausibility.py [--card default]
[--per-class 60] [--limit N] [--out FILE.json] [--smoke]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _measure import SHARED_DATA, emit, parse_arguments
from bccd_transfer import TYPES, count, load_fields, write_image_mosaic

from wsi_pipeline.learn.datasets import load_crops, scan_labelled_folder, split_of
from wsi_pipeline.model.classify import Classifier
from wsi_pipeline.results.counts import certain, wilson_interval
from wsi_pipeline.results.plausibility import uncertain_findings
from wsi_pipeline.results.store import read_summary

#: Known labs: folder, specimen, µm per pixel (as the default card's training recorded them).
KNOWN = {"mll": ("marrow", 0.106), "pbc": ("blood", 0.100)}
#: Raabin-WBC's pixel size, from its red cells (``../shared/data/README.md``).
RAABIN_MPP = 0.061


def known_lab(classifier: Classifier, folder: Path, mpp: float, per_class: int) -> dict:
    """Uncertain share of the card's test-split crops of one folder, at most ``per_class``
    per class."""
    training = classifier.card.provenance.get("training", {})
    fractions = (training.get("val_fraction", 0.1), training.get("test_fraction", 0.1))
    items = [
        i
        for i in scan_labelled_folder(folder, classifier.codes)
        if split_of(i.group, *fractions) == "test"
    ]
    chosen = []
    for code in sorted({i.label for i in items}):
        chosen += [i for i in items if i.label == code][:per_class]
    model = classifier.card.model
    crops = load_crops([i.path for i in chosen], model.input_size, model.fov_um, mpp)
    prediction = classifier.predict(crops)
    sure = certain(prediction.probabilities.max(1), prediction.agreement)
    uncertain = int((~sure).sum())
    low, high = wilson_interval(uncertain, len(chosen))
    said = uncertain_findings(uncertain, len(chosen), "the default rule", (float(low), float(high)))
    return {
        "cells": len(chosen),
        "uncertain_share": round(uncertain / len(chosen), 4),
        "severity": said[0].severity if said else None,
    }


def unseen_lab(card: str, images: list[Path], mpp: float, workdir: Path) -> dict:
    """``wsi run --specimen blood`` on a mosaic of ``images``: the findings above ``info``,
    the uncertain share and the largest groups."""
    slide = workdir / "mosaic.tif"
    write_image_mosaic(images, slide)
    store = count(slide, workdir / "out", card, mpp, "--specimen", "blood")
    counts = read_summary(store)["counts"]
    groups = sorted((g for g in counts["groups"] if g["percent"]), key=lambda g: -g["percent"])
    return {
        "images": len(images),
        "mpp": round(mpp, 4),
        "cells": counts["total_cells"],
        "countable": counts["countable"],
        "uncertain_share": round(counts["uncertain"] / max(counts["total_cells"], 1), 4),
        "largest_groups_percent": {g["key"]: round(g["percent"], 1) for g in groups[:4]},
        "findings_above_info": [
            f"{f['severity']}: {f['message']}"
            for f in counts["findings"]
            if f["severity"] != "info"
        ],
    }


def unseen_bccd(card: str, data: Path, workdir: Path, limit: int | None = None) -> dict:
    """Every typed BCCD image (the first ``limit``), beside the mix its labels give."""
    fields, mpp = load_fields(data)
    fields = fields[:limit]
    images = [data / "JPEGImages" / f"{f.name}.jpg" for f in fields]
    expected = np.bincount([f.type for f in fields for _ in f.boxes], minlength=len(TYPES))
    return {
        **unseen_lab(card, images, mpp, workdir),
        "labelled_mix_percent": {
            t: round(100 * n / expected.sum(), 1) for t, n in zip(TYPES, expected, strict=True)
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", default="default")
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--limit", type=int, default=None, help="first N images of each unseen lab")
    smoke = {"card": "synthetic-demo", "per_class": 2, "limit": 4}
    args = parse_arguments(parser, argv, smoke)
    started = time.perf_counter()
    classifier = Classifier(args.card, device="cpu")
    result: dict = {"card": classifier.card.name}
    for name, (specimen, mpp) in KNOWN.items():
        result[f"known_{name}"] = {
            "specimen": specimen,
            **known_lab(classifier, SHARED_DATA / name, mpp, args.per_class),
        }
    with tempfile.TemporaryDirectory() as workdir:
        result["unseen_bccd"] = unseen_bccd(
            args.card, SHARED_DATA / "bccd", Path(workdir), args.limit
        )
    with tempfile.TemporaryDirectory() as workdir:
        images = sorted((SHARED_DATA / "raabin-train" / "images").glob("*.jpg"))[: args.limit]
        result["unseen_raabin"] = unseen_lab(args.card, images, RAABIN_MPP, Path(workdir))
    result["seconds"] = round(time.perf_counter() - started, 1)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
