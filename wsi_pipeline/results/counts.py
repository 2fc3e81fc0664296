"""The marrow differential count: per class and per clinical group, with 95 % Wilson intervals.

Rules
-----
* A cell whose confidence is under ``threshold`` is **uncertain**: reported, never assigned to its
  top class, and left out of the denominator.
* Confident cells of a class that a marrow differential does not count (taxonomy's groups
  ``"not counted"``: ART artefact, KSC smudge cell, NIF not identifiable; and ``"other"``: OTH) are
  reported separately and left out of the denominator.
* The remaining cells are **countable**; percentages are of the countable cells.
* A class the classifier card does not have is **not assessable**: its count and percentage are
  ``None``, never 0. A group is assessable when the card has at least one of its classes; when the
  card lacks some of them, its percentage is a lower bound and a flag says which are missing.
* M:E ratio (myeloid to erythroid), the standard marrow definition: myeloid = granulocytes and their
  precursors, i.e. blasts, promyelocytes (and faggot cells), myelocytes, metamyelocytes, band and
  segmented neutrophils, eosinophils (and abnormal eosinophils), basophils; monocytes are **not**
  included. Erythroid = proerythroblasts (PEB) and erythroblasts (EBO). Blasts are counted as
  myeloid because most marrow blasts are myeloblasts (the MLL BLA class does not say the lineage).
* Blast percentage is judged against 5 % (upper limit of normal marrow), 10 % and 20 % (WHO
  threshold for acute leukaemia), with a note when its 95 % interval straddles a threshold.
* Fewer countable cells than the specimen needs (``plausibility.MIN_CELLS``: 500 for marrow,
  ICSH 2008; 200 for blood) makes the count inadequate. No countable cell at all gives a
  "no white cells found" result.
* Every remark is a graded :class:`~wsi_pipeline.results.plausibility.Finding`, including the
  groups outside the specimen's reference ranges and a high share of uncertain cells (see
  :mod:`wsi_pipeline.results.plausibility`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from wsi_pipeline.core.taxonomy import CLASSES, GROUPS, cell_class
from wsi_pipeline.results.plausibility import (
    MIN_CELLS,
    MIN_CELLS_SOURCE,
    Finding,
    Severity,
    by_severity,
    counted_noun,
    range_findings,
    uncertain_findings,
)
from wsi_pipeline.results.tally import Tally, tally, wilson_interval

# Tally (the type of every row of a Differential) and wilson_interval (the interval of every
# share in it) are part of what a differential is, so they are importable from here too.
__all__ = [
    "DEFAULT_CONFIDENCE_THRESHOLD",
    "BLAST_THRESHOLDS",
    "MYELOID_GROUPS",
    "ERYTHROID_GROUPS",
    "Tally",
    "Differential",
    "differential",
    "wilson_interval",
]

DEFAULT_CONFIDENCE_THRESHOLD = 0.5
#: Least share of an ensemble's members that must share its top class: a majority of three or
#: more, both of two.
DEFAULT_MIN_AGREEMENT = 0.6
BLAST_THRESHOLDS = (5.0, 10.0, 20.0)
MYELOID_GROUPS = (
    "blasts",
    "promyelocytes",
    "myelocytes",
    "metamyelocytes",
    "neutrophils",
    "eosinophils",
    "basophils",
)
ERYTHROID_GROUPS = ("erythroid",)
NO_WHITE_CELLS = "no white cells found"
#: Why a card without a blast class cannot give a blast percentage.
NO_BLAST_CLASS = "the classifier card has no blast (BLA) class"


@dataclass(frozen=True)
class Differential:
    """A marrow differential count (see the module docstring for the rules).

    Attributes
    ----------
    classes : tuple of Tally
        The countable MLL classes, in taxonomy order.
    groups : tuple of Tally
        The clinical groups that enter the denominator, in differential order.
    not_counted : tuple of Tally
        Classes reported outside the denominator (percent of all cells found).
    total_cells, uncertain, countable : int
        Cells found; uncertain (see :func:`certain`); in the denominator.
    threshold : float
        Confidence threshold applied.
    min_agreement : float or None
        Least share of agreeing snapshots applied; None when the members' agreement was not
        given.
    novelty_rule : bool
        Whether cells unlike every known class (novelty above 1) were counted as uncertain.
    me_ratio : float or None
        Myeloid / erythroid; ``None`` when not assessable or undefined (see ``flags``).
    blast_percent : float or None
        Blasts among countable cells; ``None`` when not assessable.
    blast_ci95 : tuple of float or None
    card_classes : tuple of str
        Codes the card recognises.
    specimen : {"marrow", "blood"}
        What was counted; chooses the reference ranges and the least count.
    findings : tuple of Finding
        Everything worth saying about the count, most severe first.
    """

    classes: tuple[Tally, ...]
    groups: tuple[Tally, ...]
    not_counted: tuple[Tally, ...]
    total_cells: int
    uncertain: int
    countable: int
    threshold: float
    min_agreement: float | None
    novelty_rule: bool
    me_ratio: float | None
    blast_percent: float | None
    blast_ci95: tuple[float, float] | None
    card_classes: tuple[str, ...]
    specimen: str
    findings: tuple[Finding, ...]

    @property
    def no_white_cells(self) -> bool:
        """Whether nothing was countable."""
        return self.countable == 0

    @property
    def min_cells(self) -> int:
        """Least countable cells an adequate count of this specimen holds."""
        return MIN_CELLS[self.specimen]

    @property
    def adequate(self) -> bool:
        """Whether enough cells were counted (:attr:`min_cells`)."""
        return self.countable >= self.min_cells

    @property
    def blast_not_assessable(self) -> str | None:
        """Why the blast percentage is not assessable; None when it is."""
        if "BLA" not in self.card_classes:
            return NO_BLAST_CLASS
        if self.no_white_cells:
            return NO_WHITE_CELLS
        return None

    def with_findings(self, *findings: Finding) -> Differential:
        """A copy with ``findings`` added, most severe first."""
        return replace(self, findings=tuple(by_severity((*self.findings, *findings))))

    @property
    def uncertain_rule(self) -> str:
        """When a cell counts as uncertain, in words."""
        rule = f"confidence < {self.threshold:g}"
        if self.min_agreement is not None:
            rule += f" or snapshot agreement < {self.min_agreement:g}"
        if self.novelty_rule:
            rule += " or novelty > 1 (unlike every class the card knows)"
        return rule

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples become lists, ``None`` stays ``null``)."""
        out = asdict(self)
        out["status"] = NO_WHITE_CELLS if self.no_white_cells else "ok"
        out["uncertain_rule"] = self.uncertain_rule
        out["min_cells"] = self.min_cells
        out["adequate"] = self.adequate
        return out


