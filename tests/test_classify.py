"""Batched inference with the shipped synthetic-demo card on real synthetic-slide crops."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from wsi_pipeline.learn.datasets import load_crops, scan_labelled_folder, write_synthetic_crops
from wsi_pipeline.model.cards import load_card
from wsi_pipeline.model.classify import Classifier, classify_crops, get_classifier

CARD = "synthetic-demo"


@pytest.fixture(scope="module")
def synthetic_cells(tmp_path_factory):
    """Crops and labels of every white cell of one small held-out synthetic slide."""
    folder = tmp_path_factory.mktemp("cells")
    write_synthetic_crops(folder, seeds=[1001], slide_size=(4000, 3000))
    items = scan_labelled_folder(folder)
    crops = load_crops([i.path for i in items], 96, 32.0, source_mpp=None)
    return crops, [i.label for i in items]


@pytest.fixture(scope="module")
def classifier():
    return get_classifier(CARD, device="cpu")


def test_probabilities_and_accuracy_on_held_out_synthetic_cells(classifier, synthetic_cells):
    crops, labels = synthetic_cells
    probabilities = classifier.predict_proba(crops)
    assert probabilities.shape == (len(crops), len(classifier.codes))
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    predicted = [classifier.codes[i] for i in probabilities.argmax(1)]
    accuracy = np.mean([p == t for p, t in zip(predicted, labels, strict=True)])
    assert len(crops) > 30 and accuracy > 0.75  # held-out test split: 0.88


def test_batch_size_does_not_change_the_result(classifier, synthetic_cells):
    crops = synthetic_cells[0][:20]
    small = Classifier(classifier.card, device="cpu", batch_size=3)
    np.testing.assert_allclose(
        small.predict_proba(crops), classifier.predict_proba(crops), atol=1e-5
    )


def test_cpu_threads_share_the_batches_without_changing_the_result(classifier, synthetic_cells):
    crops = synthetic_cells[0][:20]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = classifier.predict_proba(crops)
        torch.set_num_threads(3)
        shared = classifier.predict_proba(crops)  # three workers of 7, 7 and 6 crops
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(shared, alone, atol=1e-5)


def test_stream_workers_do_not_wait_for_each_other(classifier):
    """A worker held up by one item does not hold the others: item 0 waits for item 2, which
    only a worker free to go on without waiting at a barrier can start."""
    item_two_started = threading.Event()
    seen: list[tuple[int, int, int]] = []

    def work(item: int) -> int:
        if item == 0 and not item_two_started.wait(timeout=30):
            raise AssertionError("item 2 never started while item 0 was in progress")
        if item == 2:
            item_two_started.set()
        seen.append((item, threading.get_ident(), torch.get_num_threads()))
        return item * item

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert list(classifier.stream(work, range(9))) == [i * i for i in range(9)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert len({ident for _, ident, _ in seen}) == 2
    assert {torch_threads for *_, torch_threads in seen} == {1}


def test_stream_passes_errors_on_and_restores_torch_threads(classifier):
    def work(item: int) -> int:
        if item == 3:
            raise ValueError("bad item")
        return item

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(ValueError, match="bad item"):
            list(classifier.stream(work, range(8)))
        assert torch.get_num_threads() == 2
        assert classifier.predict_proba(np.zeros((2, 96, 96, 3), np.uint8)).shape[0] == 2
    finally:
        torch.set_num_threads(threads)


def test_test_time_augmentation_averages_dihedral_views(classifier, synthetic_cells):
    crops = synthetic_cells[0][:8]
    np.testing.assert_array_equal(
        classifier.predict_proba(crops, tta=1), classifier.predict_proba(crops)
    )
    with_tta = classifier.predict_proba(crops, tta=8)
    np.testing.assert_allclose(with_tta.sum(1), 1.0, atol=1e-5)
    # A crop turned by 90° gives the same 8-view average: the views are the same set.
    turned = np.ascontiguousarray(np.rot90(crops, 1, axes=(1, 2)))
    np.testing.assert_allclose(classifier.predict_proba(turned, tta=8), with_tta, atol=1e-4)


def test_an_ensemble_averages_its_members(classifier, synthetic_cells):
    crops = synthetic_cells[0][:8]
    card = classifier.card
    members = [
        Classifier(dataclasses.replace(card, weights=(w,)), device="cpu").predict_proba(crops)
        for w in card.weights
    ]
    np.testing.assert_allclose(classifier.predict_proba(crops), np.mean(members, 0), atol=1e-5)


def test_the_model_is_built_once_per_card_and_device(classifier, synthetic_cells):
    assert get_classifier(load_card(CARD).path, device="cpu") is classifier
    probabilities = classify_crops(synthetic_cells[0][:2], CARD, device="cpu")
    assert probabilities.shape == (2, len(classifier.codes))


def test_wrong_crop_shape_is_a_clear_error(classifier):
    with pytest.raises(ValueError, match=r"uint8 \(N, 96, 96, 3\).*synthetic-demo"):
        classifier.predict_proba(np.zeros((1, 64, 64, 3), np.uint8))
