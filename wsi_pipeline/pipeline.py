"""One slide through every stage: plan, detect, classify, explain, report.

The stage functions here take plain data and return plain data, so the same functions run in
process for one slide (:func:`run_slide`) and as Dask tasks for directories. Reading and
detection run up to :data:`PREFETCH_TILES` tiles ahead of classification on a background
thread, and the classifier's workers each take the next batch as soon as they are done; the
store and the GeoJSON are written as the cells stream past, and the store is marked complete
last.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image
from skimage import measure
from tqdm import tqdm

from wsi_pipeline import explain
from wsi_pipeline.cards import ClassifierCard, load_card
from wsi_pipeline.cells import (
    CONTOUR_VERTICES,
    DetectParams,
    detect_cells,
    slide_threshold,
)
from wsi_pipeline.classify import Classifier, get_classifier
from wsi_pipeline.counts import Differential, differential
from wsi_pipeline.crops import crop_from_array
from wsi_pipeline.geojson import GeoJSONWriter, hex_to_rgb
from wsi_pipeline.options import REGION_CHOICES, RunOptions
from wsi_pipeline.prefetch import prefetch
from wsi_pipeline.regions import CLASSES as REGION_CLASSES
from wsi_pipeline.regions import score_regions
from wsi_pipeline.report import write_report
from wsi_pipeline.slide import Slide, slide_checksum, slide_stem
from wsi_pipeline.store import ResultWriter
from wsi_pipeline.tiles import Tile, plan_tiles

REGION_MPP = 4.0  # thumbnail resolution for finding the countable smear: red cells ~2 px
TILE_SIZE = 1024  # tile side in pixels at the classifier's resolution
THRESHOLD_SAMPLE_TILES = 8  # tiles pooled to learn a slide's nuclear-stain threshold
REPORT_THUMBNAIL_PX = 1600  # longest side of the overview drawn in the report
#: Tiles detected ahead of classification: about 1,700 cells, 46 MB of 96-px crops. Detection
#: outpaces a CPU classifier, so this buffer fills and the classifier then takes every core.
PREFETCH_TILES = 128
#: Niceness added to the writing thread, which compresses and encodes in the time the
#: classifier leaves.
BACKGROUND_NICENESS = 10
#: Classified batches queued for writing before the classifier waits (one forward pass each).
WRITES_AHEAD = 8
#: Free memory a malloc heap keeps for reuse rather than giving it back (see :func:`tune_malloc`).
MALLOC_KEEP_MB = 512
#: glibc's ``mallopt`` parameters: the free memory kept at a heap's top, the most blocks mapped
#: on their own, the most arenas.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


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
    threshold : float
        The slide's nuclear-stain threshold for detection.
    timings : dict of str to float
        Seconds spent opening and planning.
    """

    stem: str
    attrs: dict[str, Any]
    tiles: list[Tile]
    region: list[NDArray[np.float64]]
    thumbnail: NDArray[np.uint8]
    thumbnail_scale: float
    threshold: float
    timings: dict[str, float]


@dataclass
class TileCells:
    """A batch of cells: cell-table columns, their crops and the seconds spent on them per stage."""

    columns: dict[str, NDArray]
    crops: NDArray[np.uint8]
    seconds: dict[str, float] = field(default_factory=dict)

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
        )

    def split(self, at: int) -> tuple[TileCells, TileCells]:
        """The first ``at`` cells, with the seconds, and the rest."""
        head = {name: column[:at] for name, column in self.columns.items()}
        tail = {name: column[at:] for name, column in self.columns.items()}
        return TileCells(head, self.crops[:at], self.seconds), TileCells(tail, self.crops[at:])


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


