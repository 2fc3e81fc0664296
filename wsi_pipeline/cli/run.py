"""``wsi run SLIDE`` (and ``wsi-run``, its shortcut): count one slide in process, or a folder of
slides on a Dask cluster."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from wsi_pipeline.cli.errors import BadInput, Command
from wsi_pipeline.cli.options import Fraction, adapt_option, backend_option, device_option
from wsi_pipeline.core.errors import InputError
from wsi_pipeline.core.files import exclusive_folder
from wsi_pipeline.results.plausibility import SPECIMENS, counted_noun
from wsi_pipeline.run.cluster import DEFAULT_WORKFLOW
from wsi_pipeline.run.options import (
    BAD_TILE_CHOICES,
    DEFAULT_CELLS_PER_CLASS,
    DEFAULT_CONFIDENCE_THRESHOLD,
    DEFAULT_MIN_AGREEMENT,
    REGION_CHOICES,
    SALIENCY_METHODS,
    RunOptions,
)

if TYPE_CHECKING:
    from wsi_pipeline.model.cards import ClassifierCard

__all__ = ["run", "run_shortcut"]

SALIENCY = ",".join(SALIENCY_METHODS)


def _saliency_methods(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    methods = () if value == "none" else tuple(m.strip() for m in value.split(",") if m.strip())
    unknown = set(methods) - set(SALIENCY_METHODS)
    if unknown:
        raise click.BadParameter(f"unknown method {', '.join(sorted(unknown))}; use {SALIENCY}")
    return methods


def _cells_per_class(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    if value == "all":
        return None
    if not value.isdigit():
        raise click.BadParameter(f"expected a whole number or 'all', got {value!r}")
    return int(value)


@click.command(cls=Command)
@click.argument("slide", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("wsi-output"),
    show_default=True,
    help="Folder for <slide-stem>.zarr, .geojson and .report.html.",
)
@click.option(
    "--classifier",
    default="default",
    show_default=True,
    help="Classifier card: a name from classifiers/ or a path to a .toml card.",
)
@click.option(
    "--mpp",
    type=float,
    default=None,
    show_default="read from the slide",
    help="Level-0 microns per pixel, for slides that do not record it (or record it wrongly).",
)
@device_option()
@backend_option()
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    show_default="64 on CPU, from free memory on a GPU",
    help="Crops per classifier forward pass.",
)
@click.option(
    "--saliency",
    default=SALIENCY,
    show_default=True,
    callback=_saliency_methods,
    help="Saliency methods, comma-separated, or 'none'.",
)
@click.option(
    "--saliency-cells",
    default=str(DEFAULT_CELLS_PER_CLASS),
    show_default=True,
    callback=_cells_per_class,
    help="Most confident cells explained per class, or 'all'.",
)
@click.option(
    "--region",
    type=click.Choice(sorted(REGION_CHOICES)),
    default="monolayer",
    show_default=True,
    help="Count in monolayer tiles only (as a haematologist does) or in all of the smear.",
)
@click.option(
    "--specimen",
    type=click.Choice(SPECIMENS),
    default="marrow",
    show_default=True,
    help="What the slide holds: a bone-marrow aspirate or a blood smear. Chooses the reference "
    "ranges the differential is checked against and the least count (500 or 200 cells).",
)
@click.option(
    "--min-confidence",
    type=Fraction(),
    default=DEFAULT_CONFIDENCE_THRESHOLD,
    show_default=True,
    help="Cells below this top-class probability are counted as uncertain, not assigned.",
)
@click.option(
    "--min-agreement",
    type=Fraction(),
    default=DEFAULT_MIN_AGREEMENT,
    show_default=True,
    help="Cells whose top class fewer than this share of the ensemble's snapshots share are "
    "counted as uncertain.",
)
@click.option(
    "--tta",
    type=click.IntRange(0, 8),
    default=0,
    show_default=True,
    help="Test-time augmentation: number of flips/90-degree rotations averaged (0 = none).",
)
@adapt_option("each slide: its cells'")
@click.option(
    "--zip",
    "zip_geojson",
    is_flag=True,
    help="Write <slide-stem>.geojson.zip (deflated; QuPath 0.4-0.6 imports it as it is).",
)
@click.option(
    "--gzip",
    "gzip_geojson",
    is_flag=True,
    hidden=True,
    help="Deprecated: QuPath cannot import .geojson.gz; same as --zip.",
)
@click.option(
    "--on-bad-tile",
    type=click.Choice(BAD_TILE_CHOICES),
    default="skip",
    show_default=True,
    help="A tile whose image data cannot be decoded: leave it out of the count (and say so in "
    "the store, the report and on stderr), or stop the run.",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="tcp://HOST:PORT",
    help="Run on an existing Dask cluster.",
)
@click.option(
    "--workflow",
    default=None,
    show_default="local-cpu for a folder; in-process for one slide",
    help="Cluster spec: a name from workflows/ (local-cpu, gpu-node, slurm) or a .toml path.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--verbose", is_flag=True, help="Show the Dask cluster's informational messages.")
def run(
    slide: Path,
    out: Path,
    mpp: float | None,
    scheduler: str | None,
    workflow: str | None,
    quiet: bool,
    verbose: bool,
    gzip_geojson: bool,
    **settings,
) -> None:
    """Count the white cells of SLIDE: a slide file, a DICOM folder or a folder of slides.

    Writes OUT/<slide-stem>.zarr (cells, crops, saliency, the differential), a QuPath GeoJSON
    and an HTML report per slide. A folder of slides runs on a Dask cluster (a local one unless
    --scheduler or --workflow says otherwise) and adds OUT/cohort.csv and OUT/cohort.parquet.
    """
    from wsi_pipeline.image.slide import find_slides

    if gzip_geojson:  # it wrote .geojson.gz, which QuPath does not import
        click.echo("warning: --gzip is deprecated; writing .geojson.zip (--zip)", err=True)
        settings["zip_geojson"] = True
    options = RunOptions(mpp=mpp, **settings)
    slides = find_slides(slide)
    # Held before anything loads: a second run into OUT is refused at once.
    with exclusive_folder(out):
        _check_writable(out)
        if scheduler or workflow or slides != [slide]:
            spec = workflow or DEFAULT_WORKFLOW
            _run_on_cluster(slides, out, options, scheduler, spec, verbose)
        else:
            _run_in_process(slide, out, options, quiet)


#: Bytes written to OUT before a run starts: a full disk fails here, not after the model loads.
PROBE_BYTES = 2**20


def _check_writable(out: Path) -> None:
    """Write a probe file in OUT (which exists: the run holds it), and leave no trace: refuse an
    unwritable folder or a full disk."""
    try:
        with tempfile.TemporaryFile(dir=out) as probe:  # unnamed: gone when closed
            probe.write(bytes(PROBE_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise InputError(out, f"cannot write into the output folder: {error.strerror}") from error


def _resolve_card(options: RunOptions) -> ClassifierCard:
    """The run's card, resolved once and passed down; its caveat goes to stderr."""
    # Deferred: torch and timm take seconds to import, and bad input should fail fast.
    from wsi_pipeline.model.cards import load_card

    card = load_card(options.classifier)
    click.echo(f"{card.name}: {card.caveat}", err=True)
    return card


