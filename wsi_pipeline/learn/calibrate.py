"""Calibration: make a card's confidence mean what it says, and measure how far it does.

An ensemble's averaged softmax is usually over- or under-confident. Temperature scaling (Guo et
al., 2017) divides every member's logits by one temperature ``T`` fitted on the validation split
to minimise the negative log-likelihood of the averaged probabilities; the ranking of the classes
is unchanged, only the confidence moves. The expected calibration error (ECE) is the mean gap
between confidence and accuracy over 15 equal-width confidence bins, weighted by the bins' cells.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import minimize_scalar

__all__ = [
    "ECE_BINS",
    "ensemble_probabilities",
    "expected_calibration_error",
    "fit_temperature",
]

ECE_BINS = 15
#: The temperatures searched: from very sharp to very flat.
TEMPERATURE_RANGE = (0.05, 20.0)


def ensemble_probabilities(logits: ArrayLike, temperature: float = 1.0) -> NDArray[np.float64]:
    """Mean over members of ``softmax(logits / temperature)``.

    Parameters
    ----------
    logits : array_like, shape (M, N, C)
        Each member's logits of N cells over C classes.
    temperature : float

    Returns
    -------
    ndarray, shape (N, C)
    """
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=2, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(axis=2, keepdims=True)).mean(axis=0)


def fit_temperature(logits: ArrayLike, labels: ArrayLike) -> float:
    """The temperature that minimises the negative log-likelihood of the ensemble's mean
    probabilities on labelled cells (``logits`` (M, N, C), ``labels`` (N,))."""
    labels = np.asarray(labels)
    logits = np.asarray(logits, dtype=np.float64)

    def nll(log_t: float) -> float:
        p = ensemble_probabilities(logits, float(np.exp(log_t)))
        return -float(np.mean(np.log(p[np.arange(len(labels)), labels] + 1e-12)))

    bounds = tuple(np.log(TEMPERATURE_RANGE))
    result = minimize_scalar(nll, bounds=bounds, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def expected_calibration_error(
    probabilities: ArrayLike, labels: ArrayLike, bins: int = ECE_BINS
) -> float:
    """Expected calibration error of the top-class confidence, in [0, 1].

    Parameters
    ----------
    probabilities : array_like, shape (N, C)
    labels : array_like, shape (N,)
        True class indices; a label outside ``0..C-1`` (a class the card lacks) counts as wrong.
    bins : int
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if not len(p):
        return float("nan")
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == np.asarray(labels)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = np.bincount(which, minlength=bins)
    gap = np.abs(
        np.bincount(which, weights=correct, minlength=bins)
        - np.bincount(which, weights=confidence, minlength=bins)
    )
    return float(gap.sum() / total.sum())
