"""Saliency: real forward/backward passes through a small, randomly initialised timm CoAtNet."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch

from wsi_pipeline.model import explain, mosaics

SIZE = 64


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("coatnet_pico_rw_224", pretrained=False, img_size=SIZE, num_classes=4)


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(150, 230, (3, SIZE, SIZE, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < 12**2
    images[:, disc] = (90, 40, 140)  # a purple "cell" in the middle
    return np.concatenate([images, images[:1]])  # the 4th crop repeats the 1st


def test_gradcam_maps_are_raw_and_comparable(model, crops):
    targets = np.array([0, 1, 2, 0])
    maps = explain.gradcam(model, crops, targets, batch_size=2)
    assert maps.shape == (4, SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() > 0
    assert not np.allclose(maps.reshape(4, -1).max(1), 1.0)  # not min-max normalised per map
    np.testing.assert_allclose(maps[3], maps[0], rtol=1e-4, atol=1e-7)  # batch-independent


def test_gradcam_layer_is_a_spatial_stage(model):
    assert explain.gradcam_layer(model) is model.stages[explain.GRADCAM_STAGE]
    out = model.stages[:-1](model.stem(torch.zeros(1, 3, SIZE, SIZE)))
    assert out.ndim == 4 and out.shape[-1] == SIZE // 16  # NCHW: no reshape transform needed
    with pytest.raises(TypeError, match="CoAtNet"):
        explain.gradcam_layer(torch.nn.Linear(2, 2))


def test_gradcam_works_with_frozen_weights_and_removes_its_hook(model, crops):
    frozen = copy.deepcopy(model).requires_grad_(False)
    targets = np.array([0, 1, 2, 0])
    with torch.no_grad():
        maps = explain.gradcam(frozen, crops, targets, stage=-1)
    np.testing.assert_allclose(maps, explain.gradcam(model, crops, targets, stage=-1), atol=1e-6)
    assert not frozen.stages[-1]._forward_hooks


def test_smoothgrad_is_reproducible_and_raw(model, crops):
    targets = np.array([0, 1, 2, 0])
    maps = explain.smoothgrad(model, crops, targets, n_samples=5, seed=3, batch_size=3)
    assert maps.shape == (4, SIZE, SIZE) and (maps >= 0).all() and maps.max() > 0
    # Another batch size (passes mixing other crops' copies) and another position in the call.
    again = explain.smoothgrad(model, crops[3:], targets[3:], n_samples=5, seed=3, batch_size=7)
    first = explain.smoothgrad(model, crops[:1], targets[:1], n_samples=5, seed=3, batch_size=7)
    np.testing.assert_allclose(first[0], maps[0], rtol=1e-4, atol=1e-8)
    assert not np.allclose(again[0], maps[3])  # crop 3's own noise stream, not crop 0's
    with pytest.raises(ValueError, match="n_samples"):
        explain.smoothgrad(model, crops, targets, n_samples=0)


def test_smoothgrad_jitter_removes_the_stem_checkerboard(model, crops):
    """The stem's stride-2 convolution leaves a checkerboard in plain SmoothGrad maps."""
    targets = np.array([0, 1, 2, 0])
    plain = explain.smoothgrad(model, crops, targets, n_samples=8, jitter=False)
    jittered = explain.smoothgrad(model, crops, targets, n_samples=8)
    chance = 3 / (SIZE * SIZE - 1)
    assert np.median(explain.stride_power_share(plain)) > 20 * chance
    assert np.median(explain.stride_power_share(jittered)) < 3 * chance


def test_stride_power_share_finds_a_checkerboard():
    rng = np.random.default_rng(0)
    smooth = np.outer(np.hanning(SIZE), np.hanning(SIZE))[None]
    checker = np.indices((SIZE, SIZE)).sum(0) % 2
    share = explain.stride_power_share(np.concatenate([smooth, smooth + 0.1 * checker]))
    assert share[0] < 1e-6 and share[1] > 0.01
    noise = explain.stride_power_share(rng.random((20, SIZE, SIZE)))
    assert np.mean(noise) == pytest.approx(3 / (SIZE * SIZE - 1), rel=0.5)
    assert np.isnan(explain.stride_power_share(np.ones((1, SIZE, SIZE))))[0]
    with pytest.raises(ValueError, match="multiple"):
        explain.stride_power_share(np.zeros((1, 5, 5)))


def test_progress_bar_counts_cells(model, crops, capsys):
    targets = np.array([0, 1, 2, 0])
    explain.smoothgrad(model, crops, targets, n_samples=3, batch_size=5, progress=True)
    explain.gradcam(model, crops, targets, progress=True)
    err = capsys.readouterr().err
    assert "saliency smoothgrad" in err and "saliency gradcam" in err and "4/4" in err


