"""White-cell detection on May-Grünwald-Giemsa smears.

The detector unmixes each pixel's optical density into chromatin purple, basophilic blue and
red-cell pink (:func:`~wsi_pipeline.image.stain.nuclear_stain`) and keeps the first: glass and
red cells are near zero, blue cytoplasm does not join a neighbour's nucleus, and eosinophil
granules are strongly negative.

Steps, on blocks of whole pixels near ``work_mpp`` (0.6 µm/px by default):

1. the nuclear channel, block-averaged, thresholded at a level learned per slide
   (:func:`slide_threshold`) or from the image itself; strongly negative (granular) areas are
   kept too, so eosinophils are found by their granules;
2. pieces smaller than a lobe are dropped (granules, precipitate);
3. a morphological closing groups the lobes of segmented neutrophils into one blob;
4. touching cells are split by their nuclei: pieces within ``link_um`` of each other form one
   nucleus, and each nucleus with a solid chromatin core seeds a watershed of the blobs;
   unseeded fragments too small to be a cell join within ``link_um`` (lobes set wide apart);
5. size limits in µm² reject debris; a region too small to be sure of (an erythroblast's or
   lymphocyte's dense nucleus looks as large as a platelet clump), or built only from
   lobe-sized pieces, is kept only when it holds a solid chromatin core: a window ``core_um``
   wide whose mean red optical density reaches ``core_red_od``. Granular platelets and
   scattered precipitate never fill such a window.

Steps 2 to 5 live in :mod:`.nuclei` (with :class:`DetectParams`), the label-image operations
they and the outlines share in :mod:`.labelling`; this module learns each slide's stain and
threshold and turns the accepted nuclei and their grown cells into the cell table. Per-cell
measures use labelled-image reductions, and outlines are cast as rays from each centre, so no
step loops over cells in Python.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import cast

import cv2
import numpy as np
from numpy.typing import NDArray
from skimage import filters

from wsi_pipeline.core.schema import check_columns, empty_columns, field_names
from wsi_pipeline.image.labelling import (
    circularity,
    label_centroids,
    label_maximum,
    near_edge,
    resample_ring,
    star_outlines,
)
from wsi_pipeline.image.nuclei import (
    DetectParams,
    accept_regions,
    cell_mask,
    core_density,
    label_cells,
)
from wsi_pipeline.image.segment import label_boxes, segment_cells
from wsi_pipeline.image.stain import (
    REFERENCE_STAIN,
    StainModel,
    block_density,
    estimate_stain,
    unmix_nuclear,
)

__all__ = [
    "DetectedCells",
    "DetectParams",
    "detect_cells",
    "learn_threshold",
    "resample_ring",
    "slide_params",
]

FloatArray = NDArray[np.float64]


@dataclass
class DetectedCells:
    """Detected cells as the detection columns of the cell table (:mod:`wsi_pipeline.core.schema`).

    Attributes
    ----------
    x, y : ndarray of float64, shape (N,)
        Centre of each cell's nucleus (all lobes together), level-0 pixels: where its crop is
        centred.
    bbox : ndarray of int64, shape (N, 4)
        ``(x0, y0, x1, y1)`` of the whole cell, half-open.
    contour, nucleus_contour : ndarray of float32, shape (N, CONTOUR_VERTICES, 2)
        Closed outlines of each cell and of its nucleus as ``(x, y)`` vertices, evenly spaced
        along them (the last vertex connects back to the first).
    cell_area_um2, nucleus_area_um2 : ndarray of float32, shape (N,)
        Areas of the whole cell and of its nucleus.
    nc_ratio : ndarray of float32, shape (N,)
        Nucleus area over cell area.
    circularity : ndarray of float32, shape (N,)
        ``4 pi area / perimeter**2`` of the cell outline.
    edge : ndarray of bool, shape (N,)
        The cell touches the border of the image it was found in.
    score : ndarray of float32, shape (N,)
        Detection score in ``[0, 1)``: stain contrast above the threshold.
    tile_id : ndarray of int32, shape (N,)
        Tile that counted the cell, -1 until assigned.
    """

    x: NDArray[np.float64]
    y: NDArray[np.float64]
    bbox: NDArray[np.int64]
    contour: NDArray[np.float32]
    nucleus_contour: NDArray[np.float32]
    cell_area_um2: NDArray[np.float32]
    nucleus_area_um2: NDArray[np.float32]
    nc_ratio: NDArray[np.float32]
    circularity: NDArray[np.float32]
    edge: NDArray[np.bool_]
    score: NDArray[np.float32]
    tile_id: NDArray[np.int32]

    def __post_init__(self) -> None:
        check_columns(self.columns(), n_classes=0, required=field_names("detect"))

    def __len__(self) -> int:
        return len(self.x)

    @classmethod
    def empty(cls) -> DetectedCells:
        """No cells."""
        return cls(**empty_columns(field_names("detect")))

    def columns(self) -> dict[str, NDArray]:
        """The cell-table columns, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def select(self, keep: NDArray[np.bool_] | NDArray[np.integer]) -> DetectedCells:
        """Rows chosen by a boolean mask or an index array."""
        index = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep)
        return DetectedCells(**{name: column[index] for name, column in self.columns().items()})

    @classmethod
    def concat(cls, tables: Iterable[DetectedCells]) -> DetectedCells:
        """One table holding the rows of all ``tables`` in order."""
        tables = list(tables)
        if not tables:
            return cls.empty()
        return cls(
            **{f.name: np.concatenate([getattr(t, f.name) for t in tables]) for f in fields(cls)}
        )


