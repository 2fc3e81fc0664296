"""The ``wsi`` command group; ``wsi-run`` is a shortcut for ``wsi run``.

One module per command (``run``, ``inspect``, ``corrections``, ``train``, ``evaluate``,
``synth``); the options several commands share are in :mod:`~wsi_pipeline.cli.options`. Every
command turns :class:`~wsi_pipeline.core.errors.InputError` into one line on stderr and exit
code 2 (:mod:`~wsi_pipeline.cli.errors`). The commands import torch and the other heavy
libraries inside their bodies, so ``wsi --help`` and bad input answer at once.
"""

from __future__ import annotations

import click

from wsi_pipeline import __version__
from wsi_pipeline.cli import corrections, evaluate, inspect, run, synth, train
from wsi_pipeline.cli.errors import Group
from wsi_pipeline.cli.run import run_shortcut

__all__ = ["run_shortcut", "wsi"]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsi-pipeline")
def wsi() -> None:
    """Differential cell counts of bone-marrow aspirate whole-slide images."""


wsi.add_command(run.run)
wsi.add_command(inspect.inspect)
wsi.add_command(corrections.corrections)
wsi.add_command(train.train)
wsi.add_command(evaluate.evaluate)
wsi.add_command(synth.synth)