def test_select_cells_keeps_the_most_confident_per_class():
    top = np.array([1, 0, 1, 1, 0, 2])
    confidence = np.array([0.5, 0.9, 0.8, 0.7, 0.95, 0.6])
    assert explain.select_cells(top, confidence, 2).tolist() == [4, 1, 2, 3, 5]
    assert explain.select_cells(top, confidence, None).tolist() == [4, 1, 2, 3, 0, 5]
    assert explain.select_cells(top, confidence, 0).tolist() == []


def test_contour_masks_and_mass_inside():
    angle = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    radius_px0 = 24.0  # 6 µm at 0.25 µm/px
    centre = np.array([[1000.0, 500.0]])
    contour = centre[:, None] + radius_px0 * np.stack([np.cos(angle), np.sin(angle)], 1)[None]
    mask = explain.contour_masks(contour, centre, fov_um=32, level0_mpp=0.25, size=SIZE)
    radius_crop = 6 / 32 * SIZE
    assert mask.sum() == pytest.approx(np.pi * radius_crop**2, rel=0.05)
    assert mask[0, SIZE // 2, SIZE // 2] and not mask[0, 0, 0]

    inside_only = np.where(mask, 1.0, 0.0)
    uniform = np.ones_like(inside_only)
    share = explain.saliency_share_inside(
        np.concatenate([inside_only, uniform, 0 * uniform]), np.repeat(mask, 3, axis=0)
    )
    assert share[0] == 1.0
    assert share[1] == pytest.approx(mask.mean())
    assert np.isnan(share[2])


PANEL_H = SIZE + mosaics.CAPTION_PX
PANEL_W = 2 * SIZE + 2 + mosaics.COLOUR_BAR_PX


def test_saliency_panel_shows_crop_map_scale_and_caption(crops):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    saliency = np.exp(-((yy - 20.0) ** 2 + (xx - 40.0) ** 2) / 50).astype(np.float32)
    panel = mosaics.saliency_panel(crops[0], saliency, 1234, 0.97)
    assert panel.shape == (PANEL_H, PANEL_W, 3) and panel.dtype == np.uint8
    np.testing.assert_array_equal(panel[:SIZE, :SIZE], crops[0])  # the plain crop
    heat = panel[:SIZE, SIZE + 2 : 2 * SIZE + 2]
    assert heat[20, 40].sum() > heat[60, 60].sum()  # bright where the map peaks
    np.testing.assert_array_equal(heat[0, 0], mosaics.heat_colours(np.zeros(1))[0])
    assert (panel[SIZE:, :SIZE] < 128).any()  # caption under the crop
    bar_x = 2 * SIZE + 4
    assert panel[0, bar_x].sum() > panel[SIZE - 1, bar_x].sum()  # colour bar, high on top
    labels = panel[:SIZE, bar_x + 8 :]
    assert (labels < 128).any()  # its low and high values are written
    # Each map on its own scale: a map 1000 times stronger renders the same crop and map...
    strong = mosaics.saliency_panel(crops[0], 1000 * saliency, 1234, 0.97)
    np.testing.assert_array_equal(strong[:SIZE, : 2 * SIZE + 2], panel[:SIZE, : 2 * SIZE + 2])
    # ...with other values beside its colour bar, and another caption for another cell.
    assert not np.array_equal(strong[:SIZE, bar_x + 8 :], labels)
    other = mosaics.saliency_panel(crops[0], saliency, 7, 0.5)
    assert not np.array_equal(other[SIZE:], panel[SIZE:])


def test_map_range_ignores_a_few_extreme_pixels():
    saliency = np.ones((SIZE, SIZE), np.float32)
    saliency[0, 0] = 1e6
    assert mosaics.map_range(saliency) == (0.0, 1.0)
    assert mosaics.map_range(np.zeros((4, 4))) == (0.0, 0.0)


def test_class_mosaics_tile_panels_by_class(crops):
    maps = np.zeros((4, SIZE, SIZE), np.float32)
    maps[1] = 10.0
    ids, confidence = np.array([10, 11, 12, 13]), np.array([0.9, 0.8, 0.7, 0.6])
    classes = np.array([0, 2, 2, 0])
    by_class = mosaics.class_mosaics(crops, maps, classes, ["A", "B", "C"], ids, confidence)
    assert list(by_class) == ["A", "C"]
    gap = 4
    assert by_class["A"].shape == (gap + PANEL_H + gap, gap + 2 * (PANEL_W + gap), 3)
    assert by_class["C"].dtype == np.uint8
    second = by_class["C"][gap : gap + PANEL_H, gap + PANEL_W + gap : gap + 2 * PANEL_W + gap]
    np.testing.assert_array_equal(second, mosaics.saliency_panel(crops[2], maps[2], 12, 0.7))
    one_column = mosaics.class_mosaics(
        crops, maps, classes, ["A", "B", "C"], ids, confidence, columns=1
    )
    assert one_column["A"].shape[0] == gap + 2 * (PANEL_H + gap)
    assert mosaics.class_mosaics(crops[:0], maps[:0], classes[:0], ["A"], ids[:0], ids[:0]) == {}
