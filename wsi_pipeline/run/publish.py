"""The last stage of a slide: stream its classified cells into the store and the GeoJSON,
explain the most confident cells, count, and publish every output."""

from __future__ import annotations

import copy
import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from wsi_pipeline.core.errors import SlideError
from wsi_pipeline.model import explain
from wsi_pipeline.model.cards import ClassifierCard
from wsi_pipeline.model.classify import Classifier
from wsi_pipeline.model.mosaics import class_mosaics
from wsi_pipeline.results.cells_table import write_cells_parquet
from wsi_pipeline.results.counts import Differential, differential
from wsi_pipeline.results.geojson import GeoJSONWriter
from wsi_pipeline.results.plausibility import Finding
from wsi_pipeline.results.report import write_report
from wsi_pipeline.results.store_writer import ResultWriter
from wsi_pipeline.run.options import RunOptions
from wsi_pipeline.run.stages import SlidePlan, TileCells, stage_timer, unreadable_warning
from wsi_pipeline.run.tuning import lower_own_priority

__all__ = ["ExplainedCells", "SlideRun", "explain_cells", "output_paths", "write_outputs"]

#: Classified batches queued for writing before the classifier waits (one forward pass each).
WRITES_AHEAD = 8
#: Parameters that change how fast results come, or whether a run stops, not what a complete
#: result is (every backend gives the same probabilities within 1e-4).
RESULT_NEUTRAL = ("device", "backend", "batch_size", "on_bad_tile")


@dataclass
class SlideRun:
    """What one run produced; ``unreadable_tiles`` as in :class:`TileCells`."""

    store: Path
    geojson: Path
    report: Path
    mosaics: Path
    cells_table: Path
    differential: Differential
    timings: dict[str, float] = field(default_factory=dict)
    unreadable_tiles: list[dict[str, Any]] = field(default_factory=list)


class ExplainedCells:
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
    classifier: Classifier,
    chosen: ExplainedCells,
    methods: tuple[str, ...],
    progress: bool = False,
) -> dict[str, NDArray[np.float32]]:
    """Raw saliency maps of the chosen cells for each method (first ensemble member).

    Saliency runs on a private copy of the network: Grad-CAM hooks its target layer, and the
    shared model of a worker classifies and explains other slides on other threads meanwhile.
    ``progress`` shows one bar per method on stderr.
    """
    if chosen.crops is None or not len(chosen.index) or not methods:
        return {}
    model, card = copy.deepcopy(classifier.models[0]), classifier.card
    # Only input gradients are wanted: frozen weights spare the backward pass their gradients.
    model.requires_grad_(False)
    options = {"mean": card.model.mean, "std": card.model.std, "progress": progress}
    compute: dict[str, Callable[..., NDArray[np.float32]]] = {
        "gradcam": explain.gradcam,
        "smoothgrad": explain.smoothgrad,
    }
    return {m: compute[m](model, chosen.crops, chosen.top, **options) for m in methods}


