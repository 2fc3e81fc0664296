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

Per-cell measures use labelled-image reductions, and outlines are cast as rays from each centre,
so no step loops over cells in Python.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, cast

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage import filters, morphology, segmentation

from wsi_pipeline.core.schema import (
    CONTOUR_VERTICES,
    check_columns,
    empty_columns,
    field_names,
)
from wsi_pipeline.image.segment import SegmentParams, label_boxes, segment_cells
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


@dataclass(frozen=True)
class DetectParams:
    """Parameters of :func:`detect_cells`; physical sizes in µm and µm².

    Attributes
    ----------
    work_mpp : float
        Microns per pixel at which cells are found (crops are taken at full resolution).
    stain : StainModel or None
        The slide's stain (:func:`~wsi_pipeline.image.stain.estimate_stain`); ``None``
        estimates it from the image.
    threshold : float or None
        Nuclear-stain optical-density threshold; ``None`` learns it from the image.
    noise_sigmas : float
        Robust standard deviations of the background between its median and the threshold.
    min_threshold : float
        Lower bound of a learned threshold (nuclear-stain optical density).
    smooth_um : float
        Gaussian sigma applied to the nuclear channel.
    group_um : float
        Radius of the closing that joins the lobes of one nucleus.
    lobe_um2 : float
        Stained pieces smaller than this are granules or precipitate and are ignored.
    min_piece_um2 : float
        Pieces smaller than this (lobes, platelets) join a cell but cannot vouch for one.
    min_area_um2, max_area_um2 : float
        Accepted area of a cell's stained region.
    solid_area_um2 : float
        Regions smaller than this (small dense nuclei such as erythroblasts', but also platelet
        clumps of up to four platelets and precipitate), or built only from pieces smaller than
        ``min_piece_um2``, must hold a solid chromatin core. Real lymphocyte nuclei of
        20-30 µm² may stain too pale for the core test, so the limit stays at their low end
        (BCCD recall 0.983 at 25, 0.990 at 20).
    core_um : float
        Side of the square window over which a solid core is measured.
    core_red_od : float
        Least red optical density, averaged over that window, of a solid core.
    link_um : float
        Nuclear pieces whose centres lie closer than this belong to one cell; the nuclei of two
        touching cells lie farther apart.
    seed_area_um2 : float
        Nuclear groups this large seed a cell even without a solid core (the pale nuclei of
        promyelocytes and monocytes); clusters of cytoplasmic granules stay smaller.
    granule_factor : float
        Granular (eosinophil) areas unmix below ``-granule_factor * threshold``.
    split_um, split_share : float
        Touching nuclei are parted where the neck between them is narrower (in radius) than
        each of them by ``split_um`` and by ``split_share`` of the piece's largest radius
        (:func:`_split_pieces`): a notched nucleus (a monocyte's, a metamyelocyte's) has a
        wide neck for its size.
    segment : SegmentParams
        How each nucleus is grown to its cell (:func:`~wsi_pipeline.image.segment.segment_cells`).
    """

    work_mpp: float = 0.6
    stain: StainModel | None = None
    threshold: float | None = None
    noise_sigmas: float = 5.0
    min_threshold: float = 0.5
    smooth_um: float = 0.25
    group_um: float = 1.5
    lobe_um2: float = 2.5
    min_piece_um2: float = 6.0
    min_area_um2: float = 8.0
    max_area_um2: float = 600.0
    solid_area_um2: float = 25.0
    core_um: float = 1.4
    core_red_od: float = 1.1
    link_um: float = 7.0
    seed_area_um2: float = 45.0
    granule_factor: float = 2.0
    split_um: float = 1.0
    split_share: float = 0.3
    segment: SegmentParams = SegmentParams()

    @property
    def max_diameter_um(self) -> float:
        """Diameter of a round nucleus of ``max_area_um2`` with the widest rim of cytoplasm:
        the least useful tile overlap."""
        return 2.0 * (float(np.sqrt(self.max_area_um2 / np.pi)) + self.segment.cytoplasm_um)


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