def _run_in_process(path: Path, out: Path, options: RunOptions, quiet: bool) -> None:
    from wsi_pipeline.image.slide import open_slide

    with open_slide(path, mpp=options.mpp) as opened:
        opened.mpp  # noqa: B018 - refuse a slide without a pixel size before any work
        card = _resolve_card(options)
        from wsi_pipeline.run.local import run_slide

        outcome = run_slide(opened, out, options, progress=not quiet, card=card)
    if outcome.unreadable_tiles:
        from wsi_pipeline.run.stages import unreadable_warning

        click.echo(f"warning: {path}: {unreadable_warning(outcome.unreadable_tiles)}", err=True)
    click.echo(_run_summary(path, outcome))


def _run_on_cluster(
    slides: list[Path],
    out: Path,
    options: RunOptions,
    scheduler: str | None,
    workflow: str,
    verbose: bool,
) -> None:
    from wsi_pipeline.run.cluster import dask_client, load_workflow

    spec = load_workflow(workflow)
    card = _resolve_card(options)
    from wsi_pipeline.results.cohort import write_cohort_table
    from wsi_pipeline.run.folder import run_cohort

    if options.device == "auto":
        options = dataclasses.replace(options, device=spec.device)
    rows = []
    with dask_client(spec, scheduler, verbose) as client:
        click.echo(f"Dask dashboard: {client.dashboard_link}", err=True)
        for row in run_cohort(slides, out, options, client, card=card):
            rows.append(row)
            detail = row["reason"] or counted_noun(row.get("cells", 0))
            click.echo(f"[{len(rows)}/{len(slides)}] {row['slide']}: {row['status']} ({detail})")
            write_cohort_table(rows, out)
    csv_path, _, page = write_cohort_table(rows, out)
    failed = [r for r in rows if r["status"] == "failed"]
    counted = f"{len(rows) - len(failed)} of {len(rows)} slides counted"
    click.echo(f"{counted}; table: {csv_path}; page: {page}")
    if failed:
        raise BadInput(f"{len(failed)} of {len(rows)} slides failed; reasons in {csv_path}")


def _run_summary(path: Path, outcome) -> str:
    """Short closing table: cells counted, the differential by group, where outputs are."""
    from wsi_pipeline.results.report import blast_text, me_text

    result = outcome.differential
    found = counted_noun(result.total_cells, "white cell")
    lines = [f"{path}: {found}, {result.countable} countable"]
    if result.no_white_cells:
        lines.append("  no white cells found: no differential")
    for row in result.groups:
        if row.count:
            lines.append(f"  {row.key:<16}{row.count:>6}  {row.percent:5.1f} %")
    lines.append(f"  blasts {blast_text(result)}")
    lines.append(f"  M:E {me_text(result)}")
    lines += [f"  {f.severity}: {f.message}" for f in result.findings if f.severity != "info"]
    notes = sum(f.severity == "info" for f in result.findings)
    if notes:
        lines.append(f"  {counted_noun(notes, 'more note')} in the report")
    names = ("store", "geojson", "report", "cells_table")
    lines += [f"  {name}: {getattr(outcome, name)}" for name in names]
    return "\n".join(lines)


def run_shortcut() -> None:
    """Entry point of the ``wsi-run`` console script."""
    run.main(prog_name="wsi-run", help_option_names=["-h", "--help"])
