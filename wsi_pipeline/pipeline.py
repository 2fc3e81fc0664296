"""One slide through every stage: plan, detect, classify, explain, report.

The stage functions here take plain data and return plain data, so the same functions run in
process for one slide (:func:`run_slide`) and as Dask tasks for directories. Reading and
detection run one tile ahead of classification on a background thread; the store, the GeoJSON
and the report are written as the cells stream past, and the store is marked complete last.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from skimage import measure
from tqdm import tqdm

from wsi_pipeline import explain
from wsi_pipeline.cards import ClassifierCard, load_card
from wsi_pipeline.cells import DetectParams, detect_cells, learn_threshold, nuclear_stain
from wsi_pipeline.classify import Classifier, get_classifier
from wsi_pipeline.counts import Differential, differential
from wsi_pipeline.crops import crop_from_array
from wsi_pipeline.geojson import hex_to_rgb, write_geojson
from wsi_pipeline.options import REGION_CHOICES, RunOptions
from wsi_pipeline.regions import CLASSES as REGION_CLASSES
from wsi_pipeline.regions import score_regions
from wsi_pipeline.report import write_report
from wsi_pipeline.slide import Slide, slide_checksum
from wsi_pipeline.store import ResultWriter
from wsi_pipeline.tiles import Tile, plan_tiles

REGION_MPP = 4.0  # thumbnail resolution for finding the countable smear: red cells ~2 px
TILE_SIZE = 1024  # tile side in pixels at the classifier's resolution
THRESHOLD_SAMPLE_TILES = 8  # tiles pooled to learn a slide's nuclear-stain threshold

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class SlidePlan:
    """Where one slide is counted.

    Attributes
    ----------
    tiles : list of Tile
        Tiles to count in, at the classifier's resolution.
    tile_classes : dict of str to int
        Number of tiles of the whole grid in each countability class.
    region : list of (K, 2) float arrays
        Outer rings of the counted region, level-0 pixels.
    thumbnail : (h, w, 3) uint8
        The slide at :data:`REGION_MPP`.
    thumbnail_mpp : float
    threshold : float
        The slide's nuclear-stain threshold for detection.
    """

    tiles: list[Tile]
    tile_classes: dict[str, int]
    region: list[NDArray[np.float64]]
    thumbnail: NDArray[np.uint8]
    thumbnail_mpp: float
    threshold: float


@dataclass
class TileCells:
    """Cells counted in one tile: the cell-table columns and their crops."""

    columns: dict[str, NDArray]
    crops: NDArray[np.uint8]

    def __len__(self) -> int:
        return len(self.crops)

    @classmethod
    def concat(cls, parts: list[TileCells]) -> TileCells:
        names = parts[0].columns
        return cls(
            {name: np.concatenate([p.columns[name] for p in parts]) for name in names},
            np.concatenate([p.crops for p in parts]),
        )


@dataclass
class SlideRun:
    """What one run produced."""

    store: Path
    geojson: Path
    report: Path
    mosaics: Path
    differential: Differential
    timings: dict[str, float] = field(default_factory=dict)


def _region_rings(tiles: list[Tile], shape: tuple[int, int], scale: float) -> list[NDArray]:
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


def plan_slide(slide: Slide, card: ClassifierCard, options: RunOptions) -> SlidePlan:
    """Score the smear, lay out tiles at the card's resolution and learn the stain threshold."""
    thumbnail = slide.thumbnail(REGION_MPP)
    regions = score_regions(thumbnail, REGION_MPP)
    overlap_um = max(card.model.fov_um, DetectParams().max_diameter_um)
    grid = plan_tiles(slide.info.dimensions, slide.mpp, card.mpp, TILE_SIZE, overlap_um)
    classes = [regions.classify(tile)[0] for tile in grid]
    wanted = REGION_CHOICES[options.region]
    tiles = [tile for tile, c in zip(grid, classes, strict=True) if c in wanted]
    scale = slide.mpp / REGION_MPP
    return SlidePlan(
        tiles=tiles,
        tile_classes={c: classes.count(c) for c in REGION_CLASSES},
        region=_region_rings(tiles, thumbnail.shape[:2], scale),
        thumbnail=thumbnail,
        thumbnail_mpp=REGION_MPP,
        threshold=_slide_threshold(slide, tiles),
    )


