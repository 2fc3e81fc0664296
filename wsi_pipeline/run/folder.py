"""Many slides (or one large one) on a Dask cluster, resumable, with a cohort table.

Each slide becomes a small task graph built from the stage functions of
:mod:`wsi_pipeline.run.stages`:

* ``prepare``: open the slide on a worker, checksum it, and either find its complete store from an
  earlier run with the same input, classifier and parameters (the slide is then reused) or plan it;
* ``detect``: read a group of tiles from the slide path and detect and crop their cells (workers
  read their own pixels; nothing is shipped from the client);
* ``classify``: class probabilities of one group's cells, annotated ``resources={"GPU": 1}`` when
  the cluster declares GPUs; the model is built once per worker by :class:`ClassifierPlugin`;
* ``aggregate``: pulls the classified groups one at a time and writes the store, the GeoJSON and
  the report; the store is committed atomically, so a killed run loses nothing that finished.

A slide that fails (corrupt file, missing microns per pixel, ...) is reported with its reason and
the others go on. A worker that dies is replaced by its nanny and its tasks rerun.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import zarr
from distributed import Client, Future, WorkerPlugin, as_completed, worker_client

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.core.files import exclusive_folder
from wsi_pipeline.image.detect import DetectParams
from wsi_pipeline.image.slide import Slide, open_slide, slide_checksum, slide_stem
from wsi_pipeline.model.adapt import ColourMoments
from wsi_pipeline.model.cards import ClassifierCard, resolve_card
from wsi_pipeline.model.classify import get_classifier
from wsi_pipeline.results.cohort import cohort_row
from wsi_pipeline.results.geojson import read_result_key as geojson_result_key
from wsi_pipeline.results.report import read_result_key as report_result_key
from wsi_pipeline.run.cluster import has_gpu_workers
from wsi_pipeline.run.options import RunOptions
from wsi_pipeline.run.publish import output_paths, result_key, write_outputs
from wsi_pipeline.run.stages import SlidePlan, TileCells, classify_cells, detect_tiles, plan_slide
from wsi_pipeline.run.tuning import tune_malloc

TILES_PER_TASK = 4


@dataclass(frozen=True)
class Reused:
    """A slide whose complete store already holds this input's result."""

    store: Path


@lru_cache(maxsize=8)
def _open(path: str, mpp: float | None) -> Slide:
    """One open slide per worker process and path."""
    slide = open_slide(path, mpp=mpp)
    slide.mpp  # noqa: B018 - a slide without a pixel size fails here, in prepare
    return slide


def _reusable(paths: dict[str, Path], key: str) -> bool:
    """Whether a complete store and the GeoJSON and report beside it all hold the result
    ``key`` (see :func:`~wsi_pipeline.run.publish.result_key`): other parameters, another card,
    a changed slide or a run killed between publishing its files all give other keys."""
    try:
        attrs: dict[str, Any] = zarr.open_group(paths["store"], mode="r").attrs.asdict()
    except (FileNotFoundError, ValueError, KeyError, OSError):
        return False
    return (
        attrs.get("status") == "complete"
        and attrs.get("result_key") == key
        and geojson_result_key(paths["geojson"]) == key
        and report_result_key(paths["report"]) == key
        and paths["cells_table"].is_file()  # written before the store is marked complete
    )


def output_stems(slides: Sequence[Path]) -> dict[Path, str]:
    """The name of each slide's outputs: its stem, or, where two slides share a stem (``a/x.svs``
    and ``b/x.svs``), its path below the slides' common folder with ``/`` as ``__``
    (``a__x``), so that no slide's outputs overwrite another's.

    Raises
    ------
    InputError
        When two slides would still share a name.
    """
    stems = {path: slide_stem(path) for path in slides}
    repeated = {s for s, n in Counter(stems.values()).items() if n > 1}
    if repeated:
        root = Path(os.path.commonpath([p.parent for p in slides]))
        for path, stem in stems.items():
            if stem in repeated:
                stems[path] = "__".join((*path.parent.relative_to(root).parts, stem))
    names = Counter(stems.values())
    clash = next((p for p, s in stems.items() if names[s] > 1), None)
    if clash is not None:
        raise InputError(
            clash, f"another slide's outputs would have the same name {stems[clash]!r}"
        )
    return stems


def prepare(
    path: str, stem: str, out: str, card: ClassifierCard, options: RunOptions
) -> SlidePlan | Reused:
    """Open, checksum and plan one slide, or find that its result already exists."""
    start = time.perf_counter()
    slide = _open(path, options.mpp)
    checksum = slide_checksum(path)
    paths = output_paths(Path(out), stem, options.zip_geojson)
    if _reusable(paths, result_key(checksum, card, options)):
        return Reused(paths["store"])
    plan = plan_slide(slide, card, options, checksum=checksum, stem=stem)
    plan.timings["open"] = time.perf_counter() - start - plan.timings["plan"]
    return plan