def plan_slide(
    slide: Slide, card: ClassifierCard, options: RunOptions, checksum: str | None = None
) -> SlidePlan:
    """Checksum the slide (unless given), score the smear, lay out tiles at the card's
    resolution and learn the slide's stain threshold.

    The checksum is computed on a second thread while the rest is planned; the ``open`` timing
    is the wait for it after planning.
    """
    timings: dict[str, float] = {}
    stage = _stage_timer(timings)
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
            region = _region_rings(tiles, thumbnail.shape[:2], scale)
            threshold = _slide_threshold(slide, tiles)
            overview, shrink = _report_thumbnail(thumbnail)
        with stage("open"):
            checksum = checksum or hashing.result()
    attrs = {
        "slide": {**slide.info.as_dict(), "sha256": checksum},
        "classifier": {**card.to_dict(), "path": str(card.path)},
        "parameters": options.as_dict(),
        "region": {
            "choice": options.region,
            "tiles_counted": len(tiles),
            "tile_classes": {c: classes.count(c) for c in REGION_CLASSES},
            "rings": [np.round(ring, 1).tolist() for ring in region],
        },
    }
    return SlidePlan(
        stem=slide_stem(slide.info.path),
        attrs=attrs,
        tiles=tiles,
        region=region,
        thumbnail=overview,
        thumbnail_scale=scale * shrink,
        threshold=threshold,
        timings=timings,
    )


def _report_thumbnail(thumbnail: NDArray[np.uint8]) -> tuple[NDArray[np.uint8], float]:
    """The thumbnail shrunk to at most :data:`REPORT_THUMBNAIL_PX` a side, and the factor."""
    shrink = min(1.0, REPORT_THUMBNAIL_PX / max(thumbnail.shape[:2]))
    if shrink == 1.0:
        return thumbnail, 1.0
    height, width = (max(1, round(n * shrink)) for n in thumbnail.shape[:2])
    image = Image.fromarray(thumbnail).resize((width, height), Image.BOX)
    return np.asarray(image), shrink


def _slide_threshold(slide: Slide, tiles: list[Tile]) -> float:
    """Nuclear-stain threshold learned from tiles spread evenly across the counted region."""
    if not tiles:
        return DetectParams().min_threshold
    picks = np.unique(np.linspace(0, len(tiles) - 1, THRESHOLD_SAMPLE_TILES).round().astype(int))
    samples = [slide.read_region(tiles[i].origin, tiles[i].read_size, tiles[i].mpp) for i in picks]
    return slide_threshold(samples, tiles[0].mpp)


def detect_tiles(
    slide: Slide, tiles: Iterable[Tile], card: ClassifierCard, threshold: float
) -> TileCells:
    """Read tiles, find their white cells, keep those each tile owns and crop them for the card."""
    start = time.perf_counter()
    params = DetectParams(threshold=threshold)
    size, fov = card.model.input_size, card.model.fov_um
    parts = []
    for tile in tiles:
        rgb = slide.read_region(tile.origin, tile.read_size, tile.mpp)
        found = detect_cells(rgb, tile.mpp, tile.origin, params, level0_mpp=slide.mpp)
        found = found.select(tile.owns(found.x, found.y))
        centres = np.column_stack([found.x, found.y])
        columns = {
            "x": found.x,
            "y": found.y,
            "bbox": found.bbox,
            "contour": found.contour,
            "area_um2": found.area_um2,
            "tile_id": np.full(len(found), tile.id, dtype=np.int32),
            "score": found.score,
        }
        crops = crop_from_array(rgb, tile.mpp, centres, tile.origin, slide.mpp, fov, size)
        parts.append(TileCells(columns, crops))
    cells = TileCells.concat(parts) if parts else _no_cells(size)
    cells.seconds = {"detect": time.perf_counter() - start}
    return cells


def _no_cells(crop_size: int) -> TileCells:
    columns = {
        "x": np.zeros(0),
        "y": np.zeros(0),
        "bbox": np.zeros((0, 4), np.int64),
        "contour": np.zeros((0, CONTOUR_VERTICES, 2), np.float32),
        "area_um2": np.zeros(0, np.float32),
        "tile_id": np.zeros(0, np.int32),
        "score": np.zeros(0, np.float32),
    }
    return TileCells(columns, np.zeros((0, crop_size, crop_size, 3), np.uint8))


