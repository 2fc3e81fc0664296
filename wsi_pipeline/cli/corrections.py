"""``wsi corrections STORE EDITED``: an expert's QuPath edits of a run into a labelled folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import click

from wsi_pipeline.cli.errors import Command

__all__ = ["corrections"]


@click.command(cls=Command)
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