def _validated_codes(
    top_class_codes: ArrayLike, confidences: ArrayLike, card_classes: Sequence[str]
) -> tuple[NDArray[np.str_], NDArray[np.float64]]:
    codes = np.asarray(top_class_codes, dtype=str).reshape(-1)
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    if codes.shape != conf.shape:
        raise ValueError(f"{codes.size} class codes but {conf.size} confidences")
    for code in card_classes:
        cell_class(code)  # raises on a code outside the 21 MLL classes
    foreign = np.setdiff1d(np.unique(codes), np.asarray(card_classes, dtype=str))
    if foreign.size:
        raise ValueError(f"top classes {', '.join(foreign)} are not among the card's classes")
    return codes, conf


def _blast_findings(blasts: Tally) -> list[Finding]:
    if not blasts.assessable:
        message = f"blast percentage not assessable: {NO_BLAST_CLASS}"
        return [Finding("caution", "scope", "blasts", message)]
    percent, ci95 = blasts.percent, blasts.ci95
    if percent is None:
        return []  # nothing countable: the no-white-cells finding says so
    if ci95 is None:
        raise ValueError("a blast percentage without its 95 % interval")
    crossed = [t for t in BLAST_THRESHOLDS if percent >= t]
    level = f">= {crossed[-1]:g} %" if crossed else f"< {BLAST_THRESHOLDS[0]:g} %"
    message = f"blasts {percent:.1f} % ({level})"
    severity: Severity = "caution" if crossed else "info"
    if crossed and crossed[-1] == BLAST_THRESHOLDS[-1]:
        message += ": at or above the WHO threshold for acute leukaemia"
        severity = "critical"
    low, high = ci95
    straddled = [f"{t:g} %" for t in BLAST_THRESHOLDS if low < t <= high]
    findings = [Finding(severity, "clinical", "blasts", message)]
    if straddled:
        which = " and ".join(
            [", ".join(straddled[:-1]), straddled[-1]] if len(straddled) > 1 else straddled
        )
        said = f"blast % 95 % CI {low:.1f}-{high:.1f} straddles {which}"
        findings.append(Finding("info", "clinical", "blasts", said))
    return findings


