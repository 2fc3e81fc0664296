"""Tile grid over a slide, with the ownership rule that counts every cell exactly once.

Tiles are laid out on a regular grid in level-0 pixels and overlap by ``overlap_um``. The *core*
of a tile is the tile minus half the overlap on each side; cores of neighbouring tiles meet edge
to edge, and the cores of tiles on the slide border extend to that border. The cores therefore
partition the slide: a cell belongs to the one tile whose core holds its centre. With an overlap
of at least one maximal cell diameter, every cell whose centre lies in a core is also wholly
inside that tile, so it is seen in full where it is counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from skimage import measure

__all__ = ["Tile", "owning_tile", "plan_tiles", "region_rings"]


@dataclass(frozen=True)
class Tile:
    """One tile of the grid.

    Attributes
    ----------
    id : int
        Row-major index of the tile in the grid.
    row, col : int
        Grid position.
    x0, y0, x1, y1 : int
        Level-0 bounds of the pixels to read, half-open and clipped to the slide.
    core_x0, core_y0, core_x1, core_y1 : int
        Level-0 bounds of the core, half-open.
    mpp : float
        Microns per pixel at which the tile is read.
    level0_mpp : float
        Microns per pixel of level 0 of the slide.
    """

    id: int
    row: int
    col: int
    x0: int
    y0: int
    x1: int
    y1: int
    core_x0: int
    core_y0: int
    core_x1: int
    core_y1: int
    mpp: float
    level0_mpp: float

    @property
    def origin(self) -> tuple[int, int]:
        """Level-0 top-left corner ``(x0, y0)``."""
        return self.x0, self.y0

    @property
    def read_size(self) -> tuple[int, int]:
        """Output size ``(w, h)`` in pixels at the tile's ``mpp`` (for ``Slide.read_region``)."""
        scale = self.level0_mpp / self.mpp
        return (
            max(1, round((self.x1 - self.x0) * scale)),
            max(1, round((self.y1 - self.y0) * scale)),
        )

    def owns(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.bool_]:
        """Whether level-0 point(s) ``(x, y)`` fall in this tile's core.

        Parameters
        ----------
        x, y : array_like
            Level-0 coordinates (scalars or arrays of one shape).

        Returns
        -------
        numpy.ndarray of bool
            True where the point belongs to this tile.
        """
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        return (x >= self.core_x0) & (x < self.core_x1) & (y >= self.core_y0) & (y < self.core_y1)


def _axis_starts(length: int, size: int, stride: int) -> list[int]:
    """Start offsets of tiles along one axis so the tiles cover ``[0, length)``."""
    overlap = size - stride
    count = max(1, math.ceil((length - overlap) / stride))
    return [i * stride for i in range(count)]


def _axis_cores(starts: list[int], length: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Core interval of each tile along one axis; the first and last reach the slide border."""
    half = (size - stride) // 2
    cores = [(start + half, start + half + stride) for start in starts]
    cores[0] = (0, cores[0][1])
    cores[-1] = (cores[-1][0], length)
    return cores


def plan_tiles(
    slide_size: tuple[int, int],
    level0_mpp: float,
    tile_mpp: float,
    tile_size: int = 1024,
    overlap_um: float = 32.0,
) -> list[Tile]:
    """Lay out overlapping tiles over a whole slide.

    Parameters
    ----------
    slide_size : tuple of int
        Level-0 size ``(width, height)`` of the slide.
    level0_mpp : float
        Microns per pixel of level 0.
    tile_mpp : float
        Microns per pixel at which tiles are read (the classifier's resolution).
    tile_size : int
        Tile side in pixels at ``tile_mpp``.
    overlap_um : float
        Overlap between neighbouring tiles in µm; use at least the largest cell diameter.

    Returns
    -------
    list of Tile
        Row-major tiles; their cores partition the slide.

    Raises
    ------
    ValueError
        If a size is not positive or the overlap leaves no core.
    """
    width, height = slide_size
    if width <= 0 or height <= 0:
        raise ValueError(f"slide size must be positive, got {slide_size}")
    if level0_mpp <= 0 or tile_mpp <= 0:
        raise ValueError(f"microns per pixel must be positive, got {level0_mpp} and {tile_mpp}")
    size = round(tile_size * tile_mpp / level0_mpp)
    overlap = 2 * math.ceil(overlap_um / level0_mpp / 2)  # even, so the core is centred
    stride = size - overlap
    if overlap < 0 or stride <= 0:
        raise ValueError(
            f"overlap of {overlap_um} µm leaves no core in a {tile_size} px tile"
            f" at {tile_mpp} µm/px"
        )
    xs, ys = _axis_starts(width, size, stride), _axis_starts(height, size, stride)
    x_cores = _axis_cores(xs, width, size, stride)
    y_cores = _axis_cores(ys, height, size, stride)
    return [
        Tile(
            id=row * len(xs) + col,
            row=row,
            col=col,
            x0=x,
            y0=y,
            x1=min(x + size, width),
            y1=min(y + size, height),
            core_x0=x_cores[col][0],
            core_y0=y_cores[row][0],
            core_x1=x_cores[col][1],
            core_y1=y_cores[row][1],
            mpp=tile_mpp,
            level0_mpp=level0_mpp,
        )
        for row, y in enumerate(ys)
        for col, x in enumerate(xs)
    ]


def owning_tile(tiles: list[Tile], x: ArrayLike, y: ArrayLike) -> NDArray[np.int64]:
    """Id of the tile whose core holds each level-0 point, or -1 outside the slide.

    Parameters
    ----------
    tiles : list of Tile
        A grid from :func:`plan_tiles`.
    x, y : array_like
        Level-0 coordinates.

    Returns
    -------
    numpy.ndarray of int64
        Tile ids, same shape as ``x``.
    """
    x = np.asarray(x, dtype=float)
    ids = np.full(x.shape, -1, dtype=np.int64)
    for tile in tiles:
        ids[tile.owns(x, y)] = tile.id
    return ids


def region_rings(tiles: list[Tile], shape: tuple[int, int], scale: float) -> list[NDArray]:
    """Outer rings (level-0 px) of the union of tile cores, traced on the thumbnail grid."""
    mask = np.zeros((shape[0] + 2, shape[1] + 2), dtype=bool)
    for t in tiles:
        rows = slice(1 + round(t.core_y0 * scale), 1 + round(t.core_y1 * scale))
        cols = slice(1 + round(t.core_x0 * scale), 1 + round(t.core_x1 * scale))
        mask[rows, cols] = True
    rings = measure.find_contours(mask.astype(np.float32), 0.5)
    # find_contours gives (row, col) on the padded grid; outer rings only, to level-0 (x, y)
    return [
        (ring[:, ::-1] - 0.5) / scale
        for ring in rings
        if _signed_area(ring) > 0  # counter-clockwise in (row, col): an outer boundary
    ]


def _signed_area(ring: NDArray) -> float:
    y, x = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
