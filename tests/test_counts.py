"""The differential count: denominators, not-assessable classes, intervals and flags."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsi_pipeline.core.taxonomy import codes
from wsi_pipeline.results.counts import differential, wilson_interval
from wsi_pipeline.results.plausibility import MIN_CELLS

ALL = codes()


def _cells(mix: dict[str, int], confidence: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    top = np.repeat(list(mix), list(mix.values()))
    return top, np.full(top.size, confidence)


def _row(rows, key):
    return next(r for r in rows if r.key == key)


def _said(result, severity=None):
    return [f.message for f in result.findings if severity in (None, f.severity)]


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Table I: 0/10 -> 0-27.75 %, 5/10 -> 23.66-76.34 %.
    low, high = wilson_interval([0, 5], 10)
    np.testing.assert_allclose(low, [0.0, 23.66], atol=0.01)
    np.testing.assert_allclose(high, [27.75, 76.34], atol=0.01)


def test_percentages_use_countable_cells_only():
    top, conf = _cells({"BLA": 60, "NGS": 300, "EBO": 200, "MON": 40, "ART": 50, "OTH": 10})
    conf[:30] = 0.2  # 30 blasts are uncertain
    result = differential(top, conf, ALL, threshold=0.5)
    assert result.total_cells == 660
    assert result.uncertain == 30
    assert result.countable == 30 + 300 + 200 + 40
    assert _row(result.classes, "BLA").percent == pytest.approx(100 * 30 / 570)
    assert sum(r.percent for r in result.classes) == pytest.approx(100)
    assert _row(result.not_counted, "ART").count == 50
    assert _row(result.not_counted, "OTH").count == 10
    assert all(r.key not in {"ART", "KSC", "NIF", "OTH"} for r in result.classes)


def test_me_ratio_excludes_monocytes():
    top, conf = _cells({"NGS": 300, "BLA": 30, "EOS": 30, "MON": 100, "EBO": 90, "PEB": 30})
    result = differential(top, conf, ALL)
    assert result.me_ratio == pytest.approx(360 / 120)


def test_missing_class_is_not_assessable_never_zero():
    card = [c for c in ALL if c != "BLA"]
    top, conf = _cells({"NGS": 600, "EBO": 100})
    result = differential(top, conf, card)
    blasts = _row(result.classes, "BLA")
    assert blasts.count is None and blasts.percent is None and not blasts.assessable
    assert result.blast_percent is None
    assert any("blast percentage not assessable" in f for f in _said(result, "caution"))
    assert result.blast_not_assessable == "the classifier card has no blast (BLA) class"
    assert json.loads(json.dumps(result.as_dict()))["blast_percent"] is None


def test_partially_recognised_group_is_a_lower_bound():
    card = [c for c in ALL if c != "NGB"]
    result = differential(*_cells({"NGS": 600}), card)
    neutrophils = _row(result.groups, "neutrophils")
    assert neutrophils.assessable and neutrophils.missing == ("NGB",)
    (scope,) = [f for f in result.findings if f.kind == "scope" and f.topic == "classifier"]
    assert scope.severity == "info" and "neutrophils (NGB; a lower bound)" in scope.message


def test_what_the_card_lacks_is_one_note_not_one_per_group():
    card = ["NGS", "LYT", "BLA", "ART"]
    result = differential(*_cells({"NGS": 300, "LYT": 200}), card)
    scope = [f for f in result.findings if f.topic == "classifier"]
    assert len(scope) == 1 and scope[0].severity == "info"
    for group in ("promyelocytes", "myelocytes", "monocytes", "plasma cells", "erythroid"):
        assert group in scope[0].message


@pytest.mark.parametrize(
    ("blasts", "expected", "severity"),
    [
        (10, "(< 5 %)", "info"),
        (60, "(>= 5 %)", "caution"),
        (120, "(>= 10 %)", "caution"),
        (250, "(>= 20 %)", "critical"),
    ],
)
def test_blast_thresholds(blasts, expected, severity):
    result = differential(*_cells({"BLA": blasts, "NGS": 1000 - blasts}), ALL)
    (finding,) = [
        f for f in result.findings if f.topic == "blasts" and "straddles" not in f.message
    ]
    assert expected in finding.message and finding.severity == severity
    assert ("WHO threshold" in finding.message) == (blasts >= 200)


def test_small_count_warns_and_no_cells_is_a_clear_result():
    small = differential(*_cells({"NGS": MIN_CELLS["marrow"] - 1}), ALL)
    assert any("ICSH 2008" in w for w in _said(small, "caution")) and not small.adequate
    big = differential(*_cells({"NGS": MIN_CELLS["marrow"]}), ALL)
    assert not any("ICSH" in w for w in _said(big)) and big.adequate
    blood = differential(*_cells({"NGS": MIN_CELLS["blood"]}), ALL, specimen="blood")
    assert blood.adequate and blood.min_cells == 200 and blood.me_ratio is None

    empty = differential(*_cells({"ART": 3}), ALL)
    assert empty.no_white_cells and empty.as_dict()["status"] == "no white cells found"
    assert all(r.percent is None and r.count == 0 for r in empty.classes)
    assert empty.me_ratio is None and empty.blast_percent is None
    assert empty.blast_not_assessable == "no white cells found"
    assert (
        empty.findings[0].severity == "critical" and "no white cells" in empty.findings[0].message
    )
    json.dumps(empty.as_dict(), allow_nan=False)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="not among the card's classes"):
        differential(["BLA"], [0.9], ["NGS"])
    with pytest.raises(ValueError, match="confidences"):
        differential(["BLA", "NGS"], [0.9], ALL)
    with pytest.raises(KeyError, match="unknown cell class"):
        differential([], [], ["XYZ"])
    with pytest.raises(ValueError, match="specimen"):
        differential([], [], ALL, specimen="urine")


def test_one_uncertain_cell_is_one_cell():
    result = differential(["NGS", "NGS", "LYT"], [0.9, 0.9, 0.2], ["NGS", "LYT"])
    assert any(w.startswith("1 of 3 cells (33 %") for w in _said(result))
    assert any(w.startswith("only 2 cells countable") for w in _said(result))
