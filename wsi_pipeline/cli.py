"""The ``wsi`` command group; ``wsi-run`` is a shortcut for ``wsi run``.

Every command turns :class:`~wsi_pipeline.errors.InputError` into one line on stderr and
exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from wsi_pipeline import __version__
from wsi_pipeline.errors import InputError

EXIT_BAD_INPUT = 2


class _BadInput(click.ClickException):
    exit_code = EXIT_BAD_INPUT

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class _Command(click.Command):
    """A command whose bad-input errors end in one clear line, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as error:
            raise _BadInput(str(error)) from error


class _Group(click.Group):
    command_class = _Command


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="wsi-pipeline")
def wsi() -> None:
    """Differential cell counts of bone-marrow aspirate whole-slide images."""


@wsi.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option(
    "--mpp",
    type=float,
    default=None,
    show_default="read from the slide",
    help="Level-0 microns per pixel, for slides that do not record it (or record it wrongly).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("wsi-output"),
    show_default=True,
    help="Folder for the results: <slide-stem>.zarr, .geojson and .report.html.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the slide information as JSON.")
def run(slide: Path, mpp: float | None, out: Path, as_json: bool) -> None:
    """Count the white cells of SLIDE (a slide file, DICOM folder or directory of slides)."""
    from wsi_pipeline.slide import find_slides, open_slide

    for path in find_slides(slide):
        with open_slide(path, mpp=mpp) as opened:
            info = opened.info
            opened.mpp  # noqa: B018 - a slide without a pixel size cannot be counted
        if as_json:
            click.echo(json.dumps(info.as_dict()))
        else:
            width, height = info.dimensions
            click.echo(
                f"{path}: {info.vendor} ({info.backend}), {width} x {height} px, "
                f"{len(info.level_dimensions)} levels, {info.mpp:.4g} µm/px from {info.mpp_source}"
            )


def run_shortcut() -> None:
    """Entry point of the ``wsi-run`` console script."""
    run.main(prog_name="wsi-run")


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
    from wsi_pipeline.synth import write_synthetic_slide

    truth = write_synthetic_slide(out, size=size, seed=seed, mpp=mpp)
    click.echo(f"wrote {out} and {truth}")
