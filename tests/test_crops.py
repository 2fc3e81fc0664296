"""Fixed-field-of-view crops from arrays and from slides."""

from __future__ import annotations

import numpy as np

from wsi_pipeline.image.crops import crop_cells, crop_from_array
from wsi_pipeline.image.slide import open_slide
from wsi_pipeline.synth.smear import write_synthetic_slide


def test_crop_is_centred_and_resampled():
    rgb = np.zeros((200, 300, 3), dtype=np.uint8)
    rgb[100, 150] = 255  # one bright pixel at the centre
    crops = crop_from_array(rgb, 0.5, [(150, 100), (0, 0)], fov_um=16.0, size_px=32)
    assert crops.shape == (2, 32, 32, 3) and crops.dtype == np.uint8
    bright = np.unravel_index(np.argmax(crops[0, ..., 0]), (32, 32))
    assert abs(bright[0] - 15.5) <= 1 and abs(bright[1] - 15.5) <= 1
    assert np.all(crops[1, :10, :10] == 255)  # outside the image: white glass


def test_slide_crops_match_tile_crops(tmp_path):
    csv = write_synthetic_slide(tmp_path / "s.svs", size=(1536, 1024), seed=5)
    rows = np.genfromtxt(csv, delimiter=",", names=True, dtype=None, encoding="utf-8")
    centres = np.column_stack([rows["x"], rows["y"]])[:4].astype(float)
    with open_slide(tmp_path / "s.svs") as slide:
        from_slide = crop_cells(slide, centres, fov_um=32.0, size_px=64)
        tile = slide.read_region((0, 0), (768, 512), 0.5)
    from_tile = crop_from_array(tile, 0.5, centres, (0, 0), 0.25, fov_um=32.0, size_px=64)
    inner = slice(8, -8)  # tile crops near the slide border are padded differently
    difference = np.abs(from_slide[:, inner, inner].astype(int) - from_tile[:, inner, inner])
    assert np.median(difference) <= 3