def _slide_threshold(slide: Slide, tiles: list[Tile]) -> float:
    """Nuclear-stain threshold pooled over tiles spread evenly across the counted region."""
    params = DetectParams()
    if not tiles:
        return params.min_threshold
    picks = np.unique(np.linspace(0, len(tiles) - 1, THRESHOLD_SAMPLE_TILES).round().astype(int))
    samples = []
    for i in picks:
        tile = tiles[i]
        size = tuple(max(1, round(s * tile.mpp / params.work_mpp)) for s in tile.read_size)
        samples.append(nuclear_stain(slide.read_region(tile.origin, size, params.work_mpp)).ravel())
    return learn_threshold(np.concatenate(samples), params)


def detect_tile(slide: Slide, tile: Tile, card: ClassifierCard, threshold: float) -> TileCells:
    """Read one tile, find its white cells, keep those it owns and crop them for the card."""
    rgb = slide.read_region(tile.origin, tile.read_size, tile.mpp)
    params = DetectParams(threshold=threshold)
    found = detect_cells(rgb, tile.mpp, tile.origin, params, level0_mpp=slide.mpp)
    found = found.select(tile.owns(found.x, found.y))
    centres = np.column_stack([found.x, found.y])
    crops = crop_from_array(
        rgb, tile.mpp, centres, tile.origin, slide.mpp, card.model.fov_um, card.model.input_size
    )
    columns = {
        "x": found.x,
        "y": found.y,
        "bbox": found.bbox,
        "contour": found.contour,
        "area_um2": found.area_um2,
        "tile_id": np.full(len(found), tile.id, dtype=np.int32),
        "score": found.score,
    }
    return TileCells(columns, crops)


def classify_cells(classifier: Classifier, cells: TileCells, tta: int = 0) -> dict[str, NDArray]:
    """Add ``probabilities``, ``top_class`` and ``confidence`` to a batch of cells."""
    probabilities = classifier.predict_proba(cells.crops, tta)
    top = probabilities.argmax(axis=1)
    return {
        **cells.columns,
        "probabilities": probabilities,
        "top_class": top.astype(np.int16),
        "confidence": probabilities[np.arange(len(top)), top],
    }


def prefetch(fn: Callable[[T], R], items: Iterable[T], depth: int = 2) -> Iterator[R]:
    """``map(fn, items)`` computed ``depth`` items ahead on a background thread, in order."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > depth:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def batched(parts: Iterable[TileCells], size: int) -> Iterator[TileCells]:
    """Regroup per-tile cells into batches of at least ``size`` cells (the last may be smaller)."""
    buffer: list[TileCells] = []
    held = 0
    for part in parts:
        if len(part):
            buffer.append(part)
            held += len(part)
        if held >= size:
            yield TileCells.concat(buffer)
            buffer, held = [], 0
    if buffer:
        yield TileCells.concat(buffer)


class _Explained:
    """The most confident cells of each class seen so far, with their crops."""

    def __init__(self, per_class: int | None):
        self.per_class = per_class
        self.index = np.zeros(0, dtype=np.int64)
        self.top = np.zeros(0, dtype=np.int16)
        self.confidence = np.zeros(0, dtype=np.float32)
        self.crops: NDArray[np.uint8] | None = None

    def add(self, first_index: int, cells: dict[str, NDArray], crops: NDArray[np.uint8]) -> None:
        index = np.concatenate([self.index, first_index + np.arange(len(crops))])
        top = np.concatenate([self.top, cells["top_class"]])
        confidence = np.concatenate([self.confidence, cells["confidence"]])
        all_crops = crops if self.crops is None else np.concatenate([self.crops, crops])
        keep = explain.select_cells(top, confidence, self.per_class)
        self.index, self.top, self.confidence = index[keep], top[keep], confidence[keep]
        self.crops = all_crops[keep]


def explain_cells(
    classifier: Classifier, chosen: _Explained, methods: tuple[str, ...]
) -> dict[str, NDArray[np.float32]]:
    """Raw saliency maps of the chosen cells for each method (first ensemble member)."""
    if chosen.crops is None or not len(chosen.index) or not methods:
        return {}
    model, card = classifier.models[0], classifier.card
    norm = {"mean": card.model.mean, "std": card.model.std}
    compute = {"gradcam": explain.gradcam, "smoothgrad": explain.smoothgrad}
    with torch_grad_enabled():
        return {m: compute[m](model, chosen.crops, chosen.top, **norm) for m in methods}


@contextmanager
def torch_grad_enabled() -> Iterator[None]:
    import torch

    with torch.enable_grad():
        yield


def _stage_timer(timings: dict[str, float]) -> Callable[[str], Any]:
    @contextmanager
    def stage(name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start

    return stage


def output_paths(out_dir: Path, stem: str, gzip_geojson: bool) -> dict[str, Path]:
    """Where a slide's outputs go: ``OUT/<stem>.zarr``, ``.geojson[.gz]``, ``.report.html``."""
    return {
        "store": out_dir / f"{stem}.zarr",
        "geojson": out_dir / f"{stem}.geojson{'.gz' if gzip_geojson else ''}",
        "report": out_dir / f"{stem}.report.html",
        "mosaics": out_dir / f"{stem}.mosaics",
    }


