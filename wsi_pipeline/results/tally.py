"""One row of a differential (:class:`Tally`: a class or a clinical group, its count, its share
and the share's 95 % Wilson interval), shared by the count that makes the rows
(:mod:`wsi_pipeline.results.counts`) and the findings that judge them
(:mod:`wsi_pipeline.results.plausibility`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["Tally", "tally", "wilson_interval"]

_Z95 = 1.959963984540054


def wilson_interval(
    k: ArrayLike, n: int, z: float = _Z95
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Wilson score interval of the proportion ``k / n``, in percent.

    Parameters
    ----------
    k : array_like of int
        Successes.
    n : int
        Trials (> 0).
    z : float
        Normal quantile; the default gives a 95 % interval.

    Returns
    -------
    low, high : ndarray of float64
        Bounds in percent, within [0, 100].
    """
    if n <= 0:
        raise ValueError(f"the Wilson interval needs n > 0, got {n}")
    p = np.asarray(k, dtype=np.float64) / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * np.sqrt(p * (1 - p) / n + z2n / (4 * n))
    return np.clip(centre - half, 0, 1) * 100, np.clip(centre + half, 0, 1) * 100


@dataclass(frozen=True)
class Tally:
    """One row of the differential: a class or a clinical group.

    Attributes
    ----------
    key : str
        Class code or group name.
    label : str
        Full class name or group name.
    group : str
        Clinical group (the group itself for a group row).
    count : int or None
        Cells counted; ``None`` when not assessable.
    percent : float or None
        Share of the countable cells; ``None`` when not assessable or when nothing was countable.
    ci95 : tuple of float or None
        95 % Wilson interval of ``percent``.
    assessable : bool
        Whether the card can recognise (at least part of) this row.
    missing : tuple of str
        For a group, the member classes the card lacks.
    """

    key: str
    label: str
    group: str
    count: int | None
    percent: float | None
    ci95: tuple[float, float] | None
    assessable: bool
    missing: tuple[str, ...] = ()


def tally(
    key: str,
    label: str,
    group: str,
    count: int,
    denominator: int,
    assessable: bool,
    missing: tuple[str, ...] = (),
) -> Tally:
    """The row of ``count`` cells out of ``denominator``: no count when the card cannot assess
    it, no share when nothing was counted, else the share in percent with its interval."""
    if not assessable:
        return Tally(key, label, group, None, None, None, False, missing)
    if denominator == 0:
        return Tally(key, label, group, count, None, None, True, missing)
    low, high = wilson_interval(count, denominator)
    ci95 = (float(low), float(high))
    return Tally(key, label, group, count, 100 * count / denominator, ci95, True, missing)
