"""The result of one slide: a Zarr v3 store ``<out>/<slide-stem>.zarr`` (see docs/outputs.md),
and reading a complete one back.

:class:`~wsi_pipeline.results.store_writer.ResultWriter` writes it, marking it ``complete`` only
when everything is in place; :func:`read_cells` and :func:`read_summary` refuse anything else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numpy.typing import NDArray

from wsi_pipeline.core.errors import InputError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "array_at",
    "store_path",
    "read_cells",
    "read_summary",
    "format_summary",
]

FORMAT = "wsi-pipeline-result"
FORMAT_VERSION = 1


def store_path(out_dir: str | Path, slide_stem: str) -> Path:
    """``<out_dir>/<slide_stem>.zarr``."""
    return Path(out_dir) / f"{slide_stem}.zarr"


def array_at(group: zarr.Group, path: str) -> zarr.Array:
    """The array at ``path`` in ``group``."""
    node = group[path]
    if not isinstance(node, zarr.Array):
        raise TypeError(f"{path} is a group, not an array")
    return node


def _open_complete(path: Path) -> zarr.Group:
    if not (path / "zarr.json").is_file():
        raise InputError(path, "not a wsi-pipeline result store (no zarr.json)")
    try:
        root = zarr.open_group(path, mode="r", zarr_format=3)
    except Exception as error:  # zarr raises several types for a damaged store
        raise InputError(path, f"unreadable Zarr store: {error}") from None
    attrs = root.attrs.asdict()
    if attrs.get("format") != FORMAT:
        raise InputError(path, "not a wsi-pipeline result store (attribute format is missing)")
    if attrs.get("status") != "complete":
        raise InputError(path, f"incomplete result store (status {attrs.get('status')!r})")
    return root


def read_cells(
    store: str | os.PathLike[str], *names: str
) -> tuple[dict[str, Any], dict[str, NDArray]]:
    """The attributes of a complete result store and its ``cells/<name>`` columns ``names``.

    Raises
    ------
    InputError
        The path is not a result store, its status is not ``complete``, or a column is missing.
    """
    path = Path(store)
    root = _open_complete(path)
    try:
        columns = {name: np.asarray(array_at(root, f"cells/{name}")[:]) for name in names}
    except KeyError as missing:
        raise InputError(path, f"the store has no column {missing}") from None
    return root.attrs.asdict(), columns


def read_summary(store: str | Path) -> dict[str, Any]:
    """The summary of a complete result store, as printed by ``wsi inspect STORE --json``.

    Parameters
    ----------
    store : path
        A ``<slide-stem>.zarr`` folder.

    Returns
    -------
    dict
        ``store``, ``status``, ``slide``, ``classifier`` (name, classes, weights, caveat),
        ``n_cells``, ``parameters``, ``inference`` (the backend and device that ran the
        classifier), ``adaptation`` (whether the classifier adapted to the
        slide, and to what), ``software``, ``timings`` and ``counts`` (the differential:
        classes, groups, not counted, uncertain, M:E ratio, blast %, graded findings).

    Raises
    ------
    InputError
        The path is not a result store, or its status is not ``complete``.
    """
    path = Path(store)
    attrs: dict[str, Any] = _open_complete(path).attrs.asdict()
    classifier = attrs.get("classifier", {})
    return {
        "store": str(path),
        "status": attrs["status"],
        "slide": attrs.get("slide", {}),
        "classifier": {
            key: classifier[key]
            for key in ("name", "caveat", "weights", "cannot_recognise")
            if key in classifier
        }
        | {"classes": attrs.get("class_codes", [])},
        "n_cells": attrs.get("n_cells"),
        "parameters": attrs.get("parameters", {}),
        "inference": attrs.get("inference", {}),
        "adaptation": attrs.get("adaptation", {"ran": False, "reason": "not recorded"}),
        "software": attrs.get("software", {}),
        "timings": attrs.get("timings", {}),
        "counts": attrs["counts"],
    }


def _percent(row: Mapping[str, Any]) -> str:
    if not row["assessable"]:
        return "not assessable"
    if row["percent"] is None:
        return "-"
    low, high = row["ci95"]
    return f"{row['percent']:5.1f} %  ({low:.1f}-{high:.1f})"


def _ran_on(summary: Mapping[str, Any]) -> str:
    """`` (onnxruntime on cpu)``, or nothing for a store written before backends were recorded."""
    ran = summary.get("inference", {})
    return f" ({ran['backend']} on {ran['device']})" if ran else ""


def format_summary(summary: Mapping[str, Any]) -> str:
    """Plain-text rendering of :func:`read_summary` for ``wsi inspect STORE``."""
    counts = summary["counts"]
    slide = summary["slide"]
    # Stores written before the snapshot-agreement rule record the threshold alone.
    rule = counts.get("uncertain_rule") or f"confidence < {counts['threshold']:g}"
    lines = [
        f"store       {summary['store']} ({summary['status']})",
        f"slide       {slide.get('path', '?')}",
        f"classifier  {summary['classifier'].get('name', '?')}{_ran_on(summary)}",
        f"cells       {counts['total_cells']} found, {counts['countable']} countable, "
        f"{counts['uncertain']} uncertain ({rule})",
    ]
    if counts["status"] != "ok":
        lines.append(f"result      {counts['status']}")
    me = counts["me_ratio"]
    lines.append(f"M:E ratio   {'not available' if me is None else f'{me:.2f}'}")
    blasts = counts["blast_percent"]
    if blasts is not None:
        low, high = counts["blast_ci95"]
        lines.append(f"blasts      {blasts:.1f} % (95 % CI {low:.1f}-{high:.1f})")
    lines.append("")
    lines.append(f"{'group':<16}{'count':>7}  % (95 % CI)")
    for row in counts["groups"]:
        count = "-" if row["count"] is None else row["count"]
        lines.append(f"{row['key']:<16}{count:>7}  {_percent(row)}")
    lines.append("")
    lines.append(f"{'class':<28}{'count':>7}  % (95 % CI)")
    for row in counts["classes"]:
        count = "-" if row["count"] is None else row["count"]
        lines.append(f"{row['key']} {row['label']:<24}{count:>7}  {_percent(row)}")
    not_counted = ", ".join(
        f"{r['key']} {r['count']}" for r in counts["not_counted"] if r["count"] is not None
    )
    lines.append(f"not counted: {not_counted or 'none'}")
    lines += [f"{f['severity']}: {f['message']}" for f in counts["findings"]]
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in summary["timings"].items())
    lines.append(f"timings: {timings or 'not recorded'}")
    return "\n".join(lines)