def learn_threshold(stain: NDArray[np.floating], params: DetectParams = DetectParams()) -> float:
    """Learn the nuclear-stain threshold from the channel values of one slide.

    Unmixing puts glass and red cells near zero whatever the brightness of the slide; where
    they are the bulk of the pixels, their spread (a robust standard deviation) measures how
    well the stain vectors fit, and the threshold lies ``noise_sigmas`` spreads above that
    background. Where nucleated cells are the bulk (a crowded marrow field, an image cropped
    around one cell) that rule measures chromatin, not background, so the threshold is never
    above the two-class (Otsu) split of the values; and never below ``min_threshold``, the
    faintest chromatin of a pale blast.

    Parameters
    ----------
    stain : ndarray of float
        Nuclear-stain values (:func:`~wsi_pipeline.image.stain.nuclear_stain`) pooled over the
        slide or a sample of it.
    params : DetectParams
        ``noise_sigmas`` and ``min_threshold`` are used.

    Returns
    -------
    float
    """
    values = np.asarray(stain, dtype=np.float64).ravel()
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    above_noise = median + params.noise_sigmas * spread
    return max(params.min_threshold, min(above_noise, float(filters.threshold_otsu(values))))


def slide_params(
    samples: Sequence[NDArray[np.uint8]], mpp: float, params: DetectParams = DetectParams()
) -> DetectParams:
    """Learn one slide's stain and nuclear-stain threshold from sample images of it.

    Parameters
    ----------
    samples : sequence of ndarray of uint8, shape (H, W, 3)
        RGB images spread over the counted region, e.g. a few tiles.
    mpp : float
        Microns per pixel of the samples.
    params : DetectParams

    Returns
    -------
    DetectParams
        ``params`` with the slide's ``stain`` and ``threshold``, for :func:`detect_cells` on
        every tile of the slide. Without samples, the reference stain and ``min_threshold``.
    """
    if not samples:
        return dataclasses.replace(params, stain=REFERENCE_STAIN, threshold=params.min_threshold)
    densities = [_work_density(rgb, mpp, params) for rgb in samples]
    model = estimate_stain(np.concatenate([od.reshape(-1, 3) for od in densities]))
    stains = [_work_stain(od, mpp, params, model).ravel() for od in densities]
    threshold = learn_threshold(np.concatenate(stains), params)
    return dataclasses.replace(params, stain=model, threshold=threshold)


def _work_stain(
    od: NDArray[np.float32], mpp: float, params: DetectParams, model: StainModel
) -> NDArray[np.float32]:
    """Nuclear stain of optical density already averaged to the working resolution
    (:func:`_work_density`), lightly smoothed."""
    stain = unmix_nuclear(od, model)
    sigma = params.smooth_um / (_block(mpp, params) * mpp)
    if sigma < 0.3:
        return stain
    # The kernel and borders of ndi.gaussian_filter (radius 4 sigma, mirrored edges).
    side = 2 * int(4.0 * sigma + 0.5) + 1
    # cv2's stubs do not track dtypes: the blur of float32 is float32.
    blurred = cv2.GaussianBlur(stain, (side, side), sigma, borderType=cv2.BORDER_REFLECT)
    return cast(NDArray[np.float32], blurred)


def _work_density(rgb: NDArray[np.uint8], mpp: float, params: DetectParams) -> NDArray[np.float32]:
    """Optical density averaged over blocks of whole pixels near ``work_mpp`` (:func:`_block`
    pixels a side)."""
    return block_density(rgb, _block(mpp, params))


def _block(mpp: float, params: DetectParams) -> int:
    """Side, in image pixels, of one working pixel."""
    return max(1, round(params.work_mpp / mpp))


