"""wsi-pipeline: differential cell counts for bone-marrow aspirate whole-slide images.

The public API is importable from here; each name is imported on first use, so that
``import wsi_pipeline`` (and the command line) starts without loading torch.

=====================  ======================================================
``open_slide``         open a slide file, DICOM folder or image
``run_slide``          count one open slide in this process
``run_cohort``         count slides on a Dask cluster
``Classifier``         a card's network(s), ready for inference
``load_card``          read a classifier card by name or path
``differential``       the differential count of classified cells
``read_summary``       the summary of a complete result store
``RunOptions``         every parameter of a run
``InputError``         bad input the user can fix (exit code 2 on the CLI)
=====================  ======================================================
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "open_slide": "wsi_pipeline.image.slide",
    "Slide": "wsi_pipeline.image.slide",
    "run_slide": "wsi_pipeline.run.local",
    "run_cohort": "wsi_pipeline.run.folder",
    "RunOptions": "wsi_pipeline.run.options",
    "Classifier": "wsi_pipeline.model.classify",
    "get_classifier": "wsi_pipeline.model.classify",
    "classify_crops": "wsi_pipeline.model.classify",
    "load_card": "wsi_pipeline.model.cards",
    "ClassifierCard": "wsi_pipeline.model.cards",
    "detect_cells": "wsi_pipeline.image.detect",
    "differential": "wsi_pipeline.results.counts",
    "read_summary": "wsi_pipeline.results.store",
    "write_synthetic_slide": "wsi_pipeline.synth.smear",
    "InputError": "wsi_pipeline.core.errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'wsi_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