def classify_cells(classifier: Classifier, cells: TileCells, tta: int = 0) -> TileCells:
    """The same cells with ``probabilities``, ``top_class`` and ``confidence`` added."""
    start = time.perf_counter()
    probabilities = classifier.predict_proba(cells.crops, tta)
    top = probabilities.argmax(axis=1)
    columns = {
        **cells.columns,
        "probabilities": probabilities,
        "top_class": top.astype(np.int16),
        "confidence": probabilities[np.arange(len(top)), top],
    }
    seconds = {**cells.seconds, "classify": time.perf_counter() - start}
    return TileCells(columns, cells.crops, seconds)


def lower_own_priority(step: int = BACKGROUND_NICENESS) -> None:
    """Add ``step`` to the calling thread's niceness, up to 19 (Linux only; elsewhere, or if
    refused, nothing changes)."""
    if sys.platform.startswith("linux"):
        thread_id = threading.get_native_id()
        with suppress(OSError):
            now = os.getpriority(os.PRIO_PROCESS, thread_id)
            os.setpriority(os.PRIO_PROCESS, thread_id, min(19, now + step))


def tune_malloc(arenas: int | None = None) -> None:
    """Make glibc's malloc reuse memory from batch to batch (Linux with glibc only; elsewhere
    nothing changes).

    * Large blocks come from the malloc heaps. By default glibc maps each block above a
      threshold (128 KB, rising to at most 32 MB) on its own and unmaps it when it is freed, so
      every batch's activations are faulted in and zeroed by the kernel again. On 2 cores the
      classifier spent about as long in the kernel as in its own code (6.4 s against 7.3 s for
      2,048 crops); with the memory kept, 0.1-0.8 s, and it classifies 1.7 times as many cells
      a second. Detection's arrays were reused already: its CPU time is the same either way.
    * Up to :data:`MALLOC_KEEP_MB` of free memory stays at the top of a heap for the next batch
      instead of going back to the system.
    * Threads started from now on share at most ``arenas`` arenas (default: one per core).
      glibc gives threads that allocate at the same time arenas of their own, up to eight per
      core, and an arena keeps the free memory of its busiest moment. The pipeline's reading,
      classifying and writing threads then hold several such peaks at once, and the free memory
      grows as the run goes on (60000² slide: 880 MB free inside the arenas at the end of a run,
      390 MB with one arena per core, at the same speed).
    """
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            mallopt = ctypes.CDLL("libc.so.6").mallopt
            mallopt(_M_MMAP_MAX, 0)
            mallopt(_M_TRIM_THRESHOLD, MALLOC_KEEP_MB << 20)
            mallopt(_M_ARENA_MAX, arenas or os.cpu_count() or 1)


def _keep_opencv_on_this_thread() -> None:
    """Run OpenCV on the calling thread alone (a process-wide setting), once detection is ahead
    of the classifier: OpenCV's own worker threads wait actively between calls, so they would
    take CPU from the classifier for little gain."""
    cv2.setNumThreads(1)


@contextmanager
def _restoring_opencv_threads() -> Iterator[None]:
    """Restore OpenCV's thread count (process-wide) when the block ends."""
    threads = cv2.getNumThreads()
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


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
    return {m: compute[m](model, chosen.crops, chosen.top, **norm) for m in methods}


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


