"""Stain of May-Grünwald-Giemsa smears: optical density, each slide's stain, colour unmixing.

A pixel's optical density (relative to the slide's glass) is unmixed into three stains: the
purple of chromatin, the blue of basophilic cytoplasm and the counterstain of red cells (eosin
pink in most labs, lavender in some). Romanowsky stains differ between labs far more than H&E:
Raabin-WBC's nuclei are magenta and its red cells lavender-grey, BCCD's nuclei violet and its red
cells pink, a rapid stain's glass yellow. So the glass, chromatin and counterstain colours are
estimated per slide (:func:`estimate_stain`, a Macenko-style split of the stained pixels' optical
density into its two extreme directions) and only the cytoplasm blue, which too few pixels
show to estimate, is a fixed reference. Detection (:mod:`.detect`) and the smear-area finder
(:mod:`.regions`) both start from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "REFERENCE_STAIN",
    "StainModel",
    "block_density",
    "block_mean",
    "estimate_stain",
    "nuclear_stain",
    "optical_density",
]

FloatArray = NDArray[np.float64]
Vector = tuple[float, float, float]

#: Colours that one layer of each stain gives on white glass in the reference (May-Grünwald-
#: Giemsa) smear: chromatin, basophilic cytoplasm, red cell.
NUCLEUS_RGB = (120.0, 70.0, 150.0)
BASOPHILIC_RGB = (70.0, 100.0, 180.0)
RED_CELL_RGB = (222.0, 150.0, 155.0)
#: Red optical density above which a pixel is chromatin whatever its unmixing.
DENSE_RED_OD = 1.7
#: Pixels whose optical density (summed over channels, above the glass) reaches this are
#: stained; Macenko's 0.15 per channel.
STAINED_OD = 0.45
#: Share of the green-absorbing stained pixels, those least like red cells, whose median
#: direction is chromatin.
CHROMATIN_SHARE = 0.005
#: Factor between the chromatin and counterstain red-to-green ratios from which the ratio
#: alone parts them (each then lies a factor of at least 1.4 from the midpoint).
RATIO_SEPARATION = 2.0
#: Fewest stained pixels from which a stain is estimated.
MIN_STAINED_PIXELS = 500
#: Least angle (degrees) between estimated chromatin and counterstain directions that parts
#: them; closer, the two have collapsed into one.
MIN_STAIN_ANGLE_DEG = 5.0


def _od_of(rgb: Sequence[float]) -> FloatArray:
    return -np.log((np.asarray(rgb, dtype=np.float64) + 1.0) / 256.0)


def _unit(vector: ArrayLike) -> FloatArray:
    values = np.asarray(vector, dtype=np.float64)
    return values / np.linalg.norm(values)


def _vector(values: ArrayLike) -> Vector:
    x, y, z = np.asarray(values, dtype=np.float64)
    return (float(x), float(y), float(z))


def _angle_deg(a: ArrayLike, b: ArrayLike) -> float:
    return float(np.degrees(np.arccos(np.clip(_unit(a) @ _unit(b), -1.0, 1.0))))


@dataclass(frozen=True)
class StainModel:
    """The stains of one slide, as optical-density directions, and its glass.

    Attributes
    ----------
    nucleus, counterstain : tuple of float
        Unit optical-density vectors (red, green, blue) of chromatin and of red cells.
    cytoplasm : tuple of float
        Third unmixing direction (basophilic cytoplasm blue in the reference; what neither
        estimated stain explains on a slide).
    glass_od : tuple of float
        Optical density of the bare glass; subtracted before unmixing.
    red_cell_density : float
        A typical red cell's optical density above the glass, summed over channels: the median
        stained pixel's (red cells are most of a smear's stained area).
    red_cell_cosine : float
        The median stained pixel's cosine to the counterstain direction: how closely red cells
        follow it.
    estimated : bool
        Whether the directions were estimated from the slide (else the reference).
    problem : str
        Why the slide's own estimate was set aside for the reference directions, when it
        was: detection may then be wrong for this slide. Empty otherwise.
    """

    nucleus: Vector
    counterstain: Vector
    cytoplasm: Vector
    glass_od: Vector = (0.0, 0.0, 0.0)
    red_cell_density: float = float(_od_of(RED_CELL_RGB).sum())
    red_cell_cosine: float = 0.98
    estimated: bool = False
    problem: str = ""

    @cached_property
    def unmixing_affine(self) -> NDArray[np.float32]:
        """The row of the inverse stain matrix that gives the amount of chromatin, with the
        glass subtracted first: an affine map for ``cv2.transform``, shape (1, 4)."""
        stains = np.array([self.nucleus, self.cytoplasm, self.counterstain])
        row = np.linalg.inv(stains.T)[0]
        return np.array([[*row, -row @ np.asarray(self.glass_od)]], dtype=np.float32)

    @property
    def red_to_green(self) -> float:
        """Red-to-green optical-density ratio that parts chromatin from stacked red cells: the
        geometric mean of the two stains' ratios."""
        return float(np.sqrt(np.prod(self._red_to_green_ratios)))

    @property
    def red_to_green_parts(self) -> bool:
        """Whether the two stains' red-to-green ratios differ by at least
        :data:`RATIO_SEPARATION`, so the ratio alone tells stacked red cells from chromatin."""
        low, high = sorted(self._red_to_green_ratios)
        return high >= RATIO_SEPARATION * low

    @property
    def counterstain_is_redder(self) -> bool:
        """Whether red cells absorb more red light, relative to green, than chromatin does."""
        nucleus, counterstain = self._red_to_green_ratios
        return counterstain > nucleus

    @property
    def _red_to_green_ratios(self) -> tuple[float, float]:
        """Red-to-green optical-density ratio of chromatin and of the counterstain."""
        (nr, ng, _), (cr, cg, _) = self.nucleus, self.counterstain
        return nr / max(ng, 1e-6), cr / max(cg, 1e-6)

    def warnings(self) -> list[str]:
        """What a user should check because detection is likely wrong for this slide: its
        stain estimate collapsed and the reference directions stood in. Another lab's shade
        of the stain is not a warning; the estimate follows it."""
        if not self.problem:
            return []
        return [
            f"{self.problem}; the reference May-Grünwald-Giemsa stain was used instead, so "
            "check in QuPath that the outlined cells are white cells and none is missed"
        ]

    def as_dict(self) -> dict[str, object]:
        """Plain values for a store's provenance."""
        return {
            "nucleus_od": [round(v, 4) for v in self.nucleus],
            "counterstain_od": [round(v, 4) for v in self.counterstain],
            "glass_od": [round(v, 4) for v in self.glass_od],
            "red_cell_density": round(self.red_cell_density, 4),
            "red_cell_cosine": round(self.red_cell_cosine, 4),
            "estimated": self.estimated,
            "problem": self.problem,
        }


