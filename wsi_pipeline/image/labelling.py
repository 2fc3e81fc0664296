"""Operations on label images that detection and its outlines share: labelling a mask,
per-label reductions over the labelled pixels alone, linking nearby pieces, and star-shaped
outlines. Each works on whole label images at once, so no step loops over cells in Python.
"""

from __future__ import annotations

from typing import Any, cast

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from wsi_pipeline.core.schema import CONTOUR_VERTICES

__all__ = [
    "binary_closing",
    "circularity",
    "drop_small",
    "fill_holes",
    "label_centroids",
    "label_mask",
    "label_maximum",
    "labelled_pixels",
    "link_near",
    "near_edge",
    "resample_ring",
    "star_outlines",
]

FloatArray = NDArray[np.float64]


def label_mask(mask: NDArray[np.bool_]) -> tuple[NDArray[np.int32], int]:
    """4-connected components of ``mask`` numbered 1..N in raster order, and N (as
    ``ndi.label``), by OpenCV."""
    count, labels = cv2.connectedComponents(
        np.ascontiguousarray(mask).view(np.uint8), connectivity=4, ltype=cv2.CV_32S
    )
    return cast(NDArray[np.int32], labels), count - 1  # ltype CV_32S; cv2's stubs lack dtypes


def labelled_pixels(
    labels: NDArray[np.integer], mask: NDArray[np.bool_]
) -> tuple[NDArray[np.intp], NDArray[np.integer]]:
    """Flat indices of the labelled pixels, given by the ``mask`` that was labelled, and their
    labels. Cells cover a small part of a tile, so per-label reductions run over these pixels
    alone (and finding them in a boolean mask takes a tenth of the time)."""
    flat = np.flatnonzero(mask)
    return flat, labels.ravel()[flat]


def drop_small(mask: NDArray[np.bool_], max_size: int) -> NDArray[np.bool_]:
    """``mask`` without its 4-connected components of ``max_size`` pixels or fewer."""
    flat, which = labelled_pixels(label_mask(mask)[0], mask)
    kept = np.zeros(mask.shape, dtype=bool)
    kept.ravel()[flat[(np.bincount(which) > max_size)[which]]] = True
    return kept


