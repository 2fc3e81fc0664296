"""Where to count: the smear and its countable (monolayer) parts, from a low-resolution thumbnail.

A wedge smear has glass margins, a thick end where red cells pile up, a monolayer where they
just touch (where a haematologist counts) and a feathered, sparse end. Otsu on a tissue mask
does not tell these apart, so the features here follow the Beer-Lambert optics of a stained
smear: the total optical density against the slide's own glass colour says whether a pixel
holds stain at all (coverage), and the density relative to that of one red-cell layer says how
many layers are stacked (thickness).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from wsi_pipeline.image.stain import optical_density
from wsi_pipeline.image.tiles import Tile

__all__ = ["CLASSES", "RegionMap", "RegionParams", "score_regions"]

#: Countability classes, from least to most material.
CLASSES = ("empty", "sparse", "monolayer", "thick")


@dataclass(frozen=True)
class RegionParams:
    """Thresholds of :func:`score_regions`.

    Attributes
    ----------
    stain_od : float
        Total optical density above glass that marks a stained pixel.
    empty_coverage, sparse_coverage : float
        Below these stained fractions an area is empty or sparse.
    thick_layers : float
        Mean density, in red-cell layers, above which an area is too thick.
    """

    stain_od: float = 0.15
    empty_coverage: float = 0.05
    sparse_coverage: float = 0.35
    thick_layers: float = 1.25


@dataclass
class RegionMap:
    """Smear mask and countability features at thumbnail resolution.

    Attributes
    ----------
    mask : ndarray of bool, shape (H, W)
        Stained (smear) pixels.
    layers : ndarray of float32, shape (H, W)
        Optical density in units of one red-cell layer.
    mpp : float
        Microns per pixel of the thumbnail.
    params : RegionParams
    """

    mask: NDArray[np.bool_]
    layers: NDArray[np.float32]
    mpp: float
    params: RegionParams

    def classify(self, tile: Tile) -> tuple[str, float]:
        """Countability class and monolayer score of one tile's core.

        The score is the stained fraction, discounted by stacking beyond one layer: 1 for a
        perfect monolayer, falling towards 0 for glass or thick smear.
        """
        scale = tile.level0_mpp / self.mpp
        rows = slice(
            int(tile.core_y0 * scale), max(int(tile.core_y0 * scale) + 1, int(tile.core_y1 * scale))
        )
        cols = slice(
            int(tile.core_x0 * scale), max(int(tile.core_x0 * scale) + 1, int(tile.core_x1 * scale))
        )
        return self._classify_block(self.mask[rows, cols], self.layers[rows, cols])

    def _classify_block(self, mask: NDArray[np.bool_], layers: NDArray) -> tuple[str, float]:
        if mask.size == 0:
            return "empty", 0.0
        coverage = float(mask.mean())
        thickness = float(layers[mask].mean()) if mask.any() else 0.0
        score = coverage / max(1.0, thickness)
        p = self.params
        if coverage < p.empty_coverage:
            return "empty", score
        if thickness > p.thick_layers:
            return "thick", score
        if coverage < p.sparse_coverage:
            return "sparse", score
        return "monolayer", score

    def select(self, tiles: list[Tile], classes: tuple[str, ...] = ("monolayer",)) -> list[Tile]:
        """Tiles whose class is in ``classes`` (pass :data:`CLASSES` to count everywhere)."""
        return [tile for tile in tiles if self.classify(tile)[0] in classes]


_CHANNEL_SUM = np.ones((1, 3), dtype=np.float32)  # cv2.transform row adding the three channels


def _glass_od(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Total optical density against the slide's glass, taken as its brightest pixels."""
    total = cv2.transform(optical_density(rgb), _CHANNEL_SUM)
    glass = np.percentile(total, 1.0)
    return np.maximum(total - glass, 0.0)


def score_regions(
    thumbnail: NDArray[np.uint8], mpp: float, params: RegionParams = RegionParams()
) -> RegionMap:
    """Smear mask and countability features of a whole slide.

    Parameters
    ----------
    thumbnail : ndarray of uint8, shape (H, W, 3)
        The whole slide, e.g. ``slide.thumbnail(4.0)``.
    mpp : float
        Microns per pixel of the thumbnail.
    params : RegionParams

    Returns
    -------
    RegionMap
    """
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB thumbnail, got shape {thumbnail.shape}")
    od = _glass_od(thumbnail)
    mask = ndi.binary_opening(od > params.stain_od)
    # One red-cell layer: the typical density of stained pixels, which are mostly monolayer.
    single = float(np.median(od[mask])) if mask.any() else 1.0
    return RegionMap(mask=mask, layers=(od / single).astype(np.float32), mpp=mpp, params=params)
