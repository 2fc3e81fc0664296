"""Options and parameter types that several ``wsi`` commands share, defined once so that they
read and check the same everywhere."""

from __future__ import annotations

import math
from collections.abc import Callable

import click

from wsi_pipeline.model.backends import BACKENDS

__all__ = ["Fraction", "adapt_option", "backend_option", "device_option", "image_mpp_option"]


class Fraction(click.FloatRange):
    """A number from 0 to 1; click's FloatRange lets NaN through, as NaN fails no comparison."""

    def __init__(self) -> None:
        super().__init__(0, 1)

    def convert(self, value, param, ctx) -> float:
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number from 0 to 1", param, ctx)
        return number


def device_option(help_text: str = "Where the classifier runs; auto uses a GPU when present."):
    """``--device {auto,cpu,cuda}``."""
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help=help_text,
    )


def backend_option():
    """``--backend {auto,torch,onnxruntime,openvino}``."""
    return click.option(
        "--backend",
        type=click.Choice(BACKENDS),
        default="auto",
        show_default=True,
        help="What runs the classifier: auto is torch on a GPU, else the fastest CPU runtime "
        "installed (ONNX Runtime); the results are the same within 1e-4.",
    )


def adapt_option(what: str):
    """``--adapt/--no-adapt``; ``what`` names whose colours the classifier adapts to."""
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


def image_mpp_option(multiple: bool = False) -> Callable[[Callable], Callable]:
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