def write_outputs(
    plan: SlidePlan,
    batches: Iterable[TileCells],
    classifier: Classifier,
    options: RunOptions,
    out_dir: Path,
) -> SlideRun:
    """Stream classified batches into the store and the GeoJSON, explain, count, and write
    every output.

    The store is committed (``status`` complete) only after the GeoJSON and the report exist.

    Parameters
    ----------
    plan : SlidePlan
    batches : iterable of TileCells
        Classified cells (see :func:`classify_cells`), in any grouping.
    classifier : Classifier
        For saliency (its first ensemble member).
    options : RunOptions
    out_dir : Path

    Returns
    -------
    SlideRun
    """
    card = classifier.card
    timings = dict(plan.timings)
    stage = _stage_timer(timings)
    paths = output_paths(out_dir, plan.stem, options.gzip_geojson)
    chosen = _Explained(options.saliency_cells)
    attrs = plan.attrs
    colours = {c.code: hex_to_rgb(c.colour) for c in card.classes}
    with (
        ResultWriter(out_dir, plan.stem, card.codes, card.model.input_size, attrs) as writer,
        GeoJSONWriter(
            paths["geojson"],
            card.codes,
            colours,
            region=plan.region,
            threshold=options.min_confidence,
        ) as features,
        # Compressing chunks and encoding GeoJSON run on a low-priority thread, in order, in the
        # time the classifier leaves.
        ThreadPoolExecutor(max_workers=1, initializer=lower_own_priority) as background,
    ):

        def write(cells: dict[str, NDArray], crops: NDArray[np.uint8]) -> None:
            writer.append_cells(cells, crops)
            features.write(cells)

        writing: deque[Future[None]] = deque()
        counted = 0
        for batch in batches:
            for name, seconds in batch.seconds.items():
                timings[name] = timings.get(name, 0.0) + seconds
            if not len(batch):
                continue
            with stage("write"):
                cells = {**batch.columns, "id": counted + np.arange(len(batch), dtype=np.int64)}
                writing.append(background.submit(write, cells, batch.crops))
                if options.saliency:
                    chosen.add(counted, cells, batch.crops)
                counted += len(batch)
                if len(writing) > WRITES_AHEAD:
                    writing.popleft().result()
        with stage("write"):
            for done in writing:
                done.result()

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
            features.commit()
            write_report(
                paths["report"],
                result,
                slide=attrs["slide"],
                classifier={"name": card.name, "caveat": card.caveat},
                parameters=attrs["parameters"],
                timings=timings,
                thumbnail=plan.thumbnail,
                thumbnail_scale=plan.thumbnail_scale,
                region=plan.region,
                mosaics=mosaics,
            )
        store = writer.commit(timings)
    return SlideRun(store, paths["geojson"], paths["report"], paths["mosaics"], result, timings)


def run_slide(slide: Slide, out_dir: Path, options: RunOptions, progress: bool = True) -> SlideRun:
    """Count the white cells of an open slide, in this process, and write every output.

    Reading and detection run ahead of classification on a background thread; the classifier's
    workers take one batch each at a time (:meth:`Classifier.stream`).

    Parameters
    ----------
    slide : Slide
        An open slide with a known microns per pixel.
    out_dir : Path
        Output folder.
    options : RunOptions
    progress : bool
        Show progress bars on stderr.

    Returns
    -------
    SlideRun
    """
    tune_malloc()
    card = load_card(options.classifier)
    classifier = get_classifier(card.path, options.device, options.batch_size)
    plan = plan_slide(slide, card, options)
    bar = tqdm(total=len(plan.tiles), desc="detect+classify", unit="tile", disable=not progress)

    def detect(tile: Tile) -> TileCells:
        return detect_tiles(slide, [tile], card, plan.threshold)

    def classify(cells: TileCells) -> TileCells:
        return classify_cells(classifier, cells, options.tta)

    def classified() -> Iterator[TileCells]:
        counted = 0
        ahead = prefetch(detect, plan.tiles, PREFETCH_TILES, _keep_opencv_on_this_thread)
        # One forward pass a batch, each worker taking the next batch when it is done.
        batches = batched(ahead, classifier.pass_size, bar.update)
        for batch in classifier.stream(classify, batches):
            counted += len(batch)
            bar.set_postfix(cells=counted)
            yield batch
        bar.close()

    # Closed on any error, so the classifier's workers stop and torch gets its threads back.
    with _restoring_opencv_threads(), closing(classified()) as batches:
        return write_outputs(plan, batches, classifier, options, out_dir)


def _write_mosaics(
    writer: ResultWriter, folder: Path, mosaics: dict[str, dict[str, NDArray[np.uint8]]]
) -> None:
    """Mosaics into the store (``mosaics/<method>/<class>``) and as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    for method, by_class in mosaics.items():
        for code, image in by_class.items():
            writer.write_mosaic(f"{method}/{code}", image)
            Image.fromarray(image).save(folder / f"{method}-{code}.png")
