"""Whole-cell segmentation: from each detected nucleus out to its cell membrane.

Pale cytoplasm has the colour and density of the red cells it touches (both are eosin-pink or
lilac, and a neutrophil's cytoplasm is as dense as a red cell's rim), so colour alone cannot
draw a white cell's boundary. A membrane is an edge, though: a marker-controlled watershed
(OpenCV's, which floods by the largest colour difference between neighbours) grows each nucleus
out to it, against markers of what is certainly not the cell:

- glass, fainter than half a red cell's typical density;
- red cells' cores, pixels whose whole neighbourhood is at least half as dense as the slide's
  typical red cell and as close to the counterstain, away from every nucleus;
- everything farther than ``cytoplasm_um`` from the nucleus.

Touching white cells meet where their floods meet; a leak through a narrow gap into a
neighbouring red cell is opened off. Everything runs at the detector's working resolution, on
its block-averaged optical density (:mod:`.detect`), in one window per group of nuclei within
reach of each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from wsi_pipeline.image.stain import StainModel

__all__ = ["SegmentParams", "label_boxes", "segment_cells"]

#: Optical density spanned by the 8 bits of the image the watershed floods.
OD_SPAN = 2.0


@dataclass(frozen=True)
class SegmentParams:
    """Parameters of :func:`segment_cells`; sizes in µm.

    Attributes
    ----------
    cytoplasm_um : float
        Widest rim of cytoplasm around a nucleus (a monocyte's or plasma cell's reaches about
        6 µm on one side).
    red_core_um : float
        Side of the neighbourhood over which a red cell's core must be uniformly dense.
    nucleus_margin_um : float
        No red-cell marker lies closer than this to a nucleus (granular cytoplasm may look
        like a red cell in spots).
    glass_share : float
        Glass is fainter than this share of a red cell's typical density.
    neck_um : float
        Gaps narrower than this between a cell and what it leaked into are cut.
    """

    cytoplasm_um: float = 7.0
    red_core_um: float = 1.2
    nucleus_margin_um: float = 1.5
    glass_share: float = 0.5
    neck_um: float = 2.5


def segment_cells(
    od: NDArray[np.float32],
    stain: StainModel,
    nuclei: NDArray[np.int32],
    px_um: float,
    params: SegmentParams = SegmentParams(),
) -> NDArray[np.int32]:
    """Grow each labelled nucleus out to its cell's boundary.

    Parameters
    ----------
    od : ndarray of float32, shape (H, W, 3)
        Optical density of the image (block-averaged to the working resolution).
    stain : StainModel
        The slide's stain: its glass and counterstain.
    nuclei : ndarray of int32, shape (H, W)
        Nuclear regions labelled 1..N, 0 elsewhere.
    px_um : float
        Microns per pixel of ``od`` and ``nuclei``.
    params : SegmentParams

    Returns
    -------
    ndarray of int32, shape (H, W)
        Cell ``k`` is labelled ``k`` and holds nucleus ``k``; 0 is background.
    """
    cells = np.zeros_like(nuclei)
    n = int(nuclei.max(initial=0))
    if n == 0:
        return cells
    reach = int(np.ceil(params.cytoplasm_um / px_um)) + max(1, round(params.red_core_um / px_um))
    height, width = nuclei.shape
    group_of = np.zeros(n + 1, dtype=np.int32)  # the window group each nucleus belongs to
    for g, (labels, (y0, x0, y1, x1)) in enumerate(_windows(nuclei, n, reach), start=1):
        window = np.s_[max(0, y0) : min(height, y1), max(0, x0) : min(width, x1)]
        grown = _grow(od[window], stain, nuclei[window], px_um, params)
        group_of[labels] = g
        own = group_of[grown] == g
        cells[window][own] = grown[own]
    return cells


def label_boxes(
    flat: NDArray[np.intp], which: NDArray[np.integer], width: int, n: int
) -> NDArray[np.int64]:
    """Box ``(y0, x0, y1, x1)``, half-open, of each label 1..n (each must label a pixel), from
    the flat indices of the labelled pixels in an image ``width`` pixels wide and their labels.
    A pass over those pixels alone, not over the image as ``ndi.find_objects``."""
    order = np.argsort(which, kind="stable")
    rows, cols = np.divmod(flat[order], width)
    starts = np.searchsorted(which[order], np.arange(1, n + 1))
    return np.column_stack(
        [
            np.minimum.reduceat(rows, starts),
            np.minimum.reduceat(cols, starts),
            np.maximum.reduceat(rows, starts) + 1,
            np.maximum.reduceat(cols, starts) + 1,
        ]
    ).astype(np.int64)


def _windows(
    nuclei: NDArray[np.int32], n: int, reach: int
) -> list[tuple[NDArray[np.int32], tuple[int, int, int, int]]]:
    """Groups of nuclei whose boxes, widened by ``reach`` pixels, overlap: each group's labels
    and the box ``(y0, x0, y1, x1)`` around all of them. Cells only compete with the nuclei
    they can reach, so each group is grown in its own window: the work follows the cells,
    not the tile."""
    flat = np.flatnonzero(nuclei)
    boxes = label_boxes(flat, nuclei.ravel()[flat], nuclei.shape[1], n)
    boxes += np.array([-reach, -reach, reach, reach])
    overlap = np.all(
        (boxes[:, None, :2] < boxes[None, :, 2:]) & (boxes[None, :, :2] < boxes[:, None, 2:]),
        axis=-1,
    )
    count, group = connected_components(csr_matrix(overlap), directed=False)
    windows = []
    for g in range(count):
        members = np.flatnonzero(group == g)
        box = (*boxes[members, :2].min(axis=0), *boxes[members, 2:].max(axis=0))
        windows.append(((members + 1).astype(np.int32), tuple(int(v) for v in box)))
    return windows  # type: ignore[return-value]


def _grow(
    od: NDArray[np.float32],
    stain: StainModel,
    nuclei: NDArray[np.int32],
    px_um: float,
    params: SegmentParams,
) -> NDArray[np.int32]:
    """:func:`segment_cells` in one window."""
    n = int(nuclei.max())
    # Densities above the glass, by one affine transform of the optical density.
    glass = np.asarray(stain.glass_od, dtype=np.float32)
    above = cv2.transform(od, np.hstack([np.eye(3, dtype=np.float32), -glass[:, None]]))
    density = cv2.transform(od, np.array([[1, 1, 1, -glass.sum()]], dtype=np.float32))
    counterstain = np.asarray(stain.counterstain, dtype=np.float32)
    counter = cv2.transform(od, np.array([[*counterstain, -glass @ counterstain]], np.float32))
    length = cv2.sqrt(cv2.transform(cv2.multiply(above, above), np.ones((1, 3), np.float32)))
    nuclear = (nuclei > 0).view(np.uint8)
    # Distance of every pixel from the nearest nucleus, in µm.
    away = cv2.distanceTransform(1 - nuclear, cv2.DIST_L2, cv2.DIST_MASK_3) * px_um
    # A red cell is as dense as the slide's typical one and as close to the counterstain.
    red_like = (density >= 0.5 * stain.red_cell_density) & (
        counter >= stain.red_cell_cosine * length
    )
    glass_like = density < params.glass_share * stain.red_cell_density
    side = max(1, round(params.red_core_um / px_um))
    # Only whole neighbourhoods of glass or red cell mark background: pale cytoplasm has
    # pixels of either, and its boundary is the edge the watershed finds between them.
    certain = cv2.erode((red_like | glass_like).view(np.uint8), np.ones((side, side), np.uint8))
    background = (certain.view(bool) & (away > params.nucleus_margin_um)) | (
        away > params.cytoplasm_um
    )
    # The nucleus's own edge is the strongest in a cell: each nucleus's marker reaches a pixel
    # past it, so the flood starts beyond that edge and stops at the membrane.
    step = np.ones((3, 3), np.uint8)
    markers = cv2.dilate(nuclei.astype(np.float32), step).astype(np.int32)
    markers[nuclear.view(bool)] = nuclei[nuclear.view(bool)]
    markers[background & (markers == 0)] = n + 1
    # OpenCV floods by the largest channel difference between neighbours: a colour edge, so
    # pale lilac cytoplasm stops at a pink red cell as well as at the glass.
    cv2.watershed(cv2.convertScaleAbs(od, alpha=255.0 / OD_SPAN), markers)
    # The watershed lines (-1) go to the cell beside them.
    lines = markers == -1
    markers[markers == n + 1] = 0
    markers[lines] = 0
    widened = cv2.dilate(markers.astype(np.float32), step).astype(np.int32)
    markers[lines] = widened[lines]
    return _open_labels(markers, nuclei, max(1, round(params.neck_um / (2 * px_um))))


def _open_labels(
    cells: NDArray[np.int32], nuclei: NDArray[np.int32], radius: int
) -> NDArray[np.int32]:
    """Each label opened on its own by a disk of ``radius`` pixels, its nucleus kept: a leak
    through a gap narrower than the disk into a neighbouring red cell is cut off."""
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2)
    # OpenCV's morphology takes no int32; float32 holds every label exactly (below 2**24).
    labels = cells.astype(np.float32)
    # A pixel survives erosion when every pixel of the disk around it has its label.
    low, high = cv2.erode(labels, disk), cv2.dilate(labels, disk)
    interior = np.where((low == labels) & (high == labels), labels, 0.0).astype(np.float32)
    # Dilating the survivors back, each stays within its own label.
    grown = cv2.dilate(interior, disk)
    opened = np.where(grown == labels, cells, 0)
    return np.where(nuclei > 0, nuclei, opened).astype(np.int32)