def detect_cells(
    rgb: NDArray[np.uint8],
    mpp: float,
    origin: tuple[float, float] = (0.0, 0.0),
    params: DetectParams = DetectParams(),
    level0_mpp: float | None = None,
) -> DetectedCells:
    """Detect white cells in an RGB image of a smear.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
        The image, e.g. a tile read at ``mpp``.
    mpp : float
        Microns per pixel of ``rgb``.
    origin : tuple of float
        Level-0 position ``(x, y)`` of the image's top-left corner.
    params : DetectParams
        Detector settings; set ``threshold`` to a slide-level value from :func:`slide_threshold`.
    level0_mpp : float, optional
        Microns per pixel of the slide's level 0; defaults to ``mpp``.

    Returns
    -------
    DetectedCells
        One row per cell, in level-0 pixels.
    """
    if mpp <= 0:
        raise ValueError(f"microns per pixel must be positive, got {mpp}")
    od = _work_density(rgb, mpp, params)
    model = estimate_stain(od) if params.stain is None else params.stain
    stain = _work_stain(od, mpp, params, model)
    threshold = learn_threshold(stain, params) if params.threshold is None else params.threshold
    f = _block(mpp, params)
    px_um = f * mpp
    mask, vouching = cell_mask(stain, threshold, px_um, params)
    core_map = core_density(od, px_um, params)
    labels, flat = label_cells(mask, vouching, core_map, px_um, params)
    n = int(labels.max())
    if n == 0:
        return DetectedCells.empty()
    which = labels.ravel()[flat]
    # Unused label numbers have no area and are dropped with the rejected regions.
    area_um2 = np.bincount(which, minlength=n + 1)[1:] * px_um**2
    core = label_maximum(core_map, flat, which, n)
    vouched = label_maximum(vouching, flat, which, n).astype(bool)
    cut = near_edge(labels, n, round(params.group_um / px_um) + 1)
    keep = np.flatnonzero(accept_regions(area_um2, core, vouched, cut, params)) + 1
    # Renumber the kept cells 1..N and drop the rest.
    lookup = np.zeros(n + 1, dtype=np.int32)
    lookup[keep] = np.arange(1, len(keep) + 1)
    which = lookup[which]
    kept = which > 0
    labels = np.zeros_like(labels)
    labels.ravel()[flat] = which
    cells = segment_cells(od, model, labels, px_um, params.segment)
    return _table(
        labels,
        cells,
        (flat[kept], which[kept]),
        stain,
        threshold,
        np.array(origin[::-1], dtype=float),
        px_um,
        level0_mpp or mpp,
    )


def _table(
    nuclei: NDArray[np.int32],
    cells: NDArray[np.int32],
    pixels: tuple[NDArray[np.intp], NDArray[np.int32]],
    stain: NDArray[np.float32],
    threshold: float,
    offset: FloatArray,
    px_um: float,
    level0_mpp: float,
) -> DetectedCells:
    """Level-0 :class:`DetectedCells` of the nuclei labelled 1..N and their cells (labelled
    alike); ``pixels`` are the nuclei's labelled pixels (:func:`labelled_pixels`) and ``offset`` is
    the image origin (y, x)."""
    flat, which = pixels
    n = int(which.max(initial=0))
    if n == 0:
        return DetectedCells.empty()
    width = nuclei.shape[1]
    cell_flat = np.flatnonzero(cells)
    cell_which = cells.ravel()[cell_flat]
    boxes = label_boxes(cell_flat, cell_which, width, n).astype(float)
    reach = float(np.hypot(*(boxes[:, 2:] - boxes[:, :2]).T).max())
    # A cell's centre is its nucleus's: a membrane drawn into a neighbour must not move the
    # crop the classifier sees off the cell.
    centroids = label_centroids(flat, which, width, n)
    outline = star_outlines(cells, centroids, reach)
    nucleus_outline = star_outlines(nuclei, centroids, reach)
    nucleus_size = np.bincount(which, minlength=n + 1)[1:]
    cell_size = np.bincount(cell_which, minlength=n + 1)[1:]
    total_stain = np.bincount(which, weights=np.abs(stain.ravel()[flat]), minlength=n + 1)
    mean_stain = total_stain[1:] / nucleus_size
    scale = px_um / level0_mpp  # level-0 pixels per working pixel

    def to_level0(rc: FloatArray) -> FloatArray:
        return offset + (rc + 0.5) * scale - 0.5

    centres = to_level0(centroids)
    top_left = np.floor(offset + boxes[:, :2] * scale)
    bottom_right = np.ceil(offset + boxes[:, 2:] * scale)
    return DetectedCells(
        x=centres[:, 1],
        y=centres[:, 0],
        bbox=np.column_stack([top_left[:, ::-1], bottom_right[:, ::-1]]).astype(np.int64),
        contour=to_level0(outline)[..., ::-1].astype(np.float32),
        nucleus_contour=to_level0(nucleus_outline)[..., ::-1].astype(np.float32),
        cell_area_um2=(cell_size * px_um**2).astype(np.float32),
        nucleus_area_um2=(nucleus_size * px_um**2).astype(np.float32),
        nc_ratio=(nucleus_size / cell_size).astype(np.float32),
        circularity=circularity(outline, cell_size).astype(np.float32),
        edge=near_edge(cells, n, 1),
        score=(1.0 - threshold / np.maximum(mean_stain, threshold)).astype(np.float32),
        tile_id=np.full(n, -1, dtype=np.int32),
    )
