"""``wsi synth OUT``: a synthetic bone-marrow aspirate slide with its ground truth."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_pipeline.cli.errors import Command

__all__ = ["synth"]


@click.command(cls=Command)
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
