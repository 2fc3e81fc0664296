"""A self-contained HTML report of one slide: no network is needed to view it.

The page holds inline CSS, images as PNG data URIs and the bar chart as inline SVG: the
differential table (``<table id="differential">``), the chart with 95 % intervals, the counted
region drawn over a thumbnail, the saliency mosaics, warnings and flags, and provenance.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from wsi_pipeline import __version__
from wsi_pipeline.core.files import atomic_path
from wsi_pipeline.core.taxonomy import MATURATION_ORDER, cell_class
from wsi_pipeline.results.counts import Differential, Tally

__all__ = ["write_report", "png_data_uri"]

#: The ``<meta>`` name under which a report records its result key.
RESULT_KEY_META = "wsi-pipeline-result"
_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: right; }
td:first-child, th:first-child, td.text { text-align: left; }
tr.na td { color: #999; } tr.group td { font-weight: 600; background: #f6f6f6; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em;
  vertical-align: -0.1em; border: 1px solid #0003; }
.warn { background: #fff4e5; border-left: 4px solid #f0a000; padding: 0.4em 0.8em; }
.flag { background: #fdecea; border-left: 4px solid #d93025; padding: 0.4em 0.8em; }
.empty { font-size: 1.3em; background: #eef3fd; border-left: 4px solid #1a73e8; padding: 0.8em; }
.mosaic { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
img, svg.thumb { max-width: 100%; height: auto; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 1em; }
dt { font-weight: 600; } dd { margin: 0; word-break: break-all; }
"""


