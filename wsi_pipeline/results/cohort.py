"""The cohort table of a folder run: one row per slide, as CSV, Parquet and an HTML page.

The columns are described in ``docs/outputs.md``; :func:`cohort_row` is their one definition.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import pandas as pd

from wsi_pipeline.core.files import atomic_path
from wsi_pipeline.results.plausibility import Finding, worst
from wsi_pipeline.results.report import CSS
from wsi_pipeline.results.store import read_summary

__all__ = ["COHORT_STEM", "cohort_row", "write_cohort_table"]

COHORT_STEM = "cohort"


def _tally_columns(tally: Mapping[str, Any]) -> dict[str, Any]:
    """``count:<key>``, ``percent:<key>``, ``ci95_low:<key>``, ``ci95_high:<key>`` of one class
    or group; None where not assessable or undefined."""
    key = tally["key"]
    low, high = tally["ci95"] or (None, None)
    return {
        f"count:{key}": tally["count"],
        f"percent:{key}": tally["percent"],
        f"ci95_low:{key}": low,
        f"ci95_high:{key}": high,
    }


def cohort_row(path: Path, status: str, store: Path | None = None, reason: str = "") -> dict:
    """One row of the cohort table: status, the summary numbers, graded findings, the
    differential by group and by class with intervals, and timings."""
    row: dict[str, Any] = {"slide": str(path), "status": status, "reason": reason}
    if store is None:
        return row
    summary = read_summary(store)
    counts = summary["counts"]
    findings = [Finding(**f) for f in counts["findings"]]
    blast_low, blast_high = counts["blast_ci95"] or (None, None)
    row |= {
        "store": str(store),
        "report": str(store.with_name(store.name.removesuffix(".zarr") + ".report.html")),
        "classifier": summary["classifier"].get("name"),
        "specimen": counts["specimen"],
        "cells": counts["total_cells"],
        "countable": counts["countable"],
        "uncertain": counts["uncertain"],
        "adequate": counts["adequate"],
        "blast_percent": counts["blast_percent"],
        "blast_ci95_low": blast_low,
        "blast_ci95_high": blast_high,
        "me_ratio": counts["me_ratio"],
        "worst": worst(findings) or "",
        "critical": sum(f.severity == "critical" for f in findings),
        "caution": sum(f.severity == "caution" for f in findings),
        "findings": " | ".join(f"{f.severity}: {f.message}" for f in findings),
    }
    for tally in (*counts["groups"], *counts["classes"]):
        row |= _tally_columns(tally)
    row |= {f"seconds:{stage}": seconds for stage, seconds in summary["timings"].items()}
    return row


def _cell(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else escape(str(value))


def _page_row(row: Mapping[str, Any], out: Path) -> str:
    name = escape(Path(row["slide"]).name)
    if row["status"] == "failed":
        return (
            f'<tr class="critical"><td>{name}</td><td class="text">failed</td>'
            f'<td class="text" colspan="6">{escape(row["reason"])}</td></tr>'
        )
    report = Path(row["report"])
    link = report.relative_to(out) if report.is_relative_to(out) else report
    blasts = "not assessable"
    if row["blast_percent"] is not None:
        low, high = row["blast_ci95_low"], row["blast_ci95_high"]
        blasts = f"{row['blast_percent']:.1f} ({low:.1f}-{high:.1f})"
    worst = [f for f in row["findings"].split(" | ") if f.startswith(row["worst"] + ":")]
    return (
        f'<tr class="{row["worst"]}"><td><a href="{escape(str(link))}">{name}</a></td>'
        f'<td class="text">{escape(row["status"])}</td><td>{row["countable"]}</td>'
        f"<td>{blasts}</td><td>{_cell(row['me_ratio'], 2)}</td>"
        f"<td class='text'>{'yes' if row['adequate'] else 'no'}</td>"
        f'<td class="text">{escape(row["worst"])}</td>'
        f'<td class="text">{escape(worst[0].split(": ", 1)[1]) if worst else ""}</td></tr>'
    )


def _cohort_page(rows: Sequence[Mapping[str, Any]], out: Path) -> str:
    head = (
        "<tr><th>slide</th><th class='text'>status</th><th>countable</th>"
        "<th>blasts % (95 % CI)</th><th>M:E</th><th class='text'>adequate</th>"
        "<th class='text'>worst</th><th class='text'>its finding</th></tr>"
    )
    body = "".join(_page_row(r, out) for r in rows)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Cohort</title>'
        f"<style>{CSS}</style></head><body><h1>Cohort: {len(rows)} slides</h1>"
        "<p>One row per slide; each slide's report holds its differential and every finding. "
        f'The full table: <a href="{COHORT_STEM}.csv">{COHORT_STEM}.csv</a>.</p>'
        f'<table id="cohort"><thead>{head}</thead><tbody>{body}</tbody></table></body></html>\n'
    )


def write_cohort_table(rows: Sequence[dict], out: Path) -> tuple[Path, Path, Path]:
    """``OUT/cohort.csv``, ``OUT/cohort.parquet`` and ``OUT/cohort.html``, written atomically."""
    table = pd.DataFrame(list(rows))
    paths = (out / f"{COHORT_STEM}.csv", out / f"{COHORT_STEM}.parquet")
    writers: tuple[Callable[..., object], ...] = (table.to_csv, table.to_parquet)
    for path, write in zip(paths, writers, strict=True):
        with atomic_path(path) as temp:
            write(temp, index=False)
    page = out / f"{COHORT_STEM}.html"
    with atomic_path(page) as temp:
        temp.write_text(_cohort_page(rows, out), encoding="utf-8")
    return (*paths, page)