def _disk(radius_um: float, mpp: float) -> NDArray[np.uint8]:
    return morphology.disk(max(1, round(radius_um / mpp)))


def _cell_mask(stain: NDArray[np.float32], threshold: float, px_um: float, params: DetectParams):
    """Where white cells are, and which pixels belong to a piece big enough to vouch for one.

    The mask groups nuclear pieces of at least ``lobe_um2`` and eosinophils' granular bodies.
    Pieces smaller than ``min_piece_um2`` (the lobes of a segmented neutrophil, but also
    platelets) join the grouping without vouching: a region built from them alone must prove
    it is a nucleus by a solid core (:func:`_accept`).
    """
    min_piece = int(params.min_piece_um2 / px_um**2)
    # One labelling sorts the nuclear pieces by size: 0 too small, 1 a lobe, 2 vouching.
    stained = stain > threshold
    flat, which = _labelled(_label(stained)[0], stained)
    size = np.bincount(which)
    kind = (size > int(params.lobe_um2 / px_um**2)).astype(np.uint8) + (size > min_piece)
    nuclear = np.zeros(stain.shape, dtype=np.uint8)
    nuclear.ravel()[flat] = kind[which]
    # Eosinophil granules unmix to strongly negative nuclear stain and hide the small lobes.
    granular = _drop_small(stain < -params.granule_factor * threshold, min_piece)
    grouped = _closing((nuclear > 0) | granular, _disk(params.group_um, px_um))
    return _fill_holes(grouped), (nuclear == 2) | granular


def _label(mask: NDArray[np.bool_]) -> tuple[NDArray[np.int32], int]:
    """4-connected components of ``mask`` numbered 1..N in raster order, and N (as
    ``ndi.label``), by OpenCV."""
    count, labels = cv2.connectedComponents(
        np.ascontiguousarray(mask).view(np.uint8), connectivity=4, ltype=cv2.CV_32S
    )
    return cast(NDArray[np.int32], labels), count - 1  # ltype CV_32S; cv2's stubs lack dtypes


def _drop_small(mask: NDArray[np.bool_], max_size: int) -> NDArray[np.bool_]:
    """``mask`` without its 4-connected components of ``max_size`` pixels or fewer."""
    flat, which = _labelled(_label(mask)[0], mask)
    kept = np.zeros(mask.shape, dtype=bool)
    kept.ravel()[flat[(np.bincount(which) > max_size)[which]]] = True
    return kept


