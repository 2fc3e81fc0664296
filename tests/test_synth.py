"""Synthetic Aperio slides: what OpenSlide reports, ground truth on white cells, determinism."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from scipy.spatial import cKDTree

from wsi_pipeline.synth.smear import (
    CLASS_MIX,
    MORPHOLOGY,
    Region,
    SynthError,
    clear_of_ground_truth,
    layout_slide,
    render_region,
    write_synthetic_slide,
)

SIZE = (2048, 1536)
SEED = 0
TILE = 256


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    path = tmp_path_factory.mktemp("synth") / "marrow.svs"
    csv_path = write_synthetic_slide(path, size=SIZE, seed=SEED)
    return path, csv_path


@pytest.fixture(scope="module")
def level0(slide: tuple[Path, Path]) -> np.ndarray:
    with openslide.OpenSlide(slide[0]) as osr:
        return np.asarray(osr.read_region((0, 0), 0, SIZE).convert("RGB"))


@pytest.fixture(scope="module")
def rendered() -> Region:
    return render_region(layout_slide(SIZE, SEED), (0, 0), SIZE, labels=True)


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_openslide_reports_an_aperio_pyramid(slide: tuple[Path, Path]) -> None:
    with openslide.OpenSlide(slide[0]) as osr:
        props = osr.properties
        assert props[openslide.PROPERTY_NAME_VENDOR] == "aperio"
        assert float(props[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert float(props[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.25)
        assert float(props[openslide.PROPERTY_NAME_OBJECTIVE_POWER]) == pytest.approx(40)
        assert osr.level_count == 2
        assert osr.level_dimensions == (SIZE, (512, 384))
        assert osr.level_downsamples == pytest.approx((1.0, 4.0))
    with tifffile.TiffFile(slide[0]) as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (TILE, TILE)
        assert page.compression == tifffile.COMPRESSION.JPEG


def test_lower_level_is_the_box_mean_of_level0(slide: tuple[Path, Path], rendered: Region) -> None:
    with openslide.OpenSlide(slide[0]) as osr:
        level1 = np.asarray(osr.read_region((0, 0), 1, (512, 384)).convert("RGB"), dtype=float)
    expected = rendered.rgb.reshape(384, 4, 512, 4, 3).mean(axis=(1, 3))
    error = np.abs(level1 - expected).mean()
    shifted = np.abs(np.roll(level1, 1, axis=1) - expected).mean()
    assert error < 5.0  # JPEG error on a detailed image
    assert shifted > 2 * error


def test_ground_truth_matches_the_layout(slide: tuple[Path, Path]) -> None:
    rows = read_table(slide[1])
    assert list(rows[0]) == ["id", "x", "y", "class", "diameter_um"]
    cells = layout_slide(SIZE, SEED).cells
    assert [int(r["id"]) for r in rows] == cells.id.tolist()
    assert slide[1].read_text() == cells.to_csv()
    assert len(rows) >= 15


def test_ground_truth_centres_lie_on_their_white_cells(
    level0: np.ndarray, rendered: Region
) -> None:
    cells = layout_slide(SIZE, SEED).cells
    assert rendered.labels is not None
    assert rendered.labels[cells.y, cells.x].tolist() == cells.id.tolist()
    # The slide on disk is that rendering, up to JPEG error.
    assert np.abs(level0.astype(int) - rendered.rgb).mean() < 2.5
    # Cells with a central nucleus show dark purple chromatin at their centre.
    central = np.isin(cells.cls, ["LYT", "BLA", "PEB", "EBO"])
    assert central.any()
    centre_rgb = level0[cells.y[central], cells.x[central]].astype(int)
    assert np.all(centre_rgb[:, 0] < 175) and np.all(centre_rgb[:, 2] > centre_rgb[:, 1])


def test_red_cells_are_pink_and_white_cells_are_not(level0: np.ndarray, rendered: Region) -> None:
    labels = rendered.labels
    pixels = level0.reshape(-1, 3).astype(int)
    stained = pixels.sum(axis=1) < 600
    white = (labels.ravel() > 0) & stained
    red = (labels.ravel() == 0) & stained
    red_ratio = (pixels[red, 2] - pixels[red, 1]).mean()
    white_ratio = (pixels[white, 2] - pixels[white, 1]).mean()
    assert red_ratio < 10  # pink: blue close to green, both well below red
    assert (pixels[red, 0] - pixels[red, 1]).mean() > 30
    assert white_ratio > red_ratio + 15  # purple and blue stains


def test_thick_zone_is_darker_than_monolayer_and_sparse_zone(level0: np.ndarray) -> None:
    darkness = 255 - level0[300:1200].mean(axis=(0, 2))
    thick = darkness[150:350].mean()
    mono = darkness[900:1100].mean()
    sparse = darkness[1750:1850].mean()
    assert thick > mono > sparse > 5


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first = write_synthetic_slide(tmp_path / "a.svs", size=(1024, 768), seed=7)
    second = write_synthetic_slide(tmp_path / "b.svs", size=(1024, 768), seed=7)
    other = write_synthetic_slide(tmp_path / "c.svs", size=(1024, 768), seed=8)
    assert len(read_table(first)) > 2
    assert first.read_bytes() == second.read_bytes()
    assert (tmp_path / "a.svs").read_bytes() == (tmp_path / "b.svs").read_bytes()
    assert first.read_bytes() != other.read_bytes()
    assert (
        layout_slide((4000, 3000), 1).cells.to_csv() != layout_slide((4000, 3000), 2).cells.to_csv()
    )


def test_rendering_does_not_depend_on_how_the_slide_is_cut() -> None:
    layout = layout_slide(SIZE, SEED)
    cells = layout.cells
    i = int(np.argmax(cells.diameter_um))
    x, y = int(cells.x[i]) - 80, int(cells.y[i]) - 80
    whole = render_region(layout, (x, y), (160, 160)).rgb
    top = render_region(layout, (x, y), (160, 77)).rgb
    bottom_left = render_region(layout, (x, y + 77), (61, 83)).rgb
    bottom_right = render_region(layout, (x + 61, y + 77), (99, 83)).rgb
    pieced = np.vstack([top, np.hstack([bottom_left, bottom_right])])
    np.testing.assert_array_equal(pieced, whole)


def test_cells_straddling_band_borders_are_seamless(
    slide: tuple[Path, Path], level0: np.ndarray
) -> None:
    layout = layout_slide(SIZE, SEED)
    cells = layout.cells
    radius = cells.diameter_um / 2 / 0.25
    border = np.round(cells.y / TILE) * TILE
    straddling = np.flatnonzero((np.abs(cells.y - border) < radius * 0.5) & (border > 0))
    assert straddling.size, "the test slide should hold a cell across a band border"
    for i in straddling:
        x0, y0 = int(cells.x[i]) - 40, int(border[i]) - 40
        expected = render_region(layout, (x0, y0), (80, 80)).rgb.astype(int)
        written = level0[y0 : y0 + 80, x0 : x0 + 80].astype(int)
        assert np.abs(written - expected).mean() < 6.0  # JPEG error on saturated red edges
        # No step at the border: the rows either side differ like any neighbouring rows.
        step = np.abs(written[40] - written[39]).mean()
        typical = np.abs(np.diff(written, axis=0)).mean()
        assert step < 3 * typical + 2


def test_layout_has_every_class_realistic_sizes_and_no_overlaps() -> None:
    cells = layout_slide((24000, 16000), 3).cells
    assert set(cells.cls) == set(CLASS_MIX) == set(MORPHOLOGY)
    for code, share in CLASS_MIX.items():
        mine = cells.cls == code
        assert mine.mean() == pytest.approx(share, abs=0.03), code
        lo, hi = MORPHOLOGY[code].diameter_um
        assert cells.diameter_um[mine].min() >= lo and cells.diameter_um[mine].max() <= hi
    points = np.column_stack([cells.x, cells.y]).astype(float)
    radius = cells.diameter_um / 2 / 0.25
    pairs = cKDTree(points).query_pairs(r=2 * radius.max(), output_type="ndarray")
    gap = np.hypot(*(points[pairs[:, 0]] - points[pairs[:, 1]]).T)
    touching = gap < radius[pairs[:, 0]] + radius[pairs[:, 1]]
    assert touching.any(), "some cells should touch"
    assert np.all(gap >= 0.85 * (radius[pairs[:, 0]] + radius[pairs[:, 1]]))


def test_bad_arguments_raise_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    target = tmp_path / "bad.svs"
    for kwargs in ({"size": (10, 10)}, {"seed": -1}, {"mpp": 0}, {"quality": 0}):
        with pytest.raises(SynthError, match="bad.svs") as info:
            write_synthetic_slide(target, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(SynthError, match="does not exist"):
        write_synthetic_slide(tmp_path / "missing" / "x.svs", size=(512, 512))
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_partial_files(tmp_path: Path) -> None:
    blocker = tmp_path / "taken.svs"
    blocker.mkdir()  # the final rename onto a folder fails after everything was written
    with pytest.raises(SynthError, match="taken.svs"):
        write_synthetic_slide(blocker, size=(512, 512))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.svs"]
    assert list(blocker.iterdir()) == []


def test_only_detections_clear_of_every_cell_are_artefacts():
    truth, diameter_um = np.array([[0.0, 0.0], [400.0, 0.0]]), np.array([10.0, 20.0])
    found = np.array([[30.0, 0.0], [50.0, 0.0], [330.0, 0.0], [200.0, 200.0]])  # level-0 px
    clear = clear_of_ground_truth(truth, diameter_um, found, mpp=0.25)
    # 7.5 um from a 10-um cell; 12.5 um from it; 17.5 um from a 20-um cell; far from both
    np.testing.assert_array_equal(clear, [False, True, False, True])
    assert clear_of_ground_truth(np.zeros((0, 2)), np.zeros(0), found, mpp=0.25).all()
