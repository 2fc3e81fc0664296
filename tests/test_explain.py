"""Saliency: real forward/backward passes through a small, randomly initialised timm CoAtNet."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from wsi_pipeline.model import explain

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
    assert explain.gradcam_layer(model) is model.stages[-1]
    out = model.stages[-1](model.stages[:-1](model.stem(torch.zeros(1, 3, SIZE, SIZE))))
    assert out.ndim == 4 and out.shape[-1] == SIZE // 32  # NCHW: no reshape transform needed
    with pytest.raises(TypeError, match="CoAtNet"):
        explain.gradcam_layer(torch.nn.Linear(2, 2))


def test_smoothgrad_is_reproducible_and_raw(model, crops):
    targets = np.array([0, 1, 2, 0])
    maps = explain.smoothgrad(model, crops, targets, n_samples=2, seed=3)
    assert maps.shape == (4, SIZE, SIZE) and (maps >= 0).all() and maps.max() > 0
    again = explain.smoothgrad(model, crops[:1], targets[:1], n_samples=2, seed=3)
    np.testing.assert_allclose(again[0], maps[0], rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="n_samples"):
        explain.smoothgrad(model, crops, targets, n_samples=0)


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


def test_class_mosaics_use_one_scale(crops):
    maps = np.zeros((4, SIZE, SIZE), np.float32)
    maps[1] = 10.0  # one hot map; the others stay cold
    mosaics = explain.class_mosaics(crops, maps, np.array([0, 2, 2, 0]), ["A", "B", "C"], columns=8)
    assert list(mosaics) == ["A", "C"]
    assert mosaics["A"].shape == (2 + SIZE + 2, 2 + 2 * (SIZE + 2), 3)
    assert mosaics["C"].dtype == np.uint8
    cold = mosaics["C"][2 : 2 + SIZE, 2 + SIZE + 2 : 2 + 2 * SIZE + 2]
    np.testing.assert_array_equal(cold, crops[2])  # zero saliency leaves the crop untouched
    hot = mosaics["C"][2 : 2 + SIZE, 2 : 2 + SIZE]
    assert not np.array_equal(hot, crops[1])
