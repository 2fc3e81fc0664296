"""Each slide's stain, estimated from its own pixels, and detection that follows it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from wsi_pipeline.image.detect import detect_cells, slide_params
from wsi_pipeline.image.slide import open_slide
from wsi_pipeline.image.stain import (
    REFERENCE_STAIN,
    estimate_stain,
    nuclear_stain,
    optical_density,
)
from wsi_pipeline.synth.smear import write_synthetic_slide


def _angle(a, b) -> float:
    a, b = np.asarray(a) / np.linalg.norm(a), np.asarray(b) / np.linalg.norm(b)
    return float(np.degrees(np.arccos(np.clip(a @ b, -1, 1))))


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """A 1200 x 1200 px field of a synthetic smear (drawn in the reference stain), 0.25 µm/px."""
    path = tmp_path_factory.mktemp("stain") / "s.svs"
    write_synthetic_slide(path, size=(1600, 1600), seed=5)
    with open_slide(path) as slide:
        return slide.read_region((200, 200), (1200, 1200)), slide.mpp


def test_estimate_recovers_the_stain_a_field_was_drawn_in(field):
    rgb, _ = field
    stain = estimate_stain(optical_density(rgb))
    assert stain.estimated
    assert _angle(stain.nucleus, REFERENCE_STAIN.nucleus) < 10
    assert _angle(stain.counterstain, REFERENCE_STAIN.counterstain) < 10
    assert stain.warnings() == []


def test_detection_follows_a_tinted_lab(field):
    """The same field under yellow glass and a magenta-shifted stain (another lab's look)
    yields the same cells: the stain and glass are estimated, not assumed."""
    rgb, mpp = field
    plain = detect_cells(rgb, mpp)
    # Yellow glass: less blue light through everything; a redder stain: more red light.
    tinted = np.clip(rgb * np.array([1.0, 0.93, 0.72]) + np.array([12, 0, 0]), 0, 255)
    shifted = detect_cells(tinted.astype(np.uint8), mpp)
    assert len(plain) >= 5
    distance = np.hypot(plain.x[:, None] - shifted.x, plain.y[:, None] - shifted.y)
    assert len(shifted) == len(plain)
    assert np.all(distance.min(axis=1) < 4 / mpp)


def test_glass_is_zero_whatever_its_tint():
    glass = np.full((64, 64, 3), (236, 226, 170), dtype=np.uint8)  # yellow glass
    stain = estimate_stain(optical_density(glass))
    assert not stain.estimated  # nothing stained to estimate from: the reference directions
    assert np.abs(nuclear_stain(glass, stain)).max() < 1e-3


def test_another_labs_shade_is_not_a_warning():
    magenta = dataclasses.replace(REFERENCE_STAIN, nucleus=(0.23, 0.95, 0.2), estimated=True)
    assert magenta.warnings() == []


def test_a_field_of_nuclei_alone_collapses_to_the_reference_and_warns():
    """Where nuclei are most of the stained pixels, the median stained direction is
    chromatin's: the estimate cannot part the stains, says so, and uses the reference."""
    rng = np.random.default_rng(0)
    amount = rng.uniform(0.5, 2.5, size=(4000, 1))
    od = amount * np.asarray(REFERENCE_STAIN.nucleus) + rng.normal(0, 0.03, size=(4000, 3))
    stain = estimate_stain(np.clip(od, 0, None))
    assert not stain.estimated
    assert stain.nucleus == REFERENCE_STAIN.nucleus
    (warning,) = stain.warnings()
    assert "could not be told apart" in warning and "check in QuPath" in warning


def test_slide_params_record_the_stain(field):
    rgb, mpp = field
    params = slide_params([rgb[:600], rgb[600:]], mpp)
    assert params.stain is not None and params.stain.estimated
    assert params.threshold is not None and params.threshold > 0
    record = params.stain.as_dict()
    assert set(record) >= {"nucleus_od", "counterstain_od", "glass_od", "estimated"}


def test_a_cell_cut_by_the_image_edge_is_counted_and_flagged(field):
    rgb, mpp = field
    cells = detect_cells(rgb, mpp)
    big = int(np.argmax(cells.cell_area_um2))
    x0, y0, x1, y1 = cells.bbox[big]
    # Cut the image through the middle of that cell: its centre stays inside.
    cut = rgb[:, : int(cells.x[big]) + (x1 - x0) // 4]
    found = detect_cells(np.ascontiguousarray(cut), mpp)
    nearest = int(np.argmin(np.hypot(found.x - cells.x[big], found.y - cells.y[big])))
    assert np.hypot(found.x[nearest] - cells.x[big], found.y[nearest] - cells.y[big]) < 4 / mpp
    assert found.edge[nearest]
    assert not cells.edge[big] or x1 >= rgb.shape[1] - 1