def png_data_uri(image: NDArray[np.uint8]) -> str:
    """An ``(H, W, 3)`` uint8 image as a ``data:image/png;base64,...`` URI."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _defined(row: Tally) -> tuple[float, tuple[float, float]]:
    """``percent`` and ``ci95`` of a row whose percentage is defined."""
    if row.percent is None or row.ci95 is None:
        raise ValueError(f"{row.key} has no percentage and 95 % interval")
    return row.percent, row.ci95


def _fmt_percent(row: Tally) -> tuple[str, str]:
    if not row.assessable:
        return "not assessable", ""
    if row.percent is None:
        return "-", ""
    percent, (low, high) = _defined(row)
    return f"{percent:.1f}", f"{low:.1f}-{high:.1f}"


def _row(row: Tally, css: str, label: str) -> str:
    percent, ci = _fmt_percent(row)
    count = "-" if row.count is None else str(row.count)
    css = f"{css} na" if not row.assessable else css
    return (
        f'<tr class="{css.strip()}"><td>{label}</td><td class="text">{escape(row.group)}</td>'
        f"<td>{count}</td><td>{percent}</td><td>{ci}</td></tr>"
    )


def _class_label(row: Tally) -> str:
    colour = cell_class(row.key).colour
    return f'<span class="swatch" style="background:{colour}"></span>{row.key} {escape(row.label)}'


def _table(result: Differential) -> str:
    head = (
        '<table id="differential"><thead><tr><th>class</th><th class="text">group</th>'
        "<th>count</th><th>%</th><th>95 % CI</th></tr></thead><tbody>"
    )
    rows = []
    for group in result.groups:
        rows.append(_row(group, "group", escape(group.key)))
        rows += [_row(c, "", _class_label(c)) for c in result.classes if c.group == group.key]
    rows.append('<tr class="group"><td colspan="5">not in the denominator</td></tr>')
    rows += [_row(c, "", _class_label(c)) for c in result.not_counted]
    rows.append(
        f'<tr><td>uncertain ({escape(result.uncertain_rule)})</td><td class="text"></td>'
        f"<td>{result.uncertain}</td><td></td><td></td></tr>"
    )
    return head + "".join(rows) + "</tbody></table>"


def _bar_chart(result: Differential) -> str:
    rows = sorted(
        (c for c in result.classes if c.percent is not None),
        key=lambda c: MATURATION_ORDER.index(c.key),
    )
    if not rows:
        return ""
    bar_h, left, width = 18, 200, 480
    top = max(max(_defined(r)[1][1] for r in rows), 1.0)
    scale = width / top
    parts = [
        f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" '
        f'height="{bar_h * len(rows) + 10}" role="img" aria-label="differential bar chart">'
    ]
    for i, row in enumerate(rows):
        y = 5 + i * bar_h
        percent, ci95 = _defined(row)
        low, high = (v * scale for v in ci95)
        parts.append(
            f'<text x="{left - 6}" y="{y + 13}" text-anchor="end" font-size="12">'
            f"{row.key} {escape(row.label)}</text>"
            f'<rect x="{left}" y="{y + 2}" width="{percent * scale:.1f}" height="{bar_h - 4}" '
            f'fill="{cell_class(row.key).colour}"><title>{row.percent:.1f} %</title></rect>'
            f'<line x1="{left + low:.1f}" x2="{left + high:.1f}" y1="{y + bar_h / 2}" '
            f'y2="{y + bar_h / 2}" stroke="#000" stroke-width="1.2"/>'
            f'<text x="{left + high + 4:.1f}" y="{y + 13}" font-size="11">'
            f"{row.percent:.1f} %</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _region_on_thumbnail(
    thumbnail: NDArray[np.uint8], scale: float, region: Sequence[NDArray[np.floating]]
) -> str:
    h, w = thumbnail.shape[:2]
    polygons = "".join(
        '<polygon fill="#00a0ff22" stroke="#00a0ff" stroke-width="2" '
        'vector-effect="non-scaling-stroke" points="'
        + " ".join(f"{x:.1f},{y:.1f}" for x, y in np.asarray(ring) * scale)
        + '"/>'
        for ring in region
    )
    return (
        f'<svg class="thumb" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" '
        f'width="{w}" height="{h}"><image href="{png_data_uri(thumbnail)}" width="{w}" '
        f'height="{h}"/>{polygons}</svg>'
    )


def _mosaics(mosaics: Mapping[str, Mapping[str, NDArray[np.uint8]]]) -> str:
    parts = []
    for method, images in mosaics.items():
        if not images:
            continue
        parts.append(f"<h3>{escape(method)}</h3>")
        parts += [
            f'<figure class="mosaic"><img alt="{escape(method)} {code}" '
            f'src="{png_data_uri(image)}"><figcaption>{code} '
            f"{escape(cell_class(code).name)}</figcaption></figure>"
            for code, image in images.items()
        ]
    return "".join(parts)


def _flat(items: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested provenance as readable key/value pairs: ``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``;
    lists of plain values joined by commas, ``None`` as a dash."""
    flat: dict[str, str] = {}
    for key, value in items.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= _flat(value, f"{name}.")
        elif isinstance(value, list | tuple) and all(not isinstance(v, Mapping) for v in value):
            flat[name] = ", ".join("-" if v is None else str(v) for v in value) or "-"
        else:
            flat[name] = "-" if value is None or value == {} else str(value)
    return flat


def _definition_list(items: Mapping[str, Any]) -> str:
    pairs = _flat(items).items()
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in pairs) + "</dl>"


def _notes(result: Differential) -> str:
    parts = []
    if result.no_white_cells:
        parts.append(
            f'<p class="empty" id="no-white-cells">No white cells found: {result.total_cells} '
            "objects were detected and none could be counted, so this slide has no differential. "
            "This is expected for a slide that is not a marrow aspirate or blood smear.</p>"
        )
    parts += [f'<p class="flag">{escape(f)}</p>' for f in result.flags]
    parts += [f'<p class="warn">{escape(w)}</p>' for w in result.warnings]
    return "".join(parts)