def detect(
    path: str, card: ClassifierCard, options: RunOptions, tiles: list, params: DetectParams
) -> TileCells:
    """Detect and crop the cells of a group of tiles, reading the slide on this worker."""
    slide = _open(path, options.mpp)
    return detect_tiles(slide, tiles, card, params)


def classify(
    cells: TileCells,
    card: ClassifierCard,
    options: RunOptions,
    slide_colours: ColourMoments | None,
) -> TileCells:
    """Class probabilities of one group's cells with this worker's model, adapted to the
    slide's colours when given."""
    classifier = get_classifier(card, options.device, options.batch_size, options.backend)
    return classify_cells(classifier, cells, options.tta, slide_colours)


def aggregate(
    plan: SlidePlan, dataset: str, card: ClassifierCard, options: RunOptions, out: str
) -> str:
    """Write one slide's outputs from its classified groups, pulled one at a time.

    The groups' futures come as a published dataset: futures passed as arguments would all be
    resolved into memory before the task starts.
    """
    classifier = get_classifier(card, options.device, options.batch_size, options.backend)
    with worker_client() as client:  # leaves the worker's thread pool while waiting
        batches = (future.result() for future in client.get_dataset(dataset))
        run = write_outputs(plan, batches, classifier, options, Path(out))
    return str(run.store)


class ClassifierPlugin(WorkerPlugin):
    """Builds the classifier once when a worker starts (and on any replacement worker)."""

    name = "wsi-pipeline-classifier"

    def __init__(self, card: ClassifierCard, options: RunOptions, gpu_cluster: bool):
        self.card = card
        self.options = options
        self.gpu_cluster = gpu_cluster

    def setup(self, worker: Any) -> None:
        import torch

        torch.set_num_threads(max(1, worker.state.nthreads))
        tune_malloc()
        if self.gpu_cluster and not worker.state.total_resources.get("GPU"):
            return  # CPU workers of a GPU cluster only read and detect
        options = self.options
        get_classifier(self.card, options.device, options.batch_size, options.backend)


def _unpublish(client: Client, dataset: str | None) -> None:
    if dataset is not None:
        client.unpublish_dataset(dataset)


def _failure(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def run_cohort(
    slides: Sequence[Path],
    out: Path,
    options: RunOptions,
    client: Client,
    card: ClassifierCard | None = None,
) -> Iterator[dict]:
    """Process slides on a cluster; yield each slide's cohort row as it finishes.

    Parameters
    ----------
    slides : sequence of Path
    out : Path
        Output folder; the stores, GeoJSON, reports and the cohort table go there.
    options : RunOptions
    client : distributed.Client
    card : ClassifierCard, optional
        The card of ``options.classifier``, if already resolved.

    Yields
    ------
    dict
        A :func:`cohort_row`, in the order slides finish.
    """
    card = resolve_card(card or options.classifier)
    stems = output_stems(slides)
    with exclusive_folder(out):  # refuses at once when another run writes there
        gpu = has_gpu_workers(client)
        client.register_plugin(ClassifierPlugin(card, options, gpu))
        target = str(out)
        by_future: dict[Future, tuple[Path, str]] = {}
        pending = as_completed()
        for rank, path in enumerate(slides):
            future = client.submit(
                prepare,
                str(path),
                stems[path],
                target,
                card,
                options,
                pure=False,
                priority=-3 * rank,
            )
            by_future[future] = (path, "prepare")
            pending.add(future)
        datasets: dict[Path, str] = {}  # each slide's classified groups, published until aggregated

        for future in pending:
            path, step = by_future.pop(future)
            rank = slides.index(path)
            try:
                result = future.result()
            except Exception as error:  # a slide's failure is reported, never fatal to the batch
                _unpublish(client, datasets.pop(path, None))
                yield cohort_row(path, "failed", reason=_failure(error))
                continue
            if step == "aggregate":
                _unpublish(client, datasets.pop(path, None))
                yield cohort_row(path, "complete", Path(result))
            elif isinstance(result, Reused):
                yield cohort_row(path, "reused", result.store)
            else:
                classified = []
                for start in range(0, len(result.tiles), TILES_PER_TASK):
                    group = result.tiles[start : start + TILES_PER_TASK]
                    cells = client.submit(
                        detect,
                        str(path),
                        card,
                        options,
                        group,
                        result.detect_params,
                        priority=-3 * rank + 1,
                    )
                    classified.append(
                        client.submit(
                            classify,
                            cells,
                            card,
                            options,
                            result.slide_colours,
                            resources={"GPU": 1} if gpu else None,
                            priority=-3 * rank + 2,
                        )
                    )
                datasets[path] = f"wsi-pipeline-{future.key}"
                client.publish_dataset(classified, name=datasets[path])
                final = client.submit(
                    aggregate, future, datasets[path], card, options, target, priority=-3 * rank
                )
                by_future[final] = (path, "aggregate")
                pending.add(final)
