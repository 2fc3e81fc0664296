"""Fixed-field-of-view crops centred on cells, resampled to the classifier's input size."""

from __future__ import annotations

from typing import cast

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

from wsi_pipeline.image.slide import Slide

__all__ = ["crop_cells", "crop_from_array"]


def crop_from_array(
    rgb: NDArray[np.uint8],
    mpp: float,
    centres: ArrayLike,
    origin: tuple[float, float] = (0.0, 0.0),
    level0_mpp: float | None = None,
    fov_um: float = 32.0,
    size_px: int = 96,
) -> NDArray[np.uint8]:
    """Crop cells out of an image already in memory (the pipeline's hot path).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
        Image read at ``mpp``, e.g. a tile.
    mpp : float
        Microns per pixel of ``rgb``.
    centres : array_like, shape (N, 2)
        Cell centres ``(x, y)`` in level-0 pixels.
    origin : tuple of float
        Level-0 position of the image's top-left corner.
    level0_mpp : float, optional
        Microns per pixel of level 0; defaults to ``mpp``.
    fov_um : float
        Side of the square field of view in µm.
    size_px : int
        Side of the output crops in pixels.

    Returns
    -------
    ndarray of uint8, shape (N, size_px, size_px, 3)
        Bilinear resamples; parts outside the image are white (glass).
    """
    centres = np.asarray(centres, dtype=float).reshape(-1, 2)
    n = len(centres)
    if n == 0:
        return np.empty((0, size_px, size_px, 3), dtype=np.uint8)
    to_image = (level0_mpp or mpp) / mpp  # image pixels per level-0 pixel
    step = fov_um / mpp / size_px  # image pixels per output pixel
    offsets = (np.arange(size_px) + 0.5 - size_px / 2) * step
    # Continuous image coordinates of the output pixel centres (pixel i has centre i); the
    # crops are stacked into one tall map so that OpenCV resamples them all in one call.
    cols = ((centres[:, 0] - origin[0]) * to_image)[:, None] + offsets
    rows = ((centres[:, 1] - origin[1]) * to_image)[:, None] + offsets
    map_x = np.repeat(cols.astype(np.float32), size_px, axis=0)
    map_y = np.repeat(rows.astype(np.float32).reshape(-1, 1), size_px, axis=1)
    crops = cv2.remap(
        np.ascontiguousarray(rgb),
        map_x,
        map_y,
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(255, 255, 255),
    )
    # cv2's stubs do not track dtypes: remap of uint8 is uint8.
    return cast(NDArray[np.uint8], crops.reshape(n, size_px, size_px, 3))


def crop_cells(
    slide: Slide,
    centres: ArrayLike,
    fov_um: float = 32.0,
    size_px: int = 96,
) -> NDArray[np.uint8]:
    """Crop cells from a slide, reading only the field of view around each one.

    Parameters
    ----------
    slide : Slide
        An open slide with a known microns per pixel.
    centres : array_like, shape (N, 2)
        Cell centres ``(x, y)`` in level-0 pixels.
    fov_um, size_px : float, int
        As in :func:`crop_from_array`.

    Returns
    -------
    ndarray of uint8, shape (N, size_px, size_px, 3)
    """
    centres = np.asarray(centres, dtype=float).reshape(-1, 2)
    level0_mpp = slide.mpp
    read_mpp = fov_um / size_px
    margin = 2  # read pixels beyond the field of view for interpolation at the border
    side = size_px + 2 * margin
    half_level0 = side / 2 * read_mpp / level0_mpp
    crops = []
    for x, y in centres:
        origin = (round(x - half_level0), round(y - half_level0))
        region = slide.read_region(origin, (side, side), read_mpp)
        crops.append(
            crop_from_array(region, read_mpp, [(x, y)], origin, level0_mpp, fov_um, size_px)
        )
    return np.concatenate(crops) if crops else np.empty((0, size_px, size_px, 3), np.uint8)
