"""Temperature scaling and the expected calibration error."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.learn.calibrate import (
    ensemble_probabilities,
    expected_calibration_error,
    fit_temperature,
)


def sampled(temperature: float, n: int = 4000, classes: int = 5, seed: int = 0):
    """Logits of a 2-member ensemble whose labels are drawn from softmax(logits / temperature):
    calibrated exactly at that temperature."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (1, n, classes)).repeat(2, axis=0)
    p = ensemble_probabilities(logits, temperature)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return logits, labels


@pytest.mark.parametrize("truth", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_temperature_labels_were_drawn_at(truth):
    logits, labels = sampled(truth)
    assert fit_temperature(logits, labels) == pytest.approx(truth, rel=0.1)


def test_calibration_lowers_the_expected_calibration_error():
    logits, labels = sampled(2.5)
    before = expected_calibration_error(ensemble_probabilities(logits), labels)
    after = expected_calibration_error(
        ensemble_probabilities(logits, fit_temperature(logits, labels)), labels
    )
    assert before > 0.1 > 0.03 > after


def test_ece_counts_labels_the_card_lacks_as_wrong():
    p = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert expected_calibration_error(p, [0, 0]) == pytest.approx(0.1)
    assert expected_calibration_error(p, [0, 7]) == pytest.approx(0.4)
