"""A self-contained HTML report of one slide: no network is needed to view it.

The page holds inline CSS, images as data URIs and the bar chart as inline SVG, in the order a
haematologist reads: the summary (``<section id="summary">``: cells counted, blast % with its
95 % interval, M:E ratio, adequacy, and the critical and caution findings), the chart with 95 %
intervals in maturation order, the differential table (``<table id="differential">``), the
notes (info findings), the counted region drawn over an overview, the saliency mosaics, and
provenance.
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
from wsi_pipeline.results.plausibility import Finding, counted_noun, worst

__all__ = [
    "CSS",
    "blast_text",
    "finding_html",
    "jpeg_data_uri",
    "me_text",
    "write_report",
]

#: The ``<meta>`` name under which a report records its result key.
RESULT_KEY_META = "wsi-pipeline-result"
#: The report's style sheet; the cohort page shares it.
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: right; }
td:first-child, th:first-child, td.text, th.text { text-align: left; }
tr.na td { color: #999; } tr.group td { font-weight: 600; background: #f6f6f6; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em;
  vertical-align: -0.1em; border: 1px solid #0003; }
h1 { margin: 0.3em 0; }
#summary { border: 3px solid #1a4f8b; border-radius: 6px; padding: 0.5em 1em; margin: 0.5em 0; }
#summary dl { font-size: 1.1em; margin: 0.3em 0; }
.finding { padding: 0.35em 0.8em; margin: 0.35em 0; }
.finding b { text-transform: uppercase; font-size: 0.85em; margin-right: 0.6em; }
.critical { background: #fdecea; border-left: 6px solid #b3261e; }
.caution { background: #fff4e5; border-left: 4px solid #f0a000; }
.info { color: #444; }
.caveat { color: #555; font-size: 0.9em; }
.empty { font-size: 1.3em; background: #eef3fd; border-left: 4px solid #1a73e8; padding: 0.8em; }
.mosaic { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
img, svg.thumb { max-width: 100%; height: auto; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 1em; }
dt { font-weight: 600; } dd { margin: 0; word-break: break-all; }
"""


def jpeg_data_uri(image: NDArray[np.uint8]) -> str:
    """An ``(H, W, 3)`` uint8 image as a ``data:image/jpeg;base64,...`` URI.

    Quality 90 keeps the report a few megabytes (a third of the size of PNG for the mosaics);
    the lossless mosaics are the PNG files beside it and the NGFF images in the store.
    """
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


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
        f'width="{w}" height="{h}"><image href="{jpeg_data_uri(thumbnail)}" width="{w}" '
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
            f'src="{jpeg_data_uri(image)}"><figcaption>{code} '
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


def finding_html(finding: Finding) -> str:
    """A critical or caution finding as a box labelled with its severity; an info finding as a
    list item."""
    if finding.severity == "info":
        return f'<li class="info">{escape(finding.message)}</li>'
    return (
        f'<p class="finding {finding.severity}"><b>{finding.severity}</b>'
        f"{escape(finding.message)}</p>"
    )


def blast_text(result: Differential) -> str:
    """``"3.2 % (95 % CI 1.9-5.1)"``, or why the blast percentage is not assessable."""
    why = result.blast_not_assessable
    if why is not None:
        return f"not assessable: {why}"
    if result.blast_percent is None or result.blast_ci95 is None:
        raise ValueError("an assessable blast percentage without its 95 % interval")
    low, high = result.blast_ci95
    return f"{result.blast_percent:.1f} % (95 % CI {low:.1f}-{high:.1f})"


def me_text(result: Differential) -> str:
    """The M:E ratio, or why there is none."""
    if result.me_ratio is not None:
        return f"{result.me_ratio:.2f}"
    if result.specimen != "marrow":
        return f"not applicable to {result.specimen}"
    said = [f.message for f in result.findings if f.topic == "M:E ratio"]
    return said[0] if said else "not available"


def _summary(result: Differential, classifier: Mapping[str, Any]) -> str:
    """The block a reader sees first: the numbers that decide, and what to beware of."""
    not_counted = sum(t.count or 0 for t in result.not_counted)
    share = result.uncertain / result.total_cells if result.total_cells else 0.0
    cells = (
        f"{result.countable} countable of {result.total_cells} found "
        f"({result.uncertain} uncertain, {100 * share:.0f} %; {not_counted} not counted: "
        "artefacts, smudge and other cells)"
    )
    adequacy = (
        f"adequate: {result.countable} of at least {result.min_cells} cells"
        if result.adequate
        else f"inadequate: {result.countable} of the {result.min_cells} cells a "
        f"{result.specimen} differential needs"
    )
    rows = {
        "Specimen": f"{result.specimen} (checked against adult {result.specimen} reference ranges)",
        "Cells counted": cells,
        "Blasts": blast_text(result),
        "M:E ratio": me_text(result),
        "Adequacy": adequacy,
        "Classifier": str(classifier.get("name", "?")),
    }
    verdict = worst(result.findings)
    heading = {
        "critical": "Critical: review the slide before using these numbers",
        "caution": "Read with the cautions below",
    }.get(verdict or "", "No critical or caution finding")
    boxes = [finding_html(f) for f in result.findings if f.severity != "info"]
    notes = sum(f.severity == "info" for f in result.findings)
    caveat = classifier.get("caveat")
    return (
        f'<section id="summary" class="{verdict or "clear"}"><h2>{escape(heading)}</h2>'
        + "<dl>"
        + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows.items())
        + "</dl>"
        + "".join(boxes)
        + (f'<p><a href="#notes">{counted_noun(notes, "more note")}</a></p>' if notes else "")
        + (f'<p class="caveat">{escape(str(caveat))}</p>' if caveat else "")
        + "</section>"
    )


def _notes(result: Differential) -> str:
    infos = [finding_html(f) for f in result.findings if f.severity == "info"]
    if not infos:
        return ""
    return '<section id="notes"><h2>Notes</h2><ul>' + "".join(infos) + "</ul></section>"


def _no_white_cells(result: Differential) -> str:
    if not result.no_white_cells:
        return ""
    return (
        f'<p class="empty" id="no-white-cells">No white cells found: '
        f"{counted_noun(result.total_cells, 'object')} detected, none could be counted, so this "
        "slide has no differential. This is expected for a slide that is not a marrow aspirate "
        "or blood smear.</p>"
    )


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
    sections = [
        f"<h1>{escape(title)}</h1>",
        _summary(result, classifier),
        _no_white_cells(result),
        "<h2>Differential</h2>",
        _bar_chart(result),
        _table(result),
        _notes(result),
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
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(s for s in sections if s)
        + "</body></html>\n"
    )
    with atomic_path(path) as temp:
        temp.write_text(page, encoding="utf-8")
    return path
