"""OME-Zarr (NGFF 0.5) images: valid by the NGFF models, and read back by ome-zarr-py."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models.v05.image import Image as NgffImage

from wsi_pipeline.results.ngff import pyramid, write_multiscale


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (700, 1100, 3), dtype=np.uint8)


def test_pyramid_halves_down_to_the_smallest_level(image):
    levels = pyramid(image)
    assert [lvl.shape for lvl in levels] == [
        (700, 1100, 3), (350, 550, 3), (175, 275, 3), (88, 138, 3)
    ]  # fmt: skip
    np.testing.assert_allclose(levels[1][0, 0], image[:2, :2].mean(axis=(0, 1)), atol=1)  # a mean
    assert len(pyramid(image[:100, :200])) == 1
    with pytest.raises(ValueError, match="uint8"):
        pyramid(image.astype(np.float32))


def test_written_image_is_valid_ngff_and_reads_back(image, tmp_path):
    root = zarr.open_group(tmp_path / "result.zarr", mode="w", zarr_format=3)
    write_multiscale(root, "images/overview", image, pixel_um=2.5)
    group = zarr.open_group(tmp_path / "result.zarr/images/overview", mode="r")
    NgffImage.from_zarr(group)  # raises on anything NGFF 0.5 does not allow

    (node, *_) = Reader(parse_url(tmp_path / "result.zarr/images/overview"))()
    data = [np.asarray(level) for level in node.data]
    assert np.array_equal(data[0].transpose(1, 2, 0), image)
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales == [[1.0, 2.5 * 2**k, 2.5 * 2**k] for k in range(len(data))]
    channels = group.attrs["ome"]["omero"]["channels"]
    assert [c["color"] for c in channels] == ["FF0000", "00FF00", "0000FF"]  # shown as RGB
