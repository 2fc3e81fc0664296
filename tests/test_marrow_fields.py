"""Detection on real myeloma bone-marrow fields (SegPC-2021, ``../shared/data/segpc-train``),
where nucleated cells crowd the smear: plasma cells found, no pale region taken for a nucleus,
and a collapsed stain estimate caught. Each field runs through the pipeline's own plan and
detect stages, as ``wsi-run FOLDER --mpp 0.17 --region all`` runs it."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from PIL import Image

from wsi_pipeline.image.slide import open_slide
from wsi_pipeline.image.stain import estimate_stain, optical_density
from wsi_pipeline.model.cards import resolve_card
from wsi_pipeline.run.options import RunOptions
from wsi_pipeline.run.stages import detect_tiles, plan_slide

MPP = 0.17
#: Fields where the stain estimate of the earlier detector collapsed (chromatin and red-cell
#: directions within 9 degrees of each other) and it found 0 to 1 of 8 to 12 plasma cells.
CROWDED = ("9884", "2390", "2427", "9674")


@pytest.fixture(scope="module")
def segpc(shared_data: Path) -> Path:
    root = shared_data / "segpc-train"
    if not root.is_dir():
        pytest.skip(f"SegPC marrow fields not found at {root}")
    return root


def _run(field: Path):
    """The field's plan and detected cells, as ``wsi-run --region all`` makes them."""
    card = resolve_card("default")
    with open_slide(field, mpp=MPP) as slide:
        plan = plan_slide(slide, card, RunOptions(region="all", adapt=False, mpp=MPP), "-")
        return plan, detect_tiles(slide, plan.tiles, card, plan.detect_params).columns


def _plasma_cells(root: Path, stem: str) -> list[dict]:
    return json.loads((root / "cells" / f"{stem}.geojson").read_text())["features"]


def _mean_inside(values: np.ndarray, ring: np.ndarray) -> float:
    """Mean of ``values`` over the pixels inside a polygon of ``(x, y)`` vertices."""
    mask = np.zeros(values.shape, np.uint8)
    cv2.fillPoly(mask, [np.round(ring).astype(np.int32)], 1)
    return float(values[mask > 0].mean())


def test_plasma_cells_of_crowded_fields_are_found(segpc):
    for stem in CROWDED:
        _, cells = _run(segpc / "images" / f"{stem}.jpg")
        truth = [shapely.geometry.shape(f["geometry"]) for f in _plasma_cells(segpc, stem)]
        found = sum(
            any(
                cell.contains(shapely.Point(x, y))
                for x, y in zip(cells["x"], cells["y"], strict=True)
            )
            for cell in truth
        )
        assert found >= 2 / 3 * len(truth), f"field {stem}: {found} of {len(truth)} found"


def test_no_pale_region_is_taken_for_a_nucleus(segpc):
    """Every detected nucleus is at least half as dense as the expert-outlined nuclei of its
    field: no red cell or cytoplasm is outlined as a white cell."""
    for stem in CROWDED:
        plan, cells = _run(segpc / "images" / f"{stem}.jpg")
        rgb = np.asarray(Image.open(segpc / "images" / f"{stem}.jpg").convert("RGB"))
        glass = np.asarray(plan.attrs["detection"]["stain"]["glass_od"], np.float32)
        density = np.clip(optical_density(rgb) - glass, 0, None).sum(axis=2)

        experts = [
            _mean_inside(
                density, np.asarray(shapely.geometry.shape(f["nucleusGeometry"]).exterior.coords)
            )
            for f in _plasma_cells(segpc, stem)
        ]
        found = [_mean_inside(density, ring) for ring in cells["nucleus_contour"]]
        assert len(found) and min(found) >= 0.5 * np.median(experts), stem


def test_a_collapsed_stain_estimate_is_caught_and_reported(segpc):
    rgb = np.asarray(Image.open(segpc / "images" / "9884.jpg").convert("RGB"))
    stain = estimate_stain(optical_density(rgb))
    assert not stain.estimated and "could not be told apart" in stain.problem
    assert "check in QuPath" in stain.warnings()[0]
    plan, _ = _run(segpc / "images" / "9884.jpg")  # read at the card's resolution
    (warning,) = plan.attrs["detection"]["warnings"]
    assert "could not be told apart" in warning
