"""White-cell detection: real BCCD smears, synthetic slides, tile borders."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from skimage import morphology

from wsi_pipeline.core.schema import CONTOUR_VERTICES
from wsi_pipeline.image.detect import (
    DetectedCells,
    DetectParams,
    detect_cells,
    learn_threshold,
    slide_params,
)
from wsi_pipeline.image.labelling import drop_small, label_mask, link_near
from wsi_pipeline.image.slide import open_slide
from wsi_pipeline.image.stain import nuclear_stain
from wsi_pipeline.image.tiles import plan_tiles
from wsi_pipeline.synth.smear import CLASS_MIX, match_ground_truth, write_synthetic_slide

REPO = Path(__file__).resolve().parents[1]


def _detection_benchmark():
    path = REPO / "benchmarks" / "detection.py"
    if str(path.parent) not in sys.path:  # the scripts share benchmarks/_measure.py
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("detection_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "s.svs"
    csv = write_synthetic_slide(path, size=(3000, 2000), seed=3)
    rows = np.genfromtxt(csv, delimiter=",", names=True, dtype=None, encoding="utf-8")
    return path, rows


@pytest.mark.parametrize(
    ("dataset", "images", "recall", "precision"),
    # Two labs, two stains: BCCD's violet nuclei and pink red cells; Raabin-WBC's magenta
    # nuclei, lavender red cells and often yellow glass. One detector, stain estimated per image.
    [("bccd", 292, 0.98, 0.97), ("raabin", 350, 0.95, 0.93)],
)
def test_real_smears_of_two_labs(shared_data, dataset, images, recall, precision):
    result = _detection_benchmark().evaluate(shared_data, dataset)
    print(json.dumps({k: result[k] for k in ("recall", "precision", "mean_cell_box_iou")}))
    assert result["images"] == images
    assert result["recall"] >= recall
    assert result["precision"] >= precision
    # Whole cells, not nuclei: the outline's box overlaps the expert's white-cell box.
    assert result["mean_cell_box_iou"] >= 0.75


def test_real_marrow_cells_are_found(shared_data):
    # MLL's crops are tight around one cell, so nucleated cells, not glass and red cells, are
    # most of the pixels: the threshold rule must not mistake chromatin for background.
    result = _detection_benchmark().evaluate_marrow_crops(shared_data, per_class=50)
    print(json.dumps(result))
    assert result["crops"] == 300
    assert result["recall"] >= 0.93
    assert min(result["recall_by_class"].values()) >= 0.85


def test_nuclear_stain_separates_nuclei_from_red_cells_and_glass():
    purple, pink, glass = (140, 126, 210), (222, 150, 155), (243, 241, 246)
    stain = nuclear_stain(np.array([[purple, pink, glass]], dtype=np.uint8))[0]
    assert stain[0] > stain[2] + 0.3 > stain[1] + 0.3


def test_labelling_is_scipys_and_small_pieces_go_as_in_skimage():
    mask = np.random.default_rng(0).random((300, 400)) < 0.45
    expected, count = ndi.label(mask)
    labels, n = label_mask(mask)
    assert n == count
    np.testing.assert_array_equal(labels, expected)
    for max_size in (0, 3, 20):
        np.testing.assert_array_equal(
            drop_small(mask, max_size), morphology.remove_small_objects(mask, max_size=max_size)
        )


def test_linked_pieces_are_scipys_connected_components():
    rng = np.random.default_rng(1)
    for count, reach in ((1, 5.0), (40, 3.0), (300, 6.0), (300, 12.0)):
        centres = rng.random((count, 2)) * 100
        pairs = cKDTree(centres).query_pairs(reach, output_type="ndarray")
        graph = coo_matrix((np.ones(len(pairs)), tuple(pairs.T)), shape=(count, count))
        expected = connected_components(graph, directed=False)[1] + 1
        np.testing.assert_array_equal(link_near(centres, reach), expected)
    # A chain whose lowest index sits at its far end takes several rounds.
    chain = np.column_stack([np.zeros(50), np.arange(50)[::-1] * 2.0])
    np.testing.assert_array_equal(link_near(chain, 2.5), np.ones(50))


def test_blank_image_has_no_cells():
    glass = np.full((400, 400, 3), (243, 241, 246), dtype=np.uint8)
    assert len(detect_cells(glass, 0.25)) == 0
    assert learn_threshold(nuclear_stain(glass)) == DetectParams().min_threshold


def test_one_synthetic_cell_found_where_it_is(synthetic):
    path, rows = synthetic
    cell = rows[np.argmax(rows["diameter_um"] > 9)]
    with open_slide(path) as slide:
        x0, y0 = int(cell["x"]) - 100, int(cell["y"]) - 100
        rgb = slide.read_region((x0, y0), (200, 200))
        cells = detect_cells(rgb, slide.mpp, origin=(x0, y0))
    distance = np.hypot(cells.x - cell["x"], cells.y - cell["y"]) * 0.25
    assert distance.min() < cell["diameter_um"] / 2
    nearest = int(np.argmin(distance))
    x_a, y_a, x_b, y_b = cells.bbox[nearest]
    assert x_a <= cells.x[nearest] < x_b and y_a <= cells.y[nearest] < y_b
    contour = cells.contour[nearest]
    assert contour.shape == (CONTOUR_VERTICES, 2) and contour.dtype == np.float32
    assert 0 <= cells.score[nearest] < 1
    # The whole cell, not its nucleus: within a third of the true cell's area.
    true_area = np.pi * (cell["diameter_um"] / 2) ** 2
    assert abs(cells.cell_area_um2[nearest] / true_area - 1) < 1 / 3
    assert 0 < cells.nucleus_area_um2[nearest] < cells.cell_area_um2[nearest]
    assert cells.nc_ratio[nearest] == pytest.approx(
        cells.nucleus_area_um2[nearest] / cells.cell_area_um2[nearest], rel=1e-5
    )
    assert 0.5 < cells.circularity[nearest] <= 1 and not cells.edge[nearest]


def _detect_tiled(rgb: np.ndarray, mpp: float, tile_size: int, overlap_um: float) -> DetectedCells:
    """Detect over an in-memory image tile by tile, keeping each cell in its owning tile."""
    height, width = rgb.shape[:2]
    tables = []
    for tile in plan_tiles((width, height), mpp, mpp, tile_size, overlap_um):
        found = detect_cells(rgb[tile.y0 : tile.y1, tile.x0 : tile.x1], mpp, tile.origin)
        tables.append(found.select(tile.owns(found.x, found.y)))
    return DetectedCells.concat(tables)


def test_cells_on_tile_borders_are_counted_once(synthetic):
    path, rows = synthetic
    lymphocyte = rows[rows["class"] == "LYT"][0] if np.any(rows["class"] == "LYT") else rows[0]
    with open_slide(path) as slide:
        patch = slide.read_region((int(lymphocyte["x"]) - 40, int(lymphocyte["y"]) - 40), (80, 80))
    mpp, tile_size, overlap_um = 0.25, 400, 30.0
    tiles = plan_tiles((1400, 1400), mpp, mpp, tile_size, overlap_um)
    canvas = np.full((1400, 1400, 3), (243, 241, 246), dtype=np.uint8)
    # Paste the cell with its centre exactly on core borders and corners.
    borders = sorted({t.core_x0 for t in tiles} - {0})
    centres = [(bx, 200) for bx in borders] + [(bx, by) for bx in borders for by in borders]
    centres = [(x, y) for x, y in centres if 40 <= x <= 1360 and 40 <= y <= 1360]
    centres = [
        c
        for i, c in enumerate(centres)
        if all(np.hypot(c[0] - d[0], c[1] - d[1]) >= 100 for d in centres[:i])
    ]
    for x, y in centres:
        canvas[y - 40 : y + 40, x - 40 : x + 40] = patch
    cells = _detect_tiled(canvas, mpp, tile_size, overlap_um)
    truth = np.array(centres, dtype=float)
    distance = np.hypot(truth[:, None, 0] - cells.x[None], truth[:, None, 1] - cells.y[None])
    assert len(cells) == len(centres)
    assert np.all((distance < 20).sum(axis=1) == 1)


def _synthetic_matches(folder: Path, seed: int) -> tuple[np.ndarray, int, int]:
    """Ground-truth classes, matched cells and detections of tiled detection on one slide."""
    csv = write_synthetic_slide(folder / f"s{seed}.svs", size=(3000, 2000), seed=seed)
    truth = np.genfromtxt(csv, delimiter=",", names=True, dtype=None, encoding="utf-8")
    with open_slide(folder / f"s{seed}.svs") as slide:
        mpp = 1 / 3
        tiles = plan_tiles(slide.info.dimensions, slide.mpp, mpp, 1024, 32.0)
        images = [slide.read_region(t.origin, t.read_size, mpp) for t in tiles]
        params = slide_params(images, mpp)
        found = []
        for tile, rgb in zip(tiles, images, strict=True):
            cells = detect_cells(rgb, mpp, tile.origin, params, slide.mpp)
            found.append(cells.select(tile.owns(cells.x, cells.y)))
    cells = DetectedCells.concat(found)
    truth_xy = np.column_stack([truth["x"], truth["y"]])
    cells_xy = np.column_stack([cells.x, cells.y])
    matched, _ = match_ground_truth(truth_xy, truth["diameter_um"], cells_xy, 0.25)
    return truth["class"], len(matched), len(cells)


def test_synthetic_recall_and_precision(tmp_path):
    # About 50 cells a slide: one miss moves a slide's recall by 2 points, so score them pooled.
    results = [_synthetic_matches(tmp_path, seed) for seed in range(16)]
    classes = np.concatenate([c for c, _, _ in results])
    matched = sum(m for _, m, _ in results)
    recall, precision = matched / len(classes), matched / sum(n for _, _, n in results)
    print(json.dumps({"cells": len(classes), "recall": recall, "precision": precision}))
    assert set(classes) == set(CLASS_MIX)
    # 0.971 and 0.973 with the fixed reference stain these slides are drawn in; estimating the
    # stain per slide (two stains and what neither explains) lets some blue cytoplasm into the
    # chromatin channel, and a few touching pairs merge: the price of holding on other labs.
    assert recall >= 0.95
    assert precision >= 0.95
