"""Findings about a differential, graded by how much attention they need, and the reference
ranges that decide whether a differential is plausible.

Every remark the pipeline makes about a count (a blast threshold crossed, too few cells, a class
far outside its reference range, many uncertain cells, what the card cannot recognise) is one
:class:`Finding` with a severity:

``critical``
    Do not use the number without looking at the slide: no white cells, half the cells
    uncertain, a lineage beyond what disease produces (the slide is probably outside what the
    classifier knows: another stain, specimen or lab), blasts at or above the WHO threshold for
    acute leukaemia.
``caution``
    Read the number with its caveat: fewer cells than the count should have, a lineage far
    outside its reference range, many uncertain cells, blasts at 5 % or more, a stain or tiles
    the run could not read as usual.
``info``
    Context: a lineage outside its healthy range, an interval straddling a blast threshold, what
    the card cannot assess.

Reference ranges (percent of the cells counted, adults)
-------------------------------------------------------
Marrow: Wintrobe's Clinical Hematology, 10th ed. (Lee et al., 1999), normal adult marrow
differential; the ranges of Bain (1996, 50 healthy adults) and Parmentier et al. (2020, 236
marrow donors) are close, with more erythroid cells in the latter. Blood: Dacie and Lewis
Practical Haematology, 12th ed. (Bain et al., 2017), adult white-cell differential, where
immature granulocytes, blasts, erythroblasts and plasma cells are absent. The least count is
500 cells for marrow (ICSH 2008, Lee et al., Int J Lab Hematol 30:349) and 200 for blood (CLSI
H20-A2, 2007). The full table and the citations are in ``docs/outputs.md``.

How far is far
--------------
A group is compared by its 95 % interval, so a small count never raises a finding its cells
cannot support:

* **outside** (info): the whole interval lies outside the reference range;
* **far above** (caution): the interval lies above ``high + max(high, 10)`` points, twice the
  upper limit or ten points over it, whichever is more (a margin wider than the differences
  between the published ranges);
* **beyond disease** (critical): the interval lies above the group's *ceiling*, the share that
  the disorders expanding the lineage rarely exceed (eosinophils 60 %: hypereosinophilic
  syndromes; basophils 40 %: basophilic phases of CML; myelocytes and metamyelocytes 60 %;
  marrow neutrophils 80 %). Lineages that a neoplasm can drive to almost every cell (blasts,
  promyelocytes, monocytes, lymphocytes, plasma cells, erythroid cells; blood neutrophils) have
  no ceiling: a very high share of them is disease, not implausible.

These are clinical judgements written down once, not constants fitted to any data set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from wsi_pipeline.results.tally import Tally

__all__ = [
    "FAR_MARGIN",
    "MIN_CELLS",
    "MIN_CELLS_SOURCE",
    "REFERENCE_RANGES",
    "SEVERITIES",
    "SPECIMENS",
    "UNCERTAIN_CAUTION",
    "UNCERTAIN_CRITICAL",
    "Finding",
    "ReferenceRange",
    "by_severity",
    "counted_noun",
    "range_findings",
    "uncertain_findings",
    "worst",
]

Severity = Literal["info", "caution", "critical"]
#: Severities from least to most attention needed.
SEVERITIES: tuple[Severity, ...] = ("info", "caution", "critical")
#: What a finding is about: the patient (clinical), whether the result can be right
#: (plausibility), how well the slide could be counted (quality), what the card cannot tell
#: (scope).
Kind = Literal["clinical", "plausibility", "quality", "scope"]
SPECIMENS = ("marrow", "blood")
#: Least countable cells per specimen, and the recommendation each comes from.
MIN_CELLS = {"marrow": 500, "blood": 200}
MIN_CELLS_SOURCE = {"marrow": "ICSH 2008", "blood": "CLSI H20-A2"}
#: Points over the upper limit that count as far above it, at least (see the module docstring).
FAR_MARGIN = 10.0
#: Shares of uncertain cells among all cells found that need a caution and a critical finding
#: (the lower end of the share's 95 % interval must reach them).
UNCERTAIN_CAUTION = 0.25
UNCERTAIN_CRITICAL = 0.5


@dataclass(frozen=True)
class Finding:
    """One remark about a differential.

    Attributes
    ----------
    severity : {"info", "caution", "critical"}
    kind : {"clinical", "plausibility", "quality", "scope"}
    topic : str
        What it is about: a clinical group (``"eosinophils"``), ``"blasts"``, ``"M:E ratio"``,
        ``"cell count"``, ``"uncertain cells"``, ``"stain"``, ``"tiles"`` or ``"classifier"``.
    message : str
        One sentence for a reader.
    """

    severity: Severity
    kind: Kind
    topic: str
    message: str


@dataclass(frozen=True)
class ReferenceRange:
    """The healthy range of one clinical group, and its ceiling in disease (percent)."""

    low: float
    high: float
    ceiling: float | None = None

    def __str__(self) -> str:
        return f"{self.low:g}-{self.high:g} %" if self.high > self.low else f"{self.high:g} %"

    @property
    def far_above(self) -> float:
        """Share over which a value is far above the range (see the module docstring)."""
        return self.high + max(self.high, FAR_MARGIN)


#: Healthy adult ranges by specimen and clinical group (see the module docstring for sources).
#: Blasts are judged by their WHO thresholds (``counts.BLAST_THRESHOLDS``), not by a range.
REFERENCE_RANGES: dict[str, dict[str, ReferenceRange]] = {
    "marrow": {
        "promyelocytes": ReferenceRange(2.1, 4.1),
        "myelocytes": ReferenceRange(8.2, 15.7, ceiling=60),
        "metamyelocytes": ReferenceRange(9.6, 24.6, ceiling=60),
        "neutrophils": ReferenceRange(15.5, 27.3, ceiling=80),  # band 9.5-15.3 + segmented 6-12
        "eosinophils": ReferenceRange(1.2, 5.3, ceiling=60),
        "basophils": ReferenceRange(0.0, 0.2, ceiling=40),
        "monocytes": ReferenceRange(0.0, 0.8),
        "lymphocytes": ReferenceRange(11.1, 23.2),
        "plasma cells": ReferenceRange(0.4, 3.9),
        "erythroid": ReferenceRange(18.0, 39.0),
    },
    "blood": {
        "promyelocytes": ReferenceRange(0.0, 0.0),
        "myelocytes": ReferenceRange(0.0, 0.0, ceiling=60),
        "metamyelocytes": ReferenceRange(0.0, 0.0, ceiling=60),
        "neutrophils": ReferenceRange(40.0, 80.0),
        "eosinophils": ReferenceRange(1.0, 6.0, ceiling=60),
        "basophils": ReferenceRange(0.0, 2.0, ceiling=40),
        "monocytes": ReferenceRange(2.0, 10.0),
        "lymphocytes": ReferenceRange(20.0, 40.0),
        "plasma cells": ReferenceRange(0.0, 0.0),
        "erythroid": ReferenceRange(0.0, 0.0),
    },
}

_OUTSIDE_KNOWLEDGE = (
    "The slide is probably outside what the classifier knows (another stain, specimen or lab);"
    " check the cells before using any number."
)


def _value(row: Tally) -> str:
    if row.percent is None or row.ci95 is None:
        raise ValueError(f"{row.key} has no percentage to compare")
    low, high = row.ci95
    return f"{row.key} {row.percent:.1f} % (95 % CI {low:.1f}-{high:.1f})"


def _above_finding(row: Tally, reference: ReferenceRange, specimen: str) -> Finding | None:
    # A group with no cell is never above its range (its interval's floor is 0 up to rounding).
    low = row.ci95[0] if row.ci95 is not None and row.count else None
    if low is None or low <= reference.high:
        return None
    healthy = f"healthy {specimen} {reference}"
    if reference.ceiling is not None and low > reference.ceiling:
        message = (
            f"{_value(row)}: more than disease produces in {specimen} (rarely over "
            f"{reference.ceiling:g} %; {healthy}). {_OUTSIDE_KNOWLEDGE}"
        )
        return Finding("critical", "plausibility", row.key, message)
    if low > reference.far_above:
        message = f"{_value(row)}: far above the reference range ({healthy}); check the slide"
        return Finding("caution", "plausibility", row.key, message)
    return Finding("info", "plausibility", row.key, f"{_value(row)}: above {healthy}")


def range_findings(groups: Iterable[Tally], specimen: str) -> list[Finding]:
    """Findings for the clinical groups outside their reference ranges.

    Parameters
    ----------
    groups : iterable of Tally
        Group rows of a differential (``Differential.groups``).
    specimen : {"marrow", "blood"}

    Returns
    -------
    list of Finding
        One per group above its range, most severe first, then one for all the groups below
        theirs (a low share is seldom a sign of a wrong count, and one line reads better).
    """
    if specimen not in REFERENCE_RANGES:
        raise ValueError(f"specimen must be one of {SPECIMENS}, got {specimen!r}")
    ranges = REFERENCE_RANGES[specimen]
    rows = [g for g in groups if g.key in ranges and g.ci95 is not None]
    above = (_above_finding(g, ranges[g.key], specimen) for g in rows)
    below = [
        f"{_value(g)}, healthy {ranges[g.key]}"
        for g in rows
        if g.ci95 is not None and g.ci95[1] < ranges[g.key].low
    ]
    findings = by_severity(f for f in above if f is not None)
    if below:
        message = f"below the healthy {specimen} range: {'; '.join(below)}"
        findings.append(Finding("info", "plausibility", "low groups", message))
    return findings


def uncertain_findings(
    uncertain: int, total: int, rule: str, ci95: tuple[float, float]
) -> list[Finding]:
    """A finding on the share of uncertain cells; none when no cell is uncertain.

    Like a group against its range, the share is graded by the lower end of its 95 % interval
    against :data:`UNCERTAIN_CAUTION` and :data:`UNCERTAIN_CRITICAL`, so that one unsure cell
    out of two does not call a slide foreign to the classifier.

    Parameters
    ----------
    uncertain, total : int
        Uncertain cells and all cells found.
    rule : str
        When a cell counts as uncertain, in words.
    ci95 : (float, float)
        95 % interval of the uncertain share, in percent.
    """
    if not uncertain or not total:
        return []
    low, high = ci95
    said = (
        f"{uncertain} of {counted_noun(total)} ({100 * uncertain / total:.0f} %, 95 % CI "
        f"{low:.0f}-{high:.0f} %) are uncertain ({rule})"
    )
    if low >= 100 * UNCERTAIN_CRITICAL:
        return [
            Finding("critical", "plausibility", "uncertain cells", f"{said}: {_OUTSIDE_KNOWLEDGE}")
        ]
    if low >= 100 * UNCERTAIN_CAUTION:
        message = f"{said}: the classifier is unsure of many cells; review them (Review priority)"
        return [Finding("caution", "plausibility", "uncertain cells", message)]
    return [Finding("info", "quality", "uncertain cells", f"{said}; left out of the count")]


def counted_noun(n: int, noun: str = "cell") -> str:
    """``"1 cell"``, ``"2 cells"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def by_severity(findings: Iterable[Finding]) -> list[Finding]:
    """Findings most severe first, in their given order within a severity."""
    return sorted(findings, key=lambda f: -SEVERITIES.index(f.severity))


def worst(findings: Sequence[Finding]) -> Severity | None:
    """The highest severity among ``findings``; None when there are none."""
    return max((f.severity for f in findings), key=SEVERITIES.index, default=None)
