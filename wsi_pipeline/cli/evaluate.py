"""``wsi evaluate FOLDER``: score classifier cards on a labelled folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from wsi_pipeline.cli.errors import Command
from wsi_pipeline.cli.options import (
    adapt_option,
    backend_option,
    device_option,
    image_mpp_option,
)

__all__ = ["evaluate"]


@click.command(cls=Command)
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--classifier",
    "classifiers",
    multiple=True,
    default=("default",),
    show_default=True,
    help="Card name or path; repeat to compare cards.",
)
@image_mpp_option()
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
@device_option()
@backend_option()
@click.option("--tta", type=click.IntRange(0, 8), default=0, show_default=True)
@adapt_option("the folder, as one slide: its images'")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def evaluate(folder: Path, as_json: bool, image_mpp: float | None, **settings) -> None:
    """Per-class precision, recall and F1 of classifier cards on a labelled FOLDER."""
    from wsi_pipeline.learn.evaluate import evaluate_folder

    scores = evaluate_folder(folder, mpp=image_mpp, **settings)
    click.echo(json.dumps(scores, indent=2) if as_json else scores["comparison"])
