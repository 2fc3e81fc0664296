"""Stain of May-Grünwald-Giemsa smears: optical density and colour unmixing.

A pixel's optical density is unmixed into three stains: the purple of chromatin, the blue of
basophilic cytoplasm and the pink of red cells (eosin). Detection (:mod:`.detect`) and the
smear-area finder (:mod:`.regions`) both start from here.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = ["block_mean", "block_density", "nuclear_stain", "optical_density", "unmix_nuclear"]

FloatArray = NDArray[np.float64]

#: Colours that one layer of each stain gives on glass: chromatin, basophilic cytoplasm, red cell.
NUCLEUS_RGB = (120.0, 70.0, 150.0)
BASOPHILIC_RGB = (70.0, 100.0, 180.0)
RED_CELL_RGB = (222.0, 150.0, 155.0)
#: Least ratio of red to green optical density of chromatin (red cells: about 0.2).
PURPLE_RED_TO_GREEN = 0.35
#: Red optical density above which a pixel is chromatin whatever its unmixing.
DENSE_RED_OD = 1.7


def _unmixing_row() -> NDArray[np.float64]:
    """Row of the inverse stain matrix that gives the amount of nuclear stain."""
    stains = np.array([_od_of(NUCLEUS_RGB), _od_of(BASOPHILIC_RGB), _od_of(RED_CELL_RGB)])
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    return np.linalg.inv(stains.T)[0]


def _od_of(rgb: tuple[float, float, float]) -> FloatArray:
    return -np.log((np.asarray(rgb, dtype=np.float64) + 1.0) / 256.0)


#: Optical density of each 8-bit value, as a lookup table.
_OD_LUT = -np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)
#: Step of the 16-bit fixed-point optical density in which blocks are averaged, about 1e-4.
_OD_STEP = np.float32(np.log(256.0) / np.iinfo(np.uint16).max)
_OD_LUT_FIXED = np.round(_OD_LUT / _OD_STEP).astype(np.uint16)
_UNMIXING_ROW = _unmixing_row().astype(np.float32)[None, :]


def optical_density(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Optical density ``-log((value + 1) / 256)`` of every channel, shape (H, W, 3)."""
    return _look_up(_rgb(rgb), _OD_LUT)


def _look_up(image: NDArray[np.uint8], table: NDArray) -> NDArray:
    """``table[image]`` of a contiguous image, by OpenCV on a one-channel view of it: one table
    for every channel, and half the time of a three-channel lookup."""
    return cv2.LUT(image.reshape(image.shape[0], -1), table).reshape(image.shape)


def _rgb(image: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """A contiguous (H, W, 3) image, or ValueError."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    return np.ascontiguousarray(image)


def nuclear_stain(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Amount of nuclear (chromatin-purple) stain per pixel, by colour unmixing.

    The optical density of each pixel is unmixed into three stains: the purple of chromatin,
    the blue of basophilic cytoplasm and the pink of red cells (eosin). Only the first is
    returned, so red cells and glass are near zero, the blue cytoplasm of a neighbouring cell
    does not join a nucleus, and the orange granules of eosinophils are strongly negative.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)

    Returns
    -------
    ndarray of float32, shape (H, W)
    """
    return unmix_nuclear(optical_density(rgb))


def unmix_nuclear(od: NDArray[np.float32]) -> NDArray[np.float32]:
    """:func:`nuclear_stain` from the image's optical density (:func:`optical_density`)."""
    stain = cv2.transform(od, _UNMIXING_ROW)
    red, green = cv2.extractChannel(od, 0), cv2.extractChannel(od, 1)
    # Where stacked red cells saturate green and blue, unmixing fails; chromatin also absorbs
    # red strongly, red cells hardly at all.
    failed = (stain > 0) & (red < PURPLE_RED_TO_GREEN * green)
    np.multiply(stain, ~failed, out=stain)  # a masked copy of zeros takes four times as long
    # The darkest nuclei saturate green and blue, so unmixing leaves them hollow; no other
    # smear component absorbs as much red light.
    return np.maximum(stain, red, out=stain, where=red > DENSE_RED_OD)


def block_mean(image: NDArray, f: int) -> NDArray:
    """Mean over ``f`` x ``f`` blocks of an image (one or more channels; integer means are
    rounded), padding the far edges by repetition."""
    pad_y, pad_x = -image.shape[0] % f, -image.shape[1] % f
    if pad_y or pad_x:
        image = cv2.copyMakeBorder(image, 0, pad_y, 0, pad_x, cv2.BORDER_REPLICATE)
    # An integer shrink with area interpolation is exactly the block mean.
    size = (image.shape[1] // f, image.shape[0] // f)
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def block_density(rgb: NDArray[np.uint8], block: int) -> NDArray[np.float32]:
    """Optical density averaged over ``block`` x ``block`` blocks of whole pixels.

    The image is padded at its far edges by repetition so every pixel falls in a block.
    Averaging before unmixing costs a quarter of unmixing every pixel, and the unmixing itself is
    linear. Blocks are averaged in 16-bit fixed point (steps of about 1e-4), half the bytes of
    float32.
    """
    if block == 1:
        return optical_density(rgb)
    fixed = _look_up(_rgb(rgb), _OD_LUT_FIXED)
    return block_mean(fixed, block).astype(np.float32) * _OD_STEP