def _closing(mask: NDArray[np.bool_], disk: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """Binary closing with nothing outside the image (as ``ndi.binary_closing``), by OpenCV."""
    border: dict[str, Any] = {"borderType": cv2.BORDER_CONSTANT, "borderValue": 0}
    dilated = cv2.dilate(mask.view(np.uint8), disk, **border)
    return cv2.erode(dilated, disk, **border).view(bool)


def _fill_holes(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """``mask`` with every background region that does not reach the image edge filled."""
    # Flood the background 4-connected to a frame of background around the image.
    framed = cv2.copyMakeBorder(mask.view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(framed, None, (0, 0), 2, flags=4)
    return framed[1:-1, 1:-1] != 2


def _label_cells(
    mask: NDArray[np.bool_],
    vouching: NDArray[np.bool_],
    core: NDArray[np.float32],
    px_um: float,
    params: DetectParams,
) -> tuple[NDArray[np.int32], NDArray[np.intp]]:
    """One label per candidate cell (some numbers may label no pixel), and the flat indices of
    the labelled pixels: every pixel of the mask.

    Touching cells are split by their nuclei: the vouching pieces (:func:`_cell_mask`) that
    seed a cell (:func:`_seeds`) label the blob of ``mask`` they lie in, and a blob holding
    several seeds is split among them by a watershed of its distance transform. Blobs without a
    seed keep one label each, numbered after the seeds (:func:`_join_fragments`).
    """
    pieces, piece_count = _split_pieces(vouching, px_um, params)
    piece_pixels, piece_of = _labelled(pieces, vouching)
    seed = _seeds(piece_pixels, piece_of, pieces.shape[1], piece_count, core, px_um, params)
    blobs, count = _label(mask)
    blob_pixels, blob_of = _labelled(blobs, mask)
    # The distinct (blob, seed) pairs over the seeds' pixels inside the mask.
    blob, mark = blobs.ravel()[piece_pixels], seed[piece_of]
    inside = (blob > 0) & (mark > 0)
    span = int(seed.max()) + 1
    key = blob[inside].astype(np.int64) * span + mark[inside]
    pairs = np.column_stack(np.divmod(np.unique(key), span))
    seeds_in = np.bincount(pairs[:, 0], minlength=count + 1)
    label_of = np.zeros(count + 1, dtype=np.int32)
    alone = seeds_in[pairs[:, 0]] == 1
    label_of[pairs[alone, 0]] = pairs[alone, 1]
    unseeded = np.flatnonzero(seeds_in[1:] == 0)
    if len(unseeded):
        area = np.bincount(blob_of, minlength=count + 1)[1:][unseeded] * px_um**2
        centres = _centroids(blob_pixels, blob_of, blobs.shape[1], count)[unseeded]
        first = int(pairs[:, 1].max(initial=0))
        label_of[unseeded + 1] = first + _join_fragments(area, centres, px_um, params)
    labels = np.zeros_like(blobs)
    labels.ravel()[blob_pixels] = label_of[blob_of]
    shared = np.flatnonzero(seeds_in > 1)
    if len(shared):
        # The watershed of a blob never leaves it, so it runs on each shared blob's box alone.
        distance = cv2.distanceTransform(mask.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)
        for b in shared:
            rows, cols = np.divmod(blob_pixels[blob_of == b], blobs.shape[1])
            box = np.s_[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            own = blobs[box] == b
            split = segmentation.watershed(-distance[box], seed[pieces[box]], mask=own)
            labels[box][own] = split[own]
    return labels, blob_pixels


def _split_pieces(
    vouching: NDArray[np.bool_], px_um: float, params: DetectParams
) -> tuple[NDArray[np.int32], int]:
    """The vouching pieces (:func:`_cell_mask`) labelled 1..N, those made of touching nuclei
    cut apart: in a crowded marrow field neighbouring nuclei stain as one piece, joined by a
    neck narrower than either nucleus.

    Only a piece larger than two of the image's typical nuclei (the median nucleus-sized
    piece) is looked at, in its own box, so the cost follows the merged pieces, not the tile.
    Each bump of its distance transform that rises above the neck it shares with another by
    ``split_um`` and by ``split_share`` of the piece's largest radius is a part, and every
    pixel goes to the part it climbs to; the cut stands when every part is as large as a small
    nucleus (``solid_area_um2``). One lobed or notched nucleus (a neutrophil's, a monocyte's)
    stays one piece, whatever the magnification.
    """
    labels, count = _label(vouching)
    if count == 0:
        return labels, 0
    flat, piece = _labelled(labels, vouching)
    area = np.bincount(piece, minlength=count + 1)[1:] * px_um**2
    nuclei = area[area >= params.solid_area_um2]
    if not len(nuclei):
        return labels, count
    boxes = label_boxes(flat, piece, labels.shape[1], count)
    step = np.ones((3, 3), np.uint8)
    for number in np.flatnonzero(area >= 2 * np.median(nuclei)) + 1:
        y0, x0, y1, x1 = boxes[number - 1]
        window = np.s_[y0:y1, x0:x1]
        own = np.pad(labels[window] == number, 1)
        distance = cv2.distanceTransform(own.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)
        rise = max(params.split_um / px_um, params.split_share * float(distance.max()))
        bumps = morphology.h_maxima(distance, rise, footprint=step)
        markers, parts = _label(bumps.view(bool) & own)
        if parts < 2:
            continue
        split = segmentation.watershed(-distance, markers, mask=own)[1:-1, 1:-1]
        inside = own[1:-1, 1:-1]
        sizes = np.bincount(split[inside], minlength=parts + 1) * px_um**2
        if sizes[0] > 0 or sizes[1:].min() < params.solid_area_um2:
            continue
        # The first part keeps the piece's number; the others are numbered after the last.
        renumbered = np.where(split == 1, number, count + split - 1)
        labels[window][inside] = renumbered[inside]
        count += parts - 1
    return labels, count


def _seeds(
    flat: NDArray[np.intp],
    which: NDArray[np.integer],
    width: int,
    count: int,
    core: NDArray[np.float32],
    px_um: float,
    params: DetectParams,
) -> NDArray[np.int32]:
    """The seed each of the ``count`` vouching pieces belongs to (0: none), with index 0 for
    the background; the pieces are given by their labelled pixels (:func:`_labelled`) in a
    label image ``width`` pixels wide.

    Pieces whose centres lie within ``link_um`` of each other, directly or through a chain,
    belong to one cell (lobes of a neutrophil, an eosinophil's lobes and granular body); each
    such group that holds a solid core (``core``, see :func:`_core_density`) or covers
    ``seed_area_um2`` is a seed, numbered by its group.
    """
    if count == 0:
        return np.zeros(1, dtype=np.int32)
    group = _link(_centroids(flat, which, width, count), params.link_um / px_um)
    # Clusters of a promyelocyte's granules are pieces too, far from its pale nucleus: only a
    # group with a solid chromatin core, or as large as a pale nucleus, seeds a cell.
    group_core = np.zeros(group.max() + 1)
    np.maximum.at(group_core, group, _label_maximum(core, flat, which, count))
    piece_area = np.bincount(which, minlength=count + 1)[1:] * px_um**2
    group_area = np.bincount(group, weights=piece_area, minlength=group.max() + 1)
    seeds = (group_core >= params.core_red_od) | (group_area >= params.seed_area_um2)
    group[~seeds[group]] = 0
    return np.concatenate([[0], group]).astype(np.int32)


def _link(centres: FloatArray, reach_px: float) -> NDArray[np.intp]:
    """Group number (from 1) of each piece given by its centre (:func:`_centroids`): pieces
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


def _join_fragments(
    area_um2: NDArray[np.floating], centres: FloatArray, px_um: float, params: DetectParams
) -> NDArray[np.int32]:
    """Numbers (from 1) of blobs without a seed, given in raster order by their areas and
    (row, col) centres: their rank, except that blobs too small to be a cell that lie within
    ``link_um`` of each other share a number after all ranks (the lobes of a segmented
    neutrophil, split wider than the closing joins). The joined region must still hold a
    solid core (:func:`_accept`).
    """
    numbers = np.arange(1, len(area_um2) + 1, dtype=np.int32)
    fragments = np.flatnonzero(area_um2 < params.min_area_um2)
    if len(fragments) >= 2:
        numbers[fragments] = len(area_um2) + _link(centres[fragments], params.link_um / px_um)
    return numbers


def _core_density(od: NDArray[np.float32], px_um: float, params: DetectParams):
    """Red optical density averaged over a ``core_um`` square window, at the working resolution.

    ``od`` is :func:`_work_density`. Chromatin absorbs red light strongly; red cells, platelet
    granules and pale precipitate hardly do, so only a solid piece of nucleus gives a high value
    over the whole window.
    """
    red = cv2.extractChannel(od, 0)
    side = max(1, round(params.core_um / px_um))
    # The window and borders of ndi.uniform_filter (mirrored edges).
    return cv2.blur(red, (side, side), borderType=cv2.BORDER_REFLECT)


def _labelled(
    labels: NDArray[np.integer], mask: NDArray[np.bool_]
) -> tuple[NDArray[np.intp], NDArray[np.integer]]:
    """Flat indices of the labelled pixels, given by the ``mask`` that was labelled, and their
    labels. Cells cover a small part of a tile, so per-label reductions run over these pixels
    alone (and finding them in a boolean mask takes a tenth of the time)."""
    flat = np.flatnonzero(mask)
    return flat, labels.ravel()[flat]


def _centroids(
    flat: NDArray[np.intp], which: NDArray[np.integer], width: int, n: int
) -> FloatArray:
    """Centre (row, col) of each label 1..n, as an (n, 2) array, from the labelled pixels
    (:func:`_labelled`) of an image ``width`` pixels wide."""
    rows, cols = np.divmod(flat, width)
    size = np.bincount(which, minlength=n + 1)[1:]
    return np.column_stack(
        [np.bincount(which, weights=k, minlength=n + 1)[1:] / size for k in (rows, cols)]
    )


def _label_maximum(
    values: NDArray, flat: NDArray[np.intp], which: NDArray[np.integer], n: int
) -> FloatArray:
    """Largest value under each label 1..n, from the labelled pixels (:func:`_labelled`) only:
    ``ndi.maximum`` sorts its input."""
    return np.asarray(ndi.maximum(values.ravel()[flat], which, np.arange(1, n + 1)))


def _outlines(labels: NDArray[np.int32], centroids: FloatArray, reach: float) -> FloatArray:
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


def _near_edge(labels: NDArray[np.int32], n: int, band: int) -> NDArray[np.bool_]:
    """Which of the labels 1..n reach within ``band`` pixels of the image's edge. The closing
    that groups lobes erodes what touches the edge, so a cut nucleus stops short of it."""
    edges = [labels[:band], labels[-band:], labels[:, :band], labels[:, -band:]]
    near = np.zeros(n + 1, dtype=bool)
    near[np.concatenate([e.ravel() for e in edges])] = True
    return near[1:]


def _accept(
    area_um2: NDArray[np.floating],
    core: FloatArray,
    vouched: NDArray[np.bool_],
    cut: NDArray[np.bool_],
    params: DetectParams,
) -> NDArray[np.bool_]:
    """Size limits, and a solid chromatin core for regions too small to be sure of or built
    only from pieces smaller than ``min_piece_um2``. A region ``cut`` by the image's edge shows
    only part of its nucleus: its size cannot speak against it, only the lack of both a solid
    core and a vouching piece.
    """
    sized = (area_um2 >= params.min_area_um2) & (area_um2 <= params.max_area_um2)
    solid = core >= params.core_red_od
    whole = sized & (solid | (vouched & (area_um2 >= params.solid_area_um2)))
    part = cut & (area_um2 >= params.min_piece_um2) & (area_um2 <= params.max_area_um2)
    return whole | (part & (solid | vouched))


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
    mask, vouching = _cell_mask(stain, threshold, px_um, params)
    core_map = _core_density(od, px_um, params)
    labels, flat = _label_cells(mask, vouching, core_map, px_um, params)
    n = int(labels.max())
    if n == 0:
        return DetectedCells.empty()
    which = labels.ravel()[flat]
    # Unused label numbers have no area and are dropped with the rejected regions.
    area_um2 = np.bincount(which, minlength=n + 1)[1:] * px_um**2
    core = _label_maximum(core_map, flat, which, n)
    vouched = _label_maximum(vouching, flat, which, n).astype(bool)
    cut = _near_edge(labels, n, round(params.group_um / px_um) + 1)
    keep = np.flatnonzero(_accept(area_um2, core, vouched, cut, params)) + 1
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
    alike); ``pixels`` are the nuclei's labelled pixels (:func:`_labelled`) and ``offset`` is
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
    centroids = _centroids(flat, which, width, n)
    outline = _outlines(cells, centroids, reach)
    nucleus_outline = _outlines(nuclei, centroids, reach)
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
        circularity=_circularity(outline, cell_size).astype(np.float32),
        edge=_near_edge(cells, n, 1),
        score=(1.0 - threshold / np.maximum(mean_stain, threshold)).astype(np.float32),
        tile_id=np.full(n, -1, dtype=np.int32),
    )


def _circularity(outline: FloatArray, area_px: NDArray[np.integer]) -> FloatArray:
    """``4 pi area / perimeter**2`` of closed outlines (N, V, 2), at most 1."""
    closed = np.concatenate([outline, outline[:, :1]], axis=1)
    perimeter = np.hypot(*np.diff(closed, axis=1).transpose(2, 0, 1)).sum(axis=1)
    return np.minimum(1.0, 4 * np.pi * area_px / np.maximum(perimeter, 1e-9) ** 2)
