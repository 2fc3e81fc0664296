"""The HTML report is self-contained and says plainly when there is no differential."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np

from wsi_pipeline.core.taxonomy import MATURATION_ORDER, codes
from wsi_pipeline.results.counts import differential
from wsi_pipeline.results.report import write_report


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _render(tmp_path, result, **kwargs):
    path = write_report(
        tmp_path / "demo.report.html",
        result,
        slide={"path": "/data/demo.svs", "mpp": 0.25},
        classifier={"name": "synthetic-demo", "caveat": "Research model, not for diagnosis."},
        parameters={"threshold": 0.5},
        timings={"detect": 1.5},
        **kwargs,
    )
    html = path.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(html)
    return path, html, parser.tags


def test_report_is_self_contained(tmp_path):
    top = np.repeat(["BLA", "NGS", "EBO"], [30, 400, 120])
    card = [c for c in codes() if c != "PLM"]
    result = differential(top, np.full(top.size, 0.9), card)
    thumbnail = np.full((40, 60, 3), 230, np.uint8)
    mosaic = np.zeros((20, 30, 3), np.uint8)
    path, html, tags = _render(
        tmp_path,
        result,
        thumbnail=thumbnail,
        thumbnail_scale=0.01,
        region=[np.array([[100, 100], [5000, 100], [5000, 3000]])],
        mosaics={"gradcam": {"BLA": mosaic}, "smoothgrad": {"BLA": mosaic}},
    )
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    table = [a for t, a in tags if t == "table"]
    assert table[0]["id"] == "differential"
    assert any(t == "svg" and a.get("id") == "chart" for t, a in tags)
    assert sum(t == "polygon" for t, _ in tags) == 1
    images = [a.get("src") or a.get("href") for t, a in tags if t in ("img", "image")]
    assert len(images) == 3  # the overview and a mosaic per method
    assert all(src.startswith("data:image/jpeg;base64,") for src in images)
    assert not any(t in ("script", "link") for t, _ in tags)
    assert not re.search(r"""(src|href)=["']https?:""", html)  # nothing fetched from a network
    assert "Research model, not for diagnosis." in html
    assert "BLA Blast" in html and "not assessable" in html
    row = re.search(r"<tr[^>]*><td>[^<]*<span[^>]*></span>BLA Blast</td>(.*?)</tr>", html).group(1)
    assert ">30<" in row and f"{100 * 30 / 550:.1f}" in row
    assert "No white cells" not in html


def test_report_says_plainly_when_there_are_no_white_cells(tmp_path):
    result = differential([], [], codes())
    _, html, tags = _render(tmp_path, result)
    assert any(a.get("id") == "no-white-cells" for _, a in tags)
    assert "No white cells found" in html
    assert not any(a.get("id") == "chart" for _, a in tags)
    assert any(a.get("id") == "differential" for _, a in tags)


def test_the_chart_reads_in_maturation_order(tmp_path):
    top = np.repeat(["NGS", "EBO", "BLA", "MYB", "LYT", "PMO", "MON"], 50)
    result = differential(top, np.full(top.size, 0.9), codes())
    _, html, _ = _render(tmp_path, result)
    chart = html[html.index('<svg id="chart"') :]
    chart = chart[: chart.index("</svg>")]
    shown = re.findall(r">([A-Z]{3}) ", chart)
    counted = [code for code in shown if code in set(top)]
    assert counted == ["BLA", "PMO", "MYB", "NGS", "EBO", "LYT", "MON"]
    assert shown == sorted(shown, key=MATURATION_ORDER.index)


def test_provenance_reads_as_key_value_pairs_not_python_reprs(tmp_path):
    top = np.repeat(["BLA", "NGS"], 10)
    result = differential(top, np.full(top.size, 0.9), codes())
    path = write_report(
        tmp_path / "p.report.html",
        result,
        slide={"path": "/data/s.svs", "dimensions": [4000, 3000], "objective_power": None},
        classifier={"name": "default", "weights": {"sha256": ["ab", "cd"]}},
        parameters={"saliency": ["gradcam", "smoothgrad"], "mpp": None},
        timings={"detect": 1.5},
    )
    html = path.read_text(encoding="utf-8")
    assert "<dt>dimensions</dt><dd>4000, 3000</dd>" in html
    assert "<dt>weights.sha256</dt><dd>ab, cd</dd>" in html
    assert "<dt>saliency</dt><dd>gradcam, smoothgrad</dd>" in html
    assert "<dt>mpp</dt><dd>-</dd>" in html
    assert not any(token in html for token in ("[&#x27;", "{&#x27;", "None<"))


def _section(html, section_id):
    start = html.index(f'<section id="{section_id}"')
    return html[start : html.index("</section>", start)]


def test_summary_comes_first_with_blasts_adequacy_and_graded_findings(tmp_path):
    # 81 % eosinophils: what the shipped card gives on a rapid-stained blood smear.
    top = np.repeat(["EOS", "NGS", "LYT", "BLA"], [324, 40, 30, 6])
    result = differential(top, np.full(top.size, 0.9), codes())
    _, html, _ = _render(tmp_path, result)
    summary = _section(html, "summary")
    assert html.index('<section id="summary"') < html.index('<table id="differential"')
    assert "Critical: review the slide" in summary
    assert '<p class="finding critical"><b>critical</b>eosinophils 81.0 %' in summary
    assert "<dt>Blasts</dt><dd>1.5 % (95 % CI 0.7-3.2)</dd>" in summary
    assert "<dt>Adequacy</dt><dd>inadequate: 400 of the 500 cells" in summary
    assert '<p class="finding caution"><b>caution</b>only 400 cells countable' in summary
    # context stays out of the summary, in a list of notes below the table
    assert "below the healthy marrow range" not in summary
    assert "below the healthy marrow range" in _section(html, "notes")


def test_summary_says_why_a_number_is_not_assessable(tmp_path):
    card = ["NGS", "LYT", "ART"]
    top = np.repeat(["NGS", "LYT"], [300, 250])
    result = differential(top, np.full(top.size, 0.9), card)
    _, html, _ = _render(tmp_path, result)
    summary = _section(html, "summary")
    assert "<dd>not assessable: the classifier card has no blast (BLA) class</dd>" in summary
    assert "M:E ratio not assessable: the classifier card lacks" in summary
    assert "<dt>Adequacy</dt><dd>adequate: 550 of at least 500 cells</dd>" in summary
    # what the card lacks is one note, not a box per group
    notes = _section(html, "notes")
    assert notes.count("not assessable with this classifier card") == 1
