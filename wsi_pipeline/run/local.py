"""One slide through every stage, in this process.

Reading and detection run up to :data:`PREFETCH_TILES` tiles ahead of classification on a
background thread, and the classifier's workers each take the next batch as soon as they are
done; the store and the GeoJSON are written as the cells stream past (:mod:`.publish`), and the
store is marked complete last.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import closing
from pathlib import Path

from tqdm import tqdm

from wsi_pipeline.core.files import exclusive_folder
from wsi_pipeline.core.prefetch import prefetch
from wsi_pipeline.image.slide import Slide
from wsi_pipeline.image.tiles import Tile
from wsi_pipeline.model.cards import ClassifierCard, resolve_card
from wsi_pipeline.model.classify import get_classifier
from wsi_pipeline.run.options import RunOptions
from wsi_pipeline.run.publish import SlideRun, write_outputs
from wsi_pipeline.run.stages import TileCells, batched, classify_cells, detect_tiles, plan_slide
from wsi_pipeline.run.tuning import (
    keep_opencv_on_this_thread,
    restoring_opencv_threads,
    tune_malloc,
)

__all__ = ["PREFETCH_TILES", "run_slide"]

#: Tiles detected ahead of classification: about 1,700 cells, 46 MB of 96-px crops. Detection
#: outpaces a CPU classifier, so this buffer fills and the classifier then takes every core.
PREFETCH_TILES = 128


def run_slide(
    slide: Slide,
    out_dir: Path,
    options: RunOptions,
    progress: bool = True,
    card: ClassifierCard | None = None,
) -> SlideRun:
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
    card : ClassifierCard, optional
        The card of ``options.classifier``, if already resolved.

    Returns
    -------
    SlideRun
    """
    with exclusive_folder(out_dir):  # refuses at once when another run writes there
        tune_malloc()
        card = resolve_card(card or options.classifier)
        classifier = get_classifier(card, options.device, options.batch_size, options.backend)
        plan = plan_slide(slide, card, options)
        bar = tqdm(total=len(plan.tiles), desc="detect+classify", unit="tile", disable=not progress)

        def detect(tile: Tile) -> TileCells:
            return detect_tiles(slide, [tile], card, plan.detect_params)

        def classify(cells: TileCells) -> TileCells:
            return classify_cells(classifier, cells, options.tta, plan.slide_colours)

        def classified() -> Generator[TileCells, None, None]:
            counted = 0
            ahead = prefetch(detect, plan.tiles, PREFETCH_TILES, keep_opencv_on_this_thread)
            # One forward pass a batch, each worker taking the next batch when it is done.
            batches = batched(ahead, classifier.pass_size, bar.update)
            for batch in classifier.stream(classify, batches):
                counted += len(batch)
                bar.set_postfix(cells=counted)
                yield batch
            bar.close()

        # Closed on any error, so the classifier's workers stop and torch gets its threads back.
        with restoring_opencv_threads(), closing(classified()) as batches:
            return write_outputs(plan, batches, classifier, options, out_dir, progress)