#: The reference May-Grünwald-Giemsa stain on white glass.
REFERENCE_STAIN = StainModel(
    nucleus=_vector(_unit(_od_of(NUCLEUS_RGB))),
    counterstain=_vector(_unit(_od_of(RED_CELL_RGB))),
    cytoplasm=_vector(_unit(_od_of(BASOPHILIC_RGB))),
)


def estimate_stain(od: NDArray[np.floating]) -> StainModel:
    """Estimate a slide's glass, chromatin and counterstain from optical densities.

    The glass is the median of the faintest 2 % of pixels. Above it, red cells are most of the
    stained area, so the counterstain is the median direction of the stained pixels (and the
    median stained pixel is a typical red cell). Chromatin is the median direction of the
    :data:`CHROMATIN_SHARE` of green-absorbing stained pixels with the most density across the
    counterstain; the third unmixing direction is what neither explains (in the spirit of
    Macenko et al., ISBI 2009, but robust to nuclei being a tiny share of a blood smear).

    Where nucleated cells crowd the sample (a marrow field) the median stained pixel is a
    nucleus, not a red cell, and the two directions collapse into one. Every Romanowsky
    chromatin absorbs green more, for its density, than the lab's counterstain does (violet
    to magenta against pink to lavender), so an estimate whose chromatin is not the greener
    of the two, or lies within :data:`MIN_STAIN_ANGLE_DEG` of it, has collapsed: the reference
    directions are returned with this slide's glass and the reason (``problem``), which the
    run reports. So are they with too few stained pixels to estimate from.

    Parameters
    ----------
    od : ndarray of float, shape (..., 3)
        Optical densities (:func:`optical_density`) of sample pixels of the slide.

    Returns
    -------
    StainModel
    """
    pixels = np.asarray(od, dtype=np.float64).reshape(-1, 3)
    total = pixels.sum(axis=1)
    faint = total <= np.quantile(total, 0.02)
    glass = np.median(pixels[faint], axis=0)
    above = np.clip(pixels - glass, 0.0, None)
    stained = above[above.sum(axis=1) >= STAINED_OD]

    def fallback(problem: str) -> StainModel:
        return dataclasses.replace(REFERENCE_STAIN, glass_od=_vector(glass), problem=problem)

    if len(stained) < MIN_STAINED_PIXELS:
        return fallback(f"{len(stained)} stained pixels, too few to learn the stain from")
    # Red cells are most of the stained area of any smear: their direction is the median one.
    directions = stained / np.linalg.norm(stained, axis=1, keepdims=True)
    counterstain = _unit(np.median(directions, axis=0))
    red_cell_density = float(np.median(stained.sum(axis=1)))
    red_cell_cosine = float(np.median(directions @ counterstain))
    # Chromatin is the densest stain unlike the red cells: the pixels with the most density
    # across the counterstain direction, however few (a blood smear's nuclei are well under
    # 1 % of its stained area). Every Romanowsky chromatin (violet to magenta: azure B-eosin)
    # absorbs green most, which yellow-brown precipitate and blue cytoplasm do not.
    across = np.linalg.norm(stained - np.outer(stained @ counterstain, counterstain), axis=1)
    greenest = stained.argmax(axis=1) == 1
    if not greenest.any():
        return fallback("no stained pixel absorbs green most, as chromatin does")
    chromatin = stained[greenest & (across >= np.quantile(across[greenest], 1.0 - CHROMATIN_SHARE))]
    # The median direction: a few dark specks of another colour cannot move it.
    nucleus = _unit(np.median(chromatin / np.linalg.norm(chromatin, axis=1, keepdims=True), axis=0))
    if _angle_deg(nucleus, counterstain) < MIN_STAIN_ANGLE_DEG or nucleus[1] <= counterstain[1]:
        return fallback(
            "the slide's chromatin and red-cell stain directions could not be told apart "
            f"({_angle_deg(nucleus, counterstain):.0f} degrees; nucleated cells crowd the sample)"
        )
    # Blue cytoplasm is too rare to estimate: the third direction is what neither explains.
    cytoplasm = _unit(np.cross(nucleus, counterstain))
    return StainModel(
        _vector(nucleus),
        _vector(counterstain),
        _vector(cytoplasm),
        _vector(glass),
        red_cell_density=red_cell_density,
        red_cell_cosine=red_cell_cosine,
        estimated=True,
    )