def result_key(slide_sha256: str, card: ClassifierCard, options: RunOptions) -> str:
    """What identifies one slide's result: the slide's checksum, the card's weights and every
    parameter that changes the result (not :data:`RESULT_NEUTRAL`).

    The store, the GeoJSON and the report each record it, so a resumed run can tell three
    outputs of one result from a mixture left by an interrupted one.
    """
    parameters = {k: v for k, v in options.as_dict().items() if k not in RESULT_NEUTRAL}
    document = {
        "slide": slide_sha256,
        "weights": [w.sha256 for w in card.weights],
        "parameters": parameters,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def output_paths(out_dir: Path, stem: str, zip_geojson: bool) -> dict[str, Path]:
    """Where a slide's outputs go: ``OUT/<stem>.zarr``, ``.geojson[.zip]``, ``.report.html``,
    ``.mosaics/``, ``.cells.parquet``."""
    return {
        "store": out_dir / f"{stem}.zarr",
        "geojson": out_dir / f"{stem}.geojson{'.zip' if zip_geojson else ''}",
        "report": out_dir / f"{stem}.report.html",
        "mosaics": out_dir / f"{stem}.mosaics",
        "cells_table": out_dir / f"{stem}.cells.parquet",
    }


def write_outputs(
    plan: SlidePlan,
    batches: Iterable[TileCells],
    classifier: Classifier,
    options: RunOptions,
    out_dir: Path,
    progress: bool = False,
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
    progress : bool
        Show progress bars of saliency on stderr.

    Returns
    -------
    SlideRun
    """
    card = classifier.card
    timings = dict(plan.timings)
    stage = stage_timer(timings)
    paths = output_paths(out_dir, plan.stem, options.zip_geojson)
    chosen = ExplainedCells(options.saliency_cells)
    key = result_key(plan.attrs["slide"]["sha256"], card, options)
    # What ran, where the parameters hold what was asked for ("auto").
    inference = {"backend": classifier.backend, "device": str(classifier.device)}
    attrs = {**plan.attrs, "inference": inference, "result_key": key}
    with (
        ResultWriter(out_dir, plan.stem, card.codes, card.model.input_size, attrs) as writer,
        GeoJSONWriter(
            paths["geojson"],
            card.codes,
            attrs["slide"]["sha256"],
            region=plan.region,
            threshold=options.min_confidence,
            min_agreement=options.min_agreement,
            result_key=key,
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
        unreadable: list[dict[str, Any]] = []
        for batch in batches:
            for name, seconds in batch.seconds.items():
                timings[name] = timings.get(name, 0.0) + seconds
            unreadable += batch.unreadable
            if unreadable and options.on_bad_tile == "stop":
                hint = "--on-bad-tile skip leaves such tiles out of the count"
                raise SlideError(attrs["slide"]["path"], f"{unreadable[0]['problem']}; {hint}")
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
            maps = explain_cells(classifier, chosen, options.saliency, progress)
            if maps:
                writer.append_saliency(chosen.index, maps)
            mosaics = {
                m: class_mosaics(
                    chosen.crops, maps[m], chosen.top, card.codes, chosen.index, chosen.confidence
                )
                for m in maps
                if chosen.crops is not None  # maps is empty without crops
            }

        with stage("report"):
            top_class, confidence, agreement, novelty = writer.read_columns(
                "top_class", "confidence", "agreement", "novelty"
            )
            result = differential(
                np.asarray(card.codes)[top_class],
                confidence,
                card.codes,
                threshold=options.min_confidence,
                agreement=agreement,
                min_agreement=options.min_agreement,
                specimen=options.specimen,
                novelty=novelty,
            )
            stain_warnings = attrs["detection"]["warnings"]
            if stain_warnings:
                # The slide's stain estimate collapsed: detection may be wrong for it.
                said = f"detection may be wrong for this slide: {'; '.join(stain_warnings)}"
                result = result.with_findings(Finding("caution", "quality", "stain", said))
            if unreadable:
                said = unreadable_warning(unreadable)
                result = result.with_findings(Finding("caution", "quality", "tiles", said))
            run = {**attrs["run"], "finished": datetime.now(UTC).isoformat(timespec="seconds")}
            writer.update_attrs(
                unreadable_tiles={"count": len(unreadable), "tiles": unreadable}, run=run
            )
            writer.write_counts(result)
            write_cells_parquet(
                paths["cells_table"],
                writer.read_rows,
                writer.n_cells,
                card.codes,
                threshold=options.min_confidence,
                min_agreement=options.min_agreement,
            )
            writer.write_image("overview", plan.thumbnail, plan.thumbnail_mpp)
            _write_mosaics(
                writer, paths["mosaics"], mosaics, card.model.fov_um / card.model.input_size
            )
            features.commit()
            write_report(
                paths["report"],
                result,
                slide=attrs["slide"],
                classifier={"name": card.name, "caveat": card.caveat},
                parameters=attrs["parameters"],
                timings=timings,
                run=run,
                thumbnail=plan.thumbnail,
                thumbnail_scale=plan.thumbnail_scale,
                region=plan.region,
                mosaics=mosaics,
                result_key=key,
            )
        # The store last: a complete store always has its GeoJSON and report beside it.
        store = writer.commit(timings)
    outputs = (store, paths["geojson"], paths["report"], paths["mosaics"], paths["cells_table"])
    return SlideRun(*outputs, result, timings, unreadable)


def _write_mosaics(
    writer: ResultWriter,
    folder: Path,
    mosaics: dict[str, dict[str, NDArray[np.uint8]]],
    crop_pixel_um: float,
) -> None:
    """Mosaics into the store (``mosaics/<method>/<class>``, and as NGFF images
    ``images/mosaics/<method>-<class>``) and as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    for method, by_class in mosaics.items():
        for code, image in by_class.items():
            writer.write_mosaic(f"{method}/{code}", image)
            writer.write_image(f"mosaics/{method}-{code}", image, crop_pixel_um)
            Image.fromarray(image).save(folder / f"{method}-{code}.png")
