"""``wsi inspect STORE``: the summary of a result store."""

from __future__ import annotations

import json
from pathlib import Path

import click

from wsi_pipeline.cli.errors import Command

__all__ = ["inspect"]


@click.command(cls=Command)
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(store: Path, as_json: bool) -> None:
    """Summarise a result STORE (<slide-stem>.zarr)."""
    from wsi_pipeline.results.store import format_summary, read_summary

    summary = read_summary(store)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
