"""The stages of one slide as plain-data functions: plan, detect, classify.

Each takes plain data and returns plain data, so the same functions run in process for one slide
(:mod:`.local`) and as Dask tasks for a folder (:mod:`.folder`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from wsi_pipeline.core.schema import check_columns, empty_columns, field_names
from wsi_pipeline.image.crops import crop_from_array
from wsi_pipeline.image.detect import DetectParams, detect_cells, slide_params
from wsi_pipeline.image.regions import CLASSES as REGION_CLASSES
from wsi_pipeline.image.regions import score_regions
from wsi_pipeline.image.slide import Slide, UnreadableRegion, slide_checksum, slide_stem
from wsi_pipeline.image.tiles import Tile, plan_tiles, region_rings
from wsi_pipeline.model.adapt import (
    ADAPTATION_METHOD,
    MIN_CELLS,
    ColourMoments,
    colour_moments,
    nearest_reference,
    references,
)
from wsi_pipeline.model.cards import ClassifierCard
from wsi_pipeline.model.classify import Classifier
from wsi_pipeline.run.options import REGION_CHOICES, RunOptions

__all__ = [
    "SlidePlan",
    "TileCells",
    "batched",
    "classify_cells",
    "detect_tiles",
    "plan_slide",
    "stage_timer",
    "unreadable_warning",
]

REGION_MPP = 4.0  # thumbnail resolution for finding the countable smear: red cells ~2 px
TILE_SIZE = 1024  # tile side in pixels at the classifier's resolution
SAMPLE_TILES = 8  # tiles spread over the region that learn its stain, threshold and colours
REPORT_THUMBNAIL_PX = 1200  # longest side of the overview drawn in the report


@dataclass
class SlidePlan:
    """Where and how one slide is counted: everything the later stages need, as plain data.

    Attributes
    ----------
    stem : str
        Names the outputs.
    attrs : dict
        Provenance recorded in the store: slide (with SHA-256), classifier, parameters, region.
    tiles : list of Tile
        Tiles to count in, at the classifier's resolution.
    region : list of (K, 2) float arrays
        Outer rings of the counted region, level-0 pixels.
    thumbnail : (h, w, 3) uint8
        Overview of the slide for the report, at most :data:`REPORT_THUMBNAIL_PX` a side.
    thumbnail_scale : float
        Thumbnail pixels per level-0 pixel.
    thumbnail_mpp : float
        Microns per thumbnail pixel.
    detect_params : DetectParams
        Detection settings with the slide's stain and nuclear-stain threshold.
    slide_colours : ColourMoments or None
        The colour moments of the cells of the sample tiles, to which the classifier adapts
        (None: not adapting; see ``attrs["adaptation"]`` for why).
    timings : dict of str to float
        Seconds spent opening and planning.
    """

    stem: str
    attrs: dict[str, Any]
    tiles: list[Tile]
    region: list[NDArray[np.float64]]
    thumbnail: NDArray[np.uint8]
    thumbnail_scale: float
    thumbnail_mpp: float
    detect_params: DetectParams
    slide_colours: ColourMoments | None
    timings: dict[str, float]


@dataclass
class TileCells:
    """A batch of cells: cell-table columns, their crops and the seconds spent on them per stage.

    ``unreadable`` records the tiles left out because their pixels cannot be decoded: one dict
    per tile with its ``tile`` id, level-0 ``origin`` and the ``problem``.
    """

    columns: dict[str, NDArray]
    crops: NDArray[np.uint8]
    seconds: dict[str, float] = field(default_factory=dict)
    unreadable: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.crops)

    @classmethod
    def concat(cls, parts: list[TileCells]) -> TileCells:
        names = parts[0].columns
        seconds: dict[str, float] = {}
        for part in parts:
            for stage, value in part.seconds.items():
                seconds[stage] = seconds.get(stage, 0.0) + value
        return cls(
            {name: np.concatenate([p.columns[name] for p in parts]) for name in names},
            np.concatenate([p.crops for p in parts]),
            seconds,
            [tile for part in parts for tile in part.unreadable],
        )

    def split(self, at: int) -> tuple[TileCells, TileCells]:
        """The first ``at`` cells, with the seconds and the unreadable tiles, and the rest."""
        head = {name: column[:at] for name, column in self.columns.items()}
        tail = {name: column[at:] for name, column in self.columns.items()}
        first = TileCells(head, self.crops[:at], self.seconds, self.unreadable)
        return first, TileCells(tail, self.crops[at:])


def plan_slide(
    slide: Slide,
    card: ClassifierCard,
    options: RunOptions,
    checksum: str | None = None,
    stem: str | None = None,
) -> SlidePlan:
    """Checksum the slide (unless given), score the smear, lay out tiles at the card's
    resolution, learn the slide's stain and nuclear-stain threshold, and (``options.adapt``)
    measure the colours of its cells, to which the classifier adapts.

    The checksum is computed on a second thread while the rest is planned; the ``open`` timing
    is the wait for it after planning. ``stem`` names the outputs (default: the slide's stem).
    """
    started = datetime.now(UTC).isoformat(timespec="seconds")
    timings: dict[str, float] = {}
    stage = stage_timer(timings)
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashing = None if checksum else pool.submit(slide_checksum, slide.info.path)
        with stage("plan"):
            thumbnail = slide.thumbnail(REGION_MPP)
            regions = score_regions(thumbnail, REGION_MPP)
            overlap_um = max(card.model.fov_um, DetectParams().max_diameter_um)
            grid = plan_tiles(slide.info.dimensions, slide.mpp, card.mpp, TILE_SIZE, overlap_um)
            classes = [regions.classify(tile)[0] for tile in grid]
            wanted = REGION_CHOICES[options.region]
            tiles = [tile for tile, c in zip(grid, classes, strict=True) if c in wanted]
            scale = slide.mpp / REGION_MPP
            region = region_rings(tiles, thumbnail.shape[:2], scale)
            sample = _sample_tiles(tiles)
            detect_params = _slide_params(slide, sample)
            overview, overview_scale = _report_thumbnail(slide, thumbnail)
        with stage("adapt"):
            colours, adaptation = _slide_colours(slide, sample, card, detect_params, options.adapt)
        with stage("open"):
            if hashing is not None:  # submitted exactly when no checksum was given
                checksum = hashing.result()
    attrs = {
        "run": {"started": started},
        "slide": {**slide.info.as_dict(), "sha256": checksum},
        "classifier": {**card.to_dict(), "path": str(card.path)},
        "parameters": options.as_dict(),
        "region": {
            "choice": options.region,
            "tiles_counted": len(tiles),
            "tile_classes": {c: classes.count(c) for c in REGION_CLASSES},
            "rings": [np.round(ring, 1).tolist() for ring in region],
        },
        "detection": {
            "stain": detect_params.stain.as_dict() if detect_params.stain else None,
            "threshold": round(float(detect_params.threshold or 0.0), 4),
            "warnings": detect_params.stain.warnings() if detect_params.stain else [],
        },
        "adaptation": adaptation,
    }
    return SlidePlan(
        stem=stem or slide_stem(slide.info.path),
        attrs=attrs,
        tiles=tiles,
        region=region,
        thumbnail=overview,
        thumbnail_scale=overview_scale,
        thumbnail_mpp=slide.mpp / overview_scale,
        detect_params=detect_params,
        slide_colours=colours,
        timings=timings,
    )


def _report_thumbnail(
    slide: Slide, thumbnail: NDArray[np.uint8]
) -> tuple[NDArray[np.uint8], float]:
    """The overview of the report, :data:`REPORT_THUMBNAIL_PX` on its longest side at most, and
    its pixels per level-0 pixel.

    A whole slide's overview is the region thumbnail (read at :data:`REGION_MPP`) shrunk; a
    small image, such as one microscope field, would be a few dozen pixels wide at that
    resolution, so it is read again, finer, up to its full resolution.
    """
    level0_px = max(slide.info.dimensions)
    overview_mpp = max(slide.mpp, level0_px * slide.mpp / REPORT_THUMBNAIL_PX)
    if overview_mpp < REGION_MPP:
        return slide.thumbnail(overview_mpp), slide.mpp / overview_mpp
    shrink = min(1.0, REPORT_THUMBNAIL_PX / max(thumbnail.shape[:2]))
    scale = slide.mpp / REGION_MPP
    if shrink == 1.0:
        return thumbnail, scale
    height, width = (max(1, round(n * shrink)) for n in thumbnail.shape[:2])
    image = Image.fromarray(thumbnail).resize((width, height), Image.Resampling.BOX)
    return np.asarray(image), scale * shrink


def _sample_tiles(tiles: list[Tile]) -> list[Tile]:
    """Up to :data:`SAMPLE_TILES` tiles spread evenly across the counted region."""
    if not tiles:
        return []
    picks = np.unique(np.linspace(0, len(tiles) - 1, SAMPLE_TILES).round().astype(int))
    return [tiles[i] for i in picks]


def _slide_params(slide: Slide, sample: list[Tile]) -> DetectParams:
    """Detection settings with the stain and threshold learned from the sample tiles."""
    images = []
    for tile in sample:
        try:
            images.append(slide.read_region(tile.origin, tile.read_size, tile.mpp))
        except UnreadableRegion:
            continue  # detection records the tile
    return slide_params(images, sample[0].mpp if sample else slide.mpp)


def _slide_colours(
    slide: Slide, sample: list[Tile], card: ClassifierCard, params: DetectParams, adapt: bool
) -> tuple[ColourMoments | None, dict[str, Any]]:
    """The colour moments of the cells of the sample tiles, and what the store records of
    the adaptation (whether it ran, and why not)."""
    record: dict[str, Any] = {"method": ADAPTATION_METHOD, "ran": False}
    if not adapt:
        return None, {**record, "reason": "turned off (--no-adapt)"}
    if not card.adaptation:
        return None, {**record, "reason": f"card {card.name!r} records no reference colours"}
    crops = detect_tiles(slide, sample, card, params).crops
    if len(crops) < MIN_CELLS:
        reason = f"{len(crops)} cells in {len(sample)} sample tiles; at least {MIN_CELLS} needed"
        return None, {**record, "reason": reason}
    colours = colour_moments(crops)
    nearest = nearest_reference(references(card.adaptation), colours)
    matched = {"matched_to": nearest.source} if nearest else {}
    return colours, {**record, "ran": True, "slide_colours": colours.as_dict(), **matched}


def detect_tiles(
    slide: Slide, tiles: Iterable[Tile], card: ClassifierCard, params: DetectParams
) -> TileCells:
    """Read tiles, find their white cells, keep those each tile owns and crop them for the card.

    A tile whose pixels cannot be decoded is left out and recorded in ``unreadable``.
    """
    start = time.perf_counter()
    size, fov = card.model.input_size, card.model.fov_um
    parts = []
    unreadable: list[dict[str, Any]] = []
    for tile in tiles:
        try:
            rgb = slide.read_region(tile.origin, tile.read_size, tile.mpp)
        except UnreadableRegion as error:
            where = {"tile": tile.id, "origin": list(tile.origin)}
            unreadable.append({**where, "problem": error.problem})
            continue
        found = detect_cells(rgb, tile.mpp, tile.origin, params, level0_mpp=slide.mpp)
        found = found.select(tile.owns(found.x, found.y))
        found.tile_id[:] = tile.id
        centres = np.column_stack([found.x, found.y])
        crops = crop_from_array(rgb, tile.mpp, centres, tile.origin, slide.mpp, fov, size)
        parts.append(TileCells(found.columns(), crops))
    cells = TileCells.concat(parts) if parts else _no_cells(size)
    cells.seconds = {"detect": time.perf_counter() - start}
    cells.unreadable = unreadable
    return cells


def _no_cells(crop_size: int) -> TileCells:
    columns = empty_columns(field_names("detect"))
    return TileCells(columns, np.zeros((0, crop_size, crop_size, 3), np.uint8))


def classify_cells(
    classifier: Classifier,
    cells: TileCells,
    tta: int = 0,
    slide_colours: ColourMoments | None = None,
) -> TileCells:
    """The same cells with ``probabilities``, ``top_class``, ``confidence``, ``agreement``,
    ``novelty`` and ``review_priority`` added; with ``slide_colours`` (the plan's) the
    classifier adapts to the slide."""
    start = time.perf_counter()
    prediction = classifier.predict(cells.crops, tta, slide_colours)
    probabilities = prediction.probabilities
    top = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(top)), top]
    # A cell unlike every known class (novelty > 1) weighs as a less confident one.
    familiarity = np.minimum(1.0, 1.0 / np.nan_to_num(prediction.novelty, nan=1.0))
    columns = {
        **cells.columns,
        "probabilities": probabilities,
        "top_class": top.astype(np.int16),
        "confidence": confidence,
        "agreement": prediction.agreement,
        "novelty": prediction.novelty,
        "review_priority": 1.0 - confidence * prediction.agreement * familiarity,
    }
    check_columns(columns, len(classifier.card.codes), required=field_names("detect", "classify"))
    seconds = {**cells.seconds, "classify": time.perf_counter() - start}
    return TileCells(columns, cells.crops, seconds, cells.unreadable)


def batched(
    parts: Iterable[TileCells], size: int, on_part: Callable[[], Any] | None = None
) -> Iterator[TileCells]:
    """Regroup per-tile cells into batches of exactly ``size`` cells (the last may be smaller).

    Equal batches give the classifier one input shape: oneDNN keeps the primitives of every
    shape it has run, so batches of varying size made memory grow through a run (60000² slide:
    peak RSS 2.2 GB against 1.6 GB). ``on_part`` is called after each part is taken, e.g. to
    advance a progress bar.
    """
    buffer: list[TileCells] = []
    held = 0
    for part in parts:
        buffer.append(part)
        held += len(part)
        if on_part:
            on_part()
        if held >= size:
            rest = TileCells.concat(buffer)
            while len(rest) >= size:
                batch, rest = rest.split(size)  # views: the cells are copied once
                yield batch
            buffer, held = ([rest] if len(rest) else []), len(rest)
    if buffer:
        yield TileCells.concat(buffer)


def stage_timer(timings: dict[str, float]) -> Callable[[str], Any]:
    @contextmanager
    def stage(name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start

    return stage


def unreadable_warning(unreadable: list[dict[str, Any]]) -> str:
    """One line on the tiles left out because they cannot be decoded (see :class:`TileCells`)."""
    shown = 3
    where = ", ".join(f"({x}, {y})" for x, y in (t["origin"] for t in unreadable[:shown]))
    more = f" and {len(unreadable) - shown} more" if len(unreadable) > shown else ""
    return (
        f"{len(unreadable)} unreadable tile{'s' if len(unreadable) > 1 else ''} left out of the "
        f"count: corrupt image data at level-0 {where}{more}"
    )