def _me_ratio(groups: dict[str, Tally], specimen: str) -> tuple[float | None, list[Finding]]:
    def said(message: str) -> Finding:
        return Finding("info", "scope", "M:E ratio", message)

    if specimen != "marrow":
        return None, []  # a marrow measure: blood holds (almost) no erythroid precursors
    myeloid = [groups[g] for g in MYELOID_GROUPS]
    erythroid = [groups[g] for g in ERYTHROID_GROUPS]
    if not any(t.assessable for t in myeloid) or not any(t.assessable for t in erythroid):
        lack = "the classifier card lacks the myeloid or the erythroid classes"
        return None, [said(f"M:E ratio not assessable: {lack}")]
    findings = []
    missing = [c for t in myeloid + erythroid for c in t.missing]
    if missing:
        findings.append(said(f"M:E ratio partial: the classifier card lacks {', '.join(missing)}"))
    m = sum(t.count or 0 for t in myeloid)
    e = sum(t.count or 0 for t in erythroid)
    if e == 0:
        return None, [*findings, said("M:E ratio undefined: no erythroid cells counted")]
    return m / e, findings


def _scope_findings(groups: Sequence[Tally]) -> list[Finding]:
    """One finding for all the groups the card cannot assess (wholly or in part): a reader
    needs to know once what the card is blind to, not once per group."""
    lacking = [g for g in groups if g.missing and g.key != "blasts"]
    if not lacking:
        return []
    parts = [
        f"{g.key} ({', '.join(g.missing)}{'' if not g.assessable else '; a lower bound'})"
        for g in lacking
    ]
    message = f"not assessable with this classifier card: {'; '.join(parts)}"
    return [Finding("info", "scope", "classifier", message)]


def _count_findings(countable: int, total: int, specimen: str) -> list[Finding]:
    if countable == 0:
        message = f"{NO_WHITE_CELLS}: no countable white cell among {counted_noun(total, 'object')}"
        return [Finding("critical", "quality", "cell count", message)]
    needed = MIN_CELLS[specimen]
    if countable < needed:
        message = (
            f"only {counted_noun(countable)} countable; a {specimen} differential needs at least "
            f"{needed} ({MIN_CELLS_SOURCE[specimen]}), so the intervals are wide"
        )
        return [Finding("caution", "quality", "cell count", message)]
    return []


def certain(
    confidence: ArrayLike,
    agreement: ArrayLike | None = None,
    threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    novelty: ArrayLike | None = None,
) -> NDArray[np.bool_]:
    """Which cells are assigned to their top class; the others are *uncertain*.

    A cell is certain when its (calibrated) confidence reaches ``threshold``, where the
    members' ``agreement`` is known at least ``min_agreement`` of the ensemble's members share
    its top class, and where its ``novelty`` is known it is at most 1 (its features lie as near
    a known class as the validation cells'; NaN, no novelty model, passes).
    """
    sure = np.asarray(confidence) >= threshold
    if agreement is not None:
        sure &= np.asarray(agreement) >= min_agreement
    if novelty is not None:
        sure &= ~(np.asarray(novelty) > 1.0)
    return sure


