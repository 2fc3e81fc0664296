"""The differential count: denominators, not-assessable classes, intervals and flags."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsi_pipeline.core.taxonomy import codes
from wsi_pipeline.results.counts import ICSH_MIN_CELLS, differential, wilson_interval

ALL = codes()


def _cells(mix: dict[str, int], confidence: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    top = np.repeat(list(mix), list(mix.values()))
    return top, np.full(top.size, confidence)


def _row(rows, key):
    return next(r for r in rows if r.key == key)


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
    assert any("blast percentage not assessable" in f for f in result.flags)
    assert json.loads(json.dumps(result.as_dict()))["blast_percent"] is None


def test_partially_recognised_group_is_a_lower_bound():
    card = [c for c in ALL if c != "NGB"]
    result = differential(*_cells({"NGS": 600}), card)
    neutrophils = _row(result.groups, "neutrophils")
    assert neutrophils.assessable and neutrophils.missing == ("NGB",)
    assert any("neutrophils % is a lower bound" in f for f in result.flags)


@pytest.mark.parametrize(
    ("blasts", "expected"),
    [(10, "(< 5 %)"), (60, "(>= 5 %)"), (120, "(>= 10 %)"), (250, "(>= 20 %)")],
)
def test_blast_thresholds(blasts, expected):
    result = differential(*_cells({"BLA": blasts, "NGS": 1000 - blasts}), ALL)
    assert expected in result.flags[0]
    assert ("WHO threshold" in result.flags[0]) == (blasts >= 200)


def test_small_count_warns_and_no_cells_is_a_clear_result():
    small = differential(*_cells({"NGS": ICSH_MIN_CELLS - 1}), ALL)
    assert any("ICSH" in w for w in small.warnings)
    big = differential(*_cells({"NGS": ICSH_MIN_CELLS}), ALL)
    assert not any("ICSH" in w for w in big.warnings)

    empty = differential(*_cells({"ART": 3}), ALL)
    assert empty.no_white_cells and empty.as_dict()["status"] == "no white cells found"
    assert all(r.percent is None and r.count == 0 for r in empty.classes)
    assert empty.me_ratio is None and empty.blast_percent is None
    json.dumps(empty.as_dict(), allow_nan=False)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="not among the card's classes"):
        differential(["BLA"], [0.9], ["NGS"])
    with pytest.raises(ValueError, match="confidences"):
        differential(["BLA", "NGS"], [0.9], ALL)
    with pytest.raises(KeyError, match="unknown cell class"):
        differential([], [], ["XYZ"])


def test_one_uncertain_cell_is_one_cell():
    result = differential(["NGS", "NGS", "LYT"], [0.9, 0.9, 0.2], ["NGS", "LYT"])
    assert any(w.startswith("1 cell counted as uncertain") for w in result.warnings)
    assert any(w.startswith("only 2 cells countable") for w in result.warnings)