def binary_closing(mask: NDArray[np.bool_], disk: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """Binary closing with nothing outside the image (as ``ndi.binary_closing``), by OpenCV."""
    border: dict[str, Any] = {"borderType": cv2.BORDER_CONSTANT, "borderValue": 0}
    dilated = cv2.dilate(mask.view(np.uint8), disk, **border)
    return cv2.erode(dilated, disk, **border).view(bool)


def fill_holes(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """``mask`` with every background region that does not reach the image edge filled."""
    # Flood the background 4-connected to a frame of background around the image.
    framed = cv2.copyMakeBorder(mask.view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(framed, None, (0, 0), 2, flags=4)
    return framed[1:-1, 1:-1] != 2


def label_centroids(
    flat: NDArray[np.intp], which: NDArray[np.integer], width: int, n: int
) -> FloatArray:
    """Centre (row, col) of each label 1..n, as an (n, 2) array, from the labelled pixels
    (:func:`labelled_pixels`) of an image ``width`` pixels wide."""
    rows, cols = np.divmod(flat, width)
    size = np.bincount(which, minlength=n + 1)[1:]
    return np.column_stack(
        [np.bincount(which, weights=k, minlength=n + 1)[1:] / size for k in (rows, cols)]
    )


def label_maximum(
    values: NDArray, flat: NDArray[np.intp], which: NDArray[np.integer], n: int
) -> FloatArray:
    """Largest value under each label 1..n, from the labelled pixels (:func:`labelled_pixels`) only:
    ``ndi.maximum`` sorts its input."""
    return np.asarray(ndi.maximum(values.ravel()[flat], which, np.arange(1, n + 1)))


def link_near(centres: FloatArray, reach_px: float) -> NDArray[np.intp]:
    """Group number (from 1) of each piece given by its centre (:func:`label_centroids`): pieces
    whose centres lie within ``reach_px`` of each other, directly or through a chain, share a
    group. Groups are numbered in the order of their first piece.
    """
    first, second = cKDTree(centres).query_pairs(reach_px, output_type="ndarray").T
    # Every piece takes the lowest index of its group: each round passes the lower of two
    # linked indices to both and follows each piece's index to that piece's own. A few rounds
    # of a dozen pairs cost a fraction of building a sparse graph.
    lowest = np.arange(len(centres))
    while len(first) and not np.array_equal(lowest[first], lowest[second]):
        low = np.minimum(lowest[first], lowest[second])
        np.minimum.at(lowest, first, low)
        np.minimum.at(lowest, second, low)
        lowest = lowest[lowest]
    return np.unique(lowest, return_inverse=True)[1] + 1


def near_edge(labels: NDArray[np.int32], n: int, band: int) -> NDArray[np.bool_]:
    """Which of the labels 1..n reach within ``band`` pixels of the image's edge. The closing
    that groups lobes erodes what touches the edge, so a cut nucleus stops short of it."""
    edges = [labels[:band], labels[-band:], labels[:, :band], labels[:, -band:]]
    near = np.zeros(n + 1, dtype=bool)
    near[np.concatenate([e.ravel() for e in edges])] = True
    return near[1:]


def star_outlines(labels: NDArray[np.int32], centroids: FloatArray, reach: float) -> FloatArray:
    """Star-shaped outline of each labelled cell: the farthest pixel of the cell along
    ``CONTOUR_VERTICES`` rays from its centroid, as (N, CONTOUR_VERTICES, 2) (row, col).
    """
    angle = 2 * np.pi * np.arange(CONTOUR_VERTICES) / CONTOUR_VERTICES
    steps = np.arange(0.0, reach + 1.0, 0.5)
    direction = np.column_stack([-np.sin(angle), np.cos(angle)])  # (V, 2) as (row, col)
    ray = direction[:, None, :] * steps[:, None]  # (V, S, 2)
    height, width = labels.shape
    rows = np.rint(centroids[:, 0, None, None] + ray[None, ..., 0]).astype(np.int32)
    cols = np.rint(centroids[:, 1, None, None] + ray[None, ..., 1]).astype(np.int32)
    inside_image = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    flat = np.where(inside_image, rows * width + cols, 0)
    own = np.arange(1, len(centroids) + 1, dtype=labels.dtype)[:, None, None]
    inside = inside_image & (labels.ravel()[flat] == own)
    # Index of the last step inside the cell; one half-step further is its edge.
    last = len(steps) - 1 - np.argmax(inside[..., ::-1], axis=-1)
    radius = np.where(inside.any(axis=-1), steps[last] + 0.5, 0.5)
    return centroids[:, None, :] + direction[None] * radius[..., None]


def circularity(outline: FloatArray, area_px: NDArray[np.integer]) -> FloatArray:
    """``4 pi area / perimeter**2`` of closed outlines (N, V, 2), at most 1."""
    closed = np.concatenate([outline, outline[:, :1]], axis=1)
    perimeter = np.hypot(*np.diff(closed, axis=1).transpose(2, 0, 1)).sum(axis=1)
    return np.minimum(1.0, 4 * np.pi * area_px / np.maximum(perimeter, 1e-9) ** 2)


def resample_ring(ring: NDArray[np.floating], n: int = CONTOUR_VERTICES) -> NDArray[np.float32]:
    """Resample a closed polygon to ``n`` vertices evenly spaced along its perimeter.

    Parameters
    ----------
    ring : ndarray of float, shape (K, 2)
        Polygon vertices in order; a repeated closing vertex is allowed.
    n : int
        Number of output vertices.

    Returns
    -------
    ndarray of float32, shape (n, 2)
    """
    ring = np.asarray(ring, dtype=np.float64)
    closed = np.vstack([ring, ring[:1]])
    step = np.hypot(*np.diff(closed, axis=0).T)
    length = np.concatenate([[0.0], np.cumsum(step)])
    if length[-1] == 0:
        return np.repeat(ring[:1], n, axis=0).astype(np.float32)
    at = np.arange(n) * (length[-1] / n)
    return np.column_stack([np.interp(at, length, closed[:, k]) for k in range(2)]).astype(
        np.float32
    )