def run_slide(slide: Slide, out_dir: Path, options: RunOptions, progress: bool = True) -> SlideRun:
    """Count the white cells of an open slide and write its store, GeoJSON and report.

    Parameters
    ----------
    slide : Slide
        An open slide with a known microns per pixel.
    out_dir : Path
        Output folder.
    options : RunOptions
    progress : bool
        Show a progress bar per stage on stderr.

    Returns
    -------
    SlideRun
    """
    timings: dict[str, float] = {}
    stage = _stage_timer(timings)
    stem = slide.info.path.name.split(".")[0] if slide.info.path.is_file() else slide.info.path.name
    paths = output_paths(out_dir, stem, options.gzip_geojson)

    with stage("open"):
        card = load_card(options.classifier)
        classifier = get_classifier(card.path, options.device, options.batch_size)
        checksum = slide_checksum(slide.info.path)
    with stage("plan"):
        plan = plan_slide(slide, card, options)

    attrs = {
        "slide": {**slide.info.as_dict(), "sha256": checksum},
        "classifier": {**card.to_dict(), "path": str(card.path)},
        "parameters": options.as_dict(),
        "region": {
            "choice": options.region,
            "tiles_counted": len(plan.tiles),
            "tile_classes": plan.tile_classes,
            "rings": [np.round(ring, 1).tolist() for ring in plan.region],
        },
    }
    chosen = _Explained(options.saliency_cells)
    with ResultWriter(out_dir, stem, card.codes, card.model.input_size, attrs) as writer:
        bar = tqdm(total=len(plan.tiles), desc="detect+classify", unit="tile", disable=not progress)
        detected = prefetch(lambda t: detect_tile(slide, t, card, plan.threshold), plan.tiles)

        def counted(parts: Iterator[TileCells]) -> Iterator[TileCells]:
            for part in parts:
                bar.update()
                yield part

        start = time.perf_counter()
        for batch in batched(counted(detected), classifier.batch_size):
            with stage("classify"):
                cells = classify_cells(classifier, batch, options.tta)
            first = writer.n_cells
            cells["id"] = first + np.arange(len(batch), dtype=np.int64)
            writer.append_cells(cells, batch.crops)
            chosen.add(first, cells, batch.crops)
            bar.set_postfix(cells=writer.n_cells)
        bar.close()
        timings["detect"] = time.perf_counter() - start - timings.get("classify", 0.0)

        with stage("explain"):
            maps = explain_cells(classifier, chosen, options.saliency)
            if maps:
                writer.append_saliency(chosen.index, maps)
            mosaics = {
                m: explain.class_mosaics(chosen.crops, maps[m], chosen.top, card.codes)
                for m in maps
            }

        with stage("report"):
            top_class, confidence = writer.read_columns("top_class", "confidence")
            result = differential(
                np.asarray(card.codes)[top_class],
                confidence,
                card.codes,
                threshold=options.min_confidence,
            )
            writer.write_counts(result)
            _write_mosaics(writer, paths["mosaics"], mosaics)
            colours = {c.code: hex_to_rgb(c.colour) for c in card.classes}
            write_geojson(
                paths["geojson"],
                writer.iter_cells(),
                card.codes,
                colours,
                region=plan.region,
                threshold=options.min_confidence,
            )
            write_report(
                paths["report"],
                result,
                slide=attrs["slide"],
                classifier={"name": card.name, "caveat": card.caveat},
                parameters=options.as_dict(),
                timings=timings,
                thumbnail=plan.thumbnail,
                thumbnail_scale=slide.mpp / plan.thumbnail_mpp,
                region=plan.region,
                mosaics=mosaics,
            )
        store = writer.commit(timings)
    return SlideRun(store, paths["geojson"], paths["report"], paths["mosaics"], result, timings)


def _write_mosaics(
    writer: ResultWriter, folder: Path, mosaics: dict[str, dict[str, NDArray[np.uint8]]]
) -> None:
    """Mosaics into the store (``mosaics/<method>/<class>``) and as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    for method, by_class in mosaics.items():
        for code, image in by_class.items():
            writer.write_mosaic(f"{method}/{code}", image)
            Image.fromarray(image).save(folder / f"{method}-{code}.png")
