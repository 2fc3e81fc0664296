"""Plausibility: a differential far outside physiology is said to be so, graded by severity."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_pipeline.core.taxonomy import codes
from wsi_pipeline.results.counts import differential
from wsi_pipeline.results.plausibility import (
    REFERENCE_RANGES,
    SEVERITIES,
    by_severity,
    worst,
)
from wsi_pipeline.results.store import read_summary

ALL = codes()
BIN = Path(sys.executable).parent

#: A healthy adult marrow, about the middle of each reference range (Wintrobe), 1000 cells.
HEALTHY_MARROW = {
    "BLA": 10, "PMO": 30, "MYB": 120, "MMZ": 160, "NGB": 120, "NGS": 80, "EOS": 30,
    "LYT": 160, "PLM": 15, "EBO": 270, "MON": 5,
}  # fmt: skip
#: A healthy adult blood differential, 200 cells.
HEALTHY_BLOOD = {"NGS": 120, "LYT": 56, "MON": 12, "EOS": 8, "BAS": 2, "NGB": 2}


def _count(mix, specimen="marrow", confidence=0.9):
    top = np.repeat(list(mix), list(mix.values()))
    return differential(top, np.full(top.size, confidence), ALL, specimen=specimen)


def _plausibility(result, severity):
    return [f for f in result.findings if f.kind == "plausibility" and f.severity == severity]


@pytest.mark.parametrize("specimen", ["marrow", "blood"])
def test_81_percent_eosinophils_is_critical(specimen):
    # What the shipped card gives on a rapid-stained blood smear.
    result = _count({"EOS": 405, "NGS": 60, "LYT": 30, "MON": 5}, specimen)
    (critical,) = _plausibility(result, "critical")
    assert critical.topic == "eosinophils"
    assert "81.0 %" in critical.message and "outside what the classifier knows" in critical.message
    assert result.findings[0] == critical  # most severe first
    assert worst(result.findings) == "critical"


@pytest.mark.parametrize(
    ("mix", "specimen"), [(HEALTHY_MARROW, "marrow"), (HEALTHY_BLOOD, "blood")]
)
def test_a_healthy_differential_raises_no_caution(mix, specimen):
    result = _count(mix, specimen)
    assert result.adequate
    assert worst(result.findings) == "info", [f.message for f in result.findings]


@pytest.mark.parametrize(
    ("mix", "topic"),
    [
        ({"BLA": 800, "NGS": 100, "EBO": 100}, "blasts"),  # acute leukaemia
        ({"LYT": 850, "NGS": 100, "EBO": 50}, "lymphocytes"),  # CLL
        ({"PLM": 700, "NGS": 200, "EBO": 100}, "plasma cells"),  # myeloma
        ({"EBO": 850, "NGS": 100, "LYT": 50}, "erythroid"),  # pure erythroid leukaemia
    ],
)
def test_disease_that_fills_the_marrow_is_not_called_implausible(mix, topic):
    result = _count(mix)
    assert not _plausibility(result, "critical")
    if topic != "blasts":  # blasts are judged against the WHO thresholds, not a range
        assert any(f.topic == topic for f in _plausibility(result, "caution"))


def test_far_above_is_a_caution_and_just_above_is_a_note():
    far = _count({**HEALTHY_MARROW, "EOS": 250})  # 20 %: far above 1.2-5.3 %
    assert [f.topic for f in _plausibility(far, "caution")] == ["eosinophils"]
    near = _count({**HEALTHY_MARROW, "EOS": 90})  # 8 %: above, not far above
    assert not _plausibility(near, "caution")
    assert any(f.topic == "eosinophils" for f in _plausibility(near, "info"))


def test_a_small_count_is_judged_by_its_interval():
    # 2 eosinophils of 10 cells is 20 %, far above 1.2-5.3 %, but its 95 % interval (5.7-51 %)
    # reaches down to just above the range: a note, not a caution.
    result = _count({"EOS": 2, "NGS": 4, "LYT": 2, "EBO": 2})
    (eosinophils,) = [f for f in result.findings if f.topic == "eosinophils"]
    assert eosinophils.severity == "info"


@pytest.mark.parametrize(("confidence", "severity"), [(0.9, None), (0.45, "critical")])
def test_a_high_uncertain_share_is_said(confidence, severity):
    result = _count(HEALTHY_MARROW, confidence=confidence)
    uncertain = [f for f in result.findings if f.topic == "uncertain cells"]
    assert [f.severity for f in uncertain] == ([severity] if severity else [])


def test_a_quarter_uncertain_is_a_caution():
    top = np.repeat(list(HEALTHY_MARROW), list(HEALTHY_MARROW.values()))
    confidence = np.where(np.arange(top.size) % 3 == 0, 0.3, 0.9)  # a third uncertain
    result = differential(top, confidence, ALL)
    (uncertain,) = [f for f in result.findings if f.topic == "uncertain cells"]
    assert uncertain.severity == "caution" and "(33 %, 95 % CI" in uncertain.message


def test_a_few_unsure_cells_do_not_call_the_slide_foreign():
    # 2 of 3 cells uncertain is 67 %, but its interval reaches down to 21 %: a note.
    for top, confidence, said in [
        (["LYT"] * 3, [0.3, 0.3, 0.9], "2 of 3 cells (67 %"),
        (["LYT"], [0.3], "1 of 1 cell (100 %"),
    ]:
        result = differential(np.array(top), np.array(confidence), ALL)
        (uncertain,) = [f for f in result.findings if f.topic == "uncertain cells"]
        assert uncertain.severity == "info" and uncertain.message.startswith(said)


def test_ranges_cover_every_counted_group_but_blasts():
    groups = {r.key for r in _count(HEALTHY_MARROW).groups}
    for specimen, ranges in REFERENCE_RANGES.items():
        assert set(ranges) == groups - {"blasts"}, specimen
        assert all(r.low <= r.high < r.far_above for r in ranges.values())
        assert all(r.ceiling is None or r.ceiling > r.far_above for r in ranges.values())


def test_findings_sort_most_severe_first():
    result = _count({"BLA": 300, "EOS": 5, "NGS": 5})
    ranks = [SEVERITIES.index(f.severity) for f in result.findings]
    assert ranks == sorted(ranks, reverse=True)
    assert by_severity(reversed(result.findings))[0].severity == "critical"


def _bccd_mosaic(bccd: Path, path: Path, gap: int = 48) -> Path:
    """Every BCCD image on white glass, in one tiled TIFF: a real smear of a lab none of the
    default card's data comes from."""
    images = [
        np.asarray(Image.open(p).convert("RGB"))[:480, :640]
        for p in sorted((bccd / "JPEGImages").glob("*.jpg"))
    ]
    columns = 20
    rows = -(-len(images) // columns)
    mosaic = np.full((rows * (480 + gap) + gap, columns * (640 + gap) + gap, 3), 255, np.uint8)
    for k, image in enumerate(images):
        y, x = gap + (k // columns) * (480 + gap), gap + (k % columns) * (640 + gap)
        mosaic[y : y + image.shape[0], x : x + image.shape[1]] = image
    tifffile.imwrite(path, mosaic, tile=(256, 256), photometric="rgb", compression="zlib")
    return path


def test_a_real_smear_of_an_unseen_lab_gets_cautions_not_a_false_verdict(shared_data, tmp_path):
    # The v2 card called 75 % of BCCD's white cells eosinophils (BCCD's own labels: 23 %), a
    # critical finding; v3 adapts to the slide and says what it is unsure of instead.
    slide = _bccd_mosaic(shared_data / "bccd", tmp_path / "bccd.tif")
    out = tmp_path / "out"
    done = subprocess.run(
        [BIN / "wsi-run", slide, "--out", out, "--mpp", "0.073", "--specimen", "blood",
         "--region", "all", "--saliency", "none", "--device", "cpu", "--quiet"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary_json = read_summary(out / "bccd.zarr")
    counts = summary_json["counts"]
    assert counts["specimen"] == "blood" and counts["me_ratio"] is None
    assert summary_json["adaptation"]["ran"] and summary_json["adaptation"]["matched_to"]
    assert not [f for f in counts["findings"] if f["severity"] == "critical"]
    cautions = {f["topic"] for f in counts["findings"] if f["severity"] == "caution"}
    assert {"eosinophils", "uncertain cells"} <= cautions
    eosinophils = next(g for g in counts["groups"] if g["key"] == "eosinophils")
    assert eosinophils["percent"] < 45
    page = (out / "bccd.report.html").read_text()
    summary = page[page.index('<section id="summary"') :]
    summary = summary[: summary.index("</section>")]
    assert "<dt>M:E ratio</dt><dd>not applicable to blood</dd>" in summary
