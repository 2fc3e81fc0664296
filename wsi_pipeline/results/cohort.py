"""The cohort table of a folder run: one row per slide, as CSV and Parquet."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from wsi_pipeline.core.files import atomic_path
from wsi_pipeline.results.store import read_summary

__all__ = ["COHORT_STEM", "cohort_row", "write_cohort_table"]

COHORT_STEM = "cohort"


def cohort_row(path: Path, status: str, store: Path | None = None, reason: str = "") -> dict:
    """One row of the cohort table: status, counts, the differential, flags and timings."""
    row: dict[str, Any] = {"slide": str(path), "status": status, "reason": reason}
    if store is None:
        return row
    summary = read_summary(store)
    counts = summary["counts"]
    row |= {
        "store": str(store),
        "cells": counts["total_cells"],
        "countable": counts["countable"],
        "uncertain": counts["uncertain"],
        "me_ratio": counts["me_ratio"],
        "blast_percent": counts["blast_percent"],
        "flags": " | ".join(counts["flags"] + counts["warnings"]),
    }
    for kind in ("classes", "groups"):
        for tally in counts[kind]:
            row[f"{kind[:-2] if kind == 'classes' else 'group'}:{tally['key']}"] = tally["percent"]
    row |= {f"seconds:{stage}": seconds for stage, seconds in summary["timings"].items()}
    return row


def write_cohort_table(rows: Sequence[dict], out: Path) -> tuple[Path, Path]:
    """``OUT/cohort.csv`` and ``OUT/cohort.parquet``, written atomically."""
    table = pd.DataFrame(list(rows))
    paths = (out / f"{COHORT_STEM}.csv", out / f"{COHORT_STEM}.parquet")
    writers: tuple[Callable[..., object], ...] = (table.to_csv, table.to_parquet)
    for path, write in zip(paths, writers, strict=True):
        with atomic_path(path) as temp:
            write(temp, index=False)
    return paths