#: Optical density of each 8-bit value, as a lookup table.
_OD_LUT = -np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)
#: Step of the 16-bit fixed-point optical density in which blocks are averaged, about 1e-4.
_OD_STEP = np.float32(np.log(256.0) / np.iinfo(np.uint16).max)
_OD_LUT_FIXED = np.round(_OD_LUT / _OD_STEP).astype(np.uint16)


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


def nuclear_stain(
    rgb: NDArray[np.uint8], stain: StainModel = REFERENCE_STAIN
) -> NDArray[np.float32]:
    """Amount of nuclear (chromatin) stain per pixel, by colour unmixing.

    The optical density of each pixel above the glass is unmixed into three stains: chromatin,
    the blue of basophilic cytoplasm and the red cells' counterstain. Only the first is
    returned, so red cells and glass are near zero, the blue cytoplasm of a neighbouring cell
    does not join a nucleus, and the orange granules of eosinophils are strongly negative.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    stain : StainModel
        The slide's stain (:func:`estimate_stain`); the reference by default.

    Returns
    -------
    ndarray of float32, shape (H, W)
    """
    return unmix_nuclear(optical_density(rgb), stain)


def unmix_nuclear(
    od: NDArray[np.float32], stain: StainModel = REFERENCE_STAIN
) -> NDArray[np.float32]:
    """:func:`nuclear_stain` from the image's optical density (:func:`optical_density`)."""
    # One affine transform unmixes the density above the glass.
    result = cv2.transform(od, stain.unmixing_affine)
    red = cv2.extractChannel(od, 0) - np.float32(stain.glass_od[0])
    if stain.red_to_green_parts:
        # Where stacked red cells saturate green and blue, unmixing fails; their red-to-green
        # ratio still tells them from chromatin.
        green = cv2.extractChannel(od, 1) - np.float32(stain.glass_od[1])
        redder = red >= stain.red_to_green * green
        red_cell_like = redder if stain.counterstain_is_redder else ~redder
        np.multiply(result, ~((result > 0) & red_cell_like), out=result)
    # The darkest nuclei saturate green and blue, so unmixing leaves them hollow; no other
    # smear component absorbs as much red light.
    return np.maximum(result, red, out=result, where=red > DENSE_RED_OD)


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