def differential(
    top_class_codes: ArrayLike,
    confidences: ArrayLike,
    card_classes: Sequence[str],
    threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    agreement: ArrayLike | None = None,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    specimen: str = "marrow",
    novelty: ArrayLike | None = None,
) -> Differential:
    """Count a classified cell table into a differential.

    Parameters
    ----------
    top_class_codes : array_like of str, shape (N,)
        MLL code of each cell's top class.
    confidences : array_like of float, shape (N,)
        Probability of that top class.
    card_classes : sequence of str
        Codes the classifier card recognises.
    threshold : float
        Cells with ``confidence < threshold`` are counted as uncertain.
    agreement : array_like of float, shape (N,), optional
        Share of the ensemble's members that share each cell's top class.
    min_agreement : float
        Cells with ``agreement < min_agreement`` are counted as uncertain too.
    specimen : {"marrow", "blood"}
        What was counted: chooses the reference ranges, the least count and whether an M:E
        ratio applies.
    novelty : array_like of float, shape (N,), optional
        Each cell's novelty; cells above 1 (unlike every class the card knows) are counted as
        uncertain too.

    Returns
    -------
    Differential

    Raises
    ------
    ValueError
        Mismatched lengths, a code outside the 21 MLL classes, a top class the card lacks, or
        an unknown specimen.
    """
    if specimen not in MIN_CELLS:
        raise ValueError(f"specimen must be one of {', '.join(MIN_CELLS)}, got {specimen!r}")
    codes, conf = _validated_codes(top_class_codes, confidences, card_classes)
    known = set(card_classes)
    confident = certain(conf, agreement, threshold, min_agreement, novelty)
    found, found_counts = np.unique(codes[confident], return_counts=True)
    per_code = dict(zip(found.tolist(), found_counts.tolist(), strict=True))
    counted = [c for c in CLASSES if c.counted]
    countable = sum(per_code.get(c.code, 0) for c in counted)
    total = int(codes.size)

    classes = tuple(
        tally(c.code, c.name, c.group, per_code.get(c.code, 0), countable, c.code in known)
        for c in counted
    )
    not_counted = tuple(
        tally(c.code, c.name, c.group, per_code.get(c.code, 0), total, c.code in known)
        for c in CLASSES
        if not c.counted
    )
    groups = {}
    for group in (g for g in GROUPS if any(c.group == g for c in counted)):
        members = [c.code for c in counted if c.group == group]
        missing = tuple(m for m in members if m not in known)
        count = sum(per_code.get(m, 0) for m in members)
        groups[group] = tally(
            group, group, group, count, countable, len(missing) < len(members), missing
        )

    me_ratio, me_findings = _me_ratio(groups, specimen)
    uncertain = int(total - confident.sum())
    uncertain_share = tally("uncertain", "uncertain", "", uncertain, total, True)
    result = Differential(
        classes=classes,
        groups=tuple(groups.values()),
        not_counted=not_counted,
        total_cells=total,
        uncertain=uncertain,
        countable=countable,
        threshold=float(threshold),
        min_agreement=None if agreement is None else float(min_agreement),
        novelty_rule=novelty is not None and bool(np.isfinite(np.asarray(novelty)).any()),
        me_ratio=me_ratio,
        blast_percent=groups["blasts"].percent,
        blast_ci95=groups["blasts"].ci95,
        card_classes=tuple(card_classes),
        specimen=specimen,
        findings=(),
    )
    return result.with_findings(
        *_count_findings(countable, total, specimen),
        *_blast_findings(groups["blasts"]),
        *range_findings(groups.values(), specimen),
        *uncertain_findings(
            uncertain, total, result.uncertain_rule, uncertain_share.ci95 or (0, 0)
        ),
        *me_findings,
        *_scope_findings(list(groups.values())),
    )