def read_result_key(path: str | Path) -> str | None:
    """The result key of a report written here, or None (missing or unreadable file, no key)."""
    try:
        with open(path, encoding="utf-8") as stream:
            head = stream.read(512)
    except (OSError, UnicodeDecodeError):
        return None
    found = re.search(rf'<meta name="{RESULT_KEY_META}" content="([0-9a-f]*)">', head)
    return found.group(1) if found else None


def write_report(
    path: str | Path,
    result: Differential,
    *,
    slide: Mapping[str, Any],
    classifier: Mapping[str, Any],
    parameters: Mapping[str, Any],
    timings: Mapping[str, float],
    run: Mapping[str, str] | None = None,
    thumbnail: NDArray[np.uint8] | None = None,
    thumbnail_scale: float = 1.0,
    region: Sequence[NDArray[np.floating]] = (),
    mosaics: Mapping[str, Mapping[str, NDArray[np.uint8]]] | None = None,
    result_key: str = "",
) -> Path:
    """Write the HTML report of one slide, atomically.

    Parameters
    ----------
    path : path
        Output ``.html`` file.
    result : Differential
        The differential count.
    slide : mapping
        Slide provenance (path, dimensions, mpp, checksum...), shown as given.
    classifier : mapping
        At least ``name``; ``caveat`` is shown prominently when present.
    parameters : mapping
        Run parameters, shown as given.
    run : mapping of str to str, optional
        When the run started and finished (ISO 8601, UTC).
    timings : mapping of str to float
        Seconds per stage.
    thumbnail : (h, w, 3) uint8, optional
        Low-resolution image of the slide.
    thumbnail_scale : float
        Thumbnail pixels per level-0 pixel.
    region : sequence of (K, 2) arrays
        The counted region's outer rings, level-0 pixels, drawn on the thumbnail.
    mosaics : mapping of method to mapping of class code to image, optional
        Saliency mosaics, e.g. ``{"gradcam": {"BLA": ...}}``.
    result_key : str
        Identifies the result the page shows, as the store records it (a ``<meta>`` tag, see
        :func:`read_result_key`).

    Returns
    -------
    Path
    """
    path = Path(path)
    title = f"Differential count: {Path(str(slide.get('path', 'slide'))).name}"
    caveat = classifier.get("caveat")
    me = "not available" if result.me_ratio is None else f"{result.me_ratio:.2f}"
    summary = {
        "cells found": result.total_cells,
        "countable": result.countable,
        "uncertain": result.uncertain,
        "M:E ratio": me,
    }
    sections = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="warn">{escape(str(caveat))}</p>' if caveat else "",
        _definition_list(summary),
        _notes(result),
        "<h2>Differential</h2>",
        _table(result),
        _bar_chart(result),
    ]
    if thumbnail is not None:
        sections += [
            "<h2>Counted region</h2>",
            _region_on_thumbnail(thumbnail, thumbnail_scale, region),
        ]
    if mosaics and any(mosaics.values()):
        sections += ["<h2>Saliency: most confident cells of each class</h2>", _mosaics(mosaics)]
    sections += [
        "<h2>Provenance</h2>",
        "<h3>Run (UTC)</h3>" if run else "",
        _definition_list(run) if run else "",
        "<h3>Slide</h3>",
        _definition_list(slide),
        "<h3>Classifier</h3>",
        _definition_list(classifier),
        "<h3>Parameters</h3>",
        _definition_list(parameters),
        "<h3>Stage timings (s)</h3>",
        "<p>Summed over the threads or workers that ran each stage; stages overlap, so they add"
        " up to more than the run took.</p>",
        _definition_list({k: f"{v:.2f}" for k, v in timings.items()}),
        f"<p>wsi-pipeline {escape(__version__)}</p>",
    ]
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="{RESULT_KEY_META}" content="{escape(result_key)}">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(s for s in sections if s)
        + "</body></html>\n"
    )
    with atomic_path(path) as temp:
        temp.write_text(page, encoding="utf-8")
    return path
