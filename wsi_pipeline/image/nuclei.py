"""Finding white cells' nuclei in the nuclear-stain channel: the mask of stained pieces and
eosinophil granules, touching nuclei cut apart, lobes grouped into cells, and the regions
accepted as nuclei (steps 2 to 5 of :mod:`.detect`). :class:`DetectParams` holds every
setting of detection.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray
from skimage import morphology, segmentation

from wsi_pipeline.image.labelling import (
    binary_closing,
    drop_small,
    fill_holes,
    label_centroids,
    label_mask,
    label_maximum,
    labelled_pixels,
    link_near,
)
from wsi_pipeline.image.segment import SegmentParams, label_boxes
from wsi_pipeline.image.stain import StainModel

__all__ = ["DetectParams", "accept_regions", "cell_mask", "core_density", "label_cells"]

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


def _disk(radius_um: float, mpp: float) -> NDArray[np.uint8]:
    return morphology.disk(max(1, round(radius_um / mpp)))


def cell_mask(stain: NDArray[np.float32], threshold: float, px_um: float, params: DetectParams):
    """Where white cells are, and which pixels belong to a piece big enough to vouch for one.

    The mask groups nuclear pieces of at least ``lobe_um2`` and eosinophils' granular bodies.
    Pieces smaller than ``min_piece_um2`` (the lobes of a segmented neutrophil, but also
    platelets) join the grouping without vouching: a region built from them alone must prove
    it is a nucleus by a solid core (:func:`accept_regions`).
    """
    min_piece = int(params.min_piece_um2 / px_um**2)
    # One labelling sorts the nuclear pieces by size: 0 too small, 1 a lobe, 2 vouching.
    stained = stain > threshold
    flat, which = labelled_pixels(label_mask(stained)[0], stained)
    size = np.bincount(which)
    kind = (size > int(params.lobe_um2 / px_um**2)).astype(np.uint8) + (size > min_piece)
    nuclear = np.zeros(stain.shape, dtype=np.uint8)
    nuclear.ravel()[flat] = kind[which]
    # Eosinophil granules unmix to strongly negative nuclear stain and hide the small lobes.
    granular = drop_small(stain < -params.granule_factor * threshold, min_piece)
    grouped = binary_closing((nuclear > 0) | granular, _disk(params.group_um, px_um))
    return fill_holes(grouped), (nuclear == 2) | granular


def label_cells(
    mask: NDArray[np.bool_],
    vouching: NDArray[np.bool_],
    core: NDArray[np.float32],
    px_um: float,
    params: DetectParams,
) -> tuple[NDArray[np.int32], NDArray[np.intp]]:
    """One label per candidate cell (some numbers may label no pixel), and the flat indices of
    the labelled pixels: every pixel of the mask.

    Touching cells are split by their nuclei: the vouching pieces (:func:`cell_mask`) that
    seed a cell (:func:`_seeds`) label the blob of ``mask`` they lie in, and a blob holding
    several seeds is split among them by a watershed of its distance transform. Blobs without a
    seed keep one label each, numbered after the seeds (:func:`_join_fragments`).
    """
    pieces, piece_count = _split_pieces(vouching, px_um, params)
    piece_pixels, piece_of = labelled_pixels(pieces, vouching)
    seed = _seeds(piece_pixels, piece_of, pieces.shape[1], piece_count, core, px_um, params)
    blobs, count = label_mask(mask)
    blob_pixels, blob_of = labelled_pixels(blobs, mask)
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
        centres = label_centroids(blob_pixels, blob_of, blobs.shape[1], count)[unseeded]
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
    """The vouching pieces (:func:`cell_mask`) labelled 1..N, those made of touching nuclei
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
    labels, count = label_mask(vouching)
    if count == 0:
        return labels, 0
    flat, piece = labelled_pixels(labels, vouching)
    area = np.bincount(piece, minlength=count + 1)[1:] * px_um**2
    nuclei = area[area >= params.solid_area_um2]
    if not len(nuclei):
        return labels, count
    boxes = label_boxes(flat, piece, labels.shape[1], count)
    step = np.ones((3, 3), np.uint8)
    for number in np.flatnonzero(area >= 2 * np.median(nuclei)) + 1:
        y0, x0, y1, x1 = boxes[number - 1]
        if min(y0, x0) == 0 or y1 == labels.shape[0] or x1 == labels.shape[1]:
            continue  # cut by the image's edge: its outline there is the edge's, not a neck
        window = np.s_[y0:y1, x0:x1]
        own = np.pad(labels[window] == number, 1)
        distance = cv2.distanceTransform(own.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)
        rise = max(params.split_um / px_um, params.split_share * float(distance.max()))
        bumps = morphology.h_maxima(distance, rise, footprint=step)
        markers, parts = label_mask(bumps.view(bool) & own)
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
    the background; the pieces are given by their labelled pixels (:func:`labelled_pixels`) in a
    label image ``width`` pixels wide.

    Pieces whose centres lie within ``link_um`` of each other, directly or through a chain,
    belong to one cell (lobes of a neutrophil, an eosinophil's lobes and granular body); each
    such group that holds a solid core (``core``, see :func:`core_density`) or covers
    ``seed_area_um2`` is a seed, numbered by its group.
    """
    if count == 0:
        return np.zeros(1, dtype=np.int32)
    group = link_near(label_centroids(flat, which, width, count), params.link_um / px_um)
    # Clusters of a promyelocyte's granules are pieces too, far from its pale nucleus: only a
    # group with a solid chromatin core, or as large as a pale nucleus, seeds a cell.
    group_core = np.zeros(group.max() + 1)
    np.maximum.at(group_core, group, label_maximum(core, flat, which, count))
    piece_area = np.bincount(which, minlength=count + 1)[1:] * px_um**2
    group_area = np.bincount(group, weights=piece_area, minlength=group.max() + 1)
    seeds = (group_core >= params.core_red_od) | (group_area >= params.seed_area_um2)
    group[~seeds[group]] = 0
    return np.concatenate([[0], group]).astype(np.int32)


def _join_fragments(
    area_um2: NDArray[np.floating], centres: FloatArray, px_um: float, params: DetectParams
) -> NDArray[np.int32]:
    """Numbers (from 1) of blobs without a seed, given in raster order by their areas and
    (row, col) centres: their rank, except that blobs too small to be a cell that lie within
    ``link_um`` of each other share a number after all ranks (the lobes of a segmented
    neutrophil, split wider than the closing joins). The joined region must still hold a
    solid core (:func:`accept_regions`).
    """
    numbers = np.arange(1, len(area_um2) + 1, dtype=np.int32)
    fragments = np.flatnonzero(area_um2 < params.min_area_um2)
    if len(fragments) >= 2:
        numbers[fragments] = len(area_um2) + link_near(centres[fragments], params.link_um / px_um)
    return numbers


def core_density(od: NDArray[np.float32], px_um: float, params: DetectParams):
    """Red optical density averaged over a ``core_um`` square window, at the working resolution.

    ``od`` is :func:`_work_density`. Chromatin absorbs red light strongly; red cells, platelet
    granules and pale precipitate hardly do, so only a solid piece of nucleus gives a high value
    over the whole window.
    """
    red = cv2.extractChannel(od, 0)
    side = max(1, round(params.core_um / px_um))
    # The window and borders of ndi.uniform_filter (mirrored edges).
    return cv2.blur(red, (side, side), borderType=cv2.BORDER_REFLECT)


def accept_regions(
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
