"""Smear-region scoring on a synthetic wedge smear (thick, monolayer, sparse zones)."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.image.regions import CLASSES, score_regions
from wsi_pipeline.image.slide import open_slide
from wsi_pipeline.image.tiles import plan_tiles
from wsi_pipeline.synth.smear import write_synthetic_slide


@pytest.fixture(scope="module")
def region_map(tmp_path_factory):
    path = tmp_path_factory.mktemp("regions") / "s.svs"
    write_synthetic_slide(path, size=(6000, 4000), seed=0)
    with open_slide(path) as slide:
        tiles = plan_tiles(slide.info.dimensions, slide.mpp, 0.25, 512, 32.0)
        return score_regions(slide.thumbnail(2.0), 2.0), tiles


def test_wedge_zones_are_found(region_map):
    regions, tiles = region_map
    middle_row = max(t.row for t in tiles) // 2
    row = [regions.classify(t)[0] for t in tiles if t.row == middle_row]
    assert row[1] == "thick"
    assert row[len(row) // 2] == "monolayer"
    assert row[-2] in ("sparse", "empty") and row[-1] in ("sparse", "empty")


def test_selection_defaults_to_monolayer(region_map):
    regions, tiles = region_map
    chosen = regions.select(tiles)
    assert 0 < len(chosen) < len(tiles)
    assert all(regions.classify(t)[0] == "monolayer" for t in chosen)
    assert regions.select(tiles, CLASSES) == tiles


def test_glass_is_empty():
    glass = np.full((100, 100, 3), 243, dtype=np.uint8)
    regions = score_regions(glass, 4.0)
    assert not regions.mask.any()
