"""Training on a tiny generated folder: the loss falls, checkpoints resume, weights reload."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.learn.train import TrainConfig, augment, lr_at, train_classifier
from wsi_pipeline.model.cards import load_card, save_weights, write_card
from wsi_pipeline.model.classify import Classifier


def _disc_image(rng: np.random.Generator, colour: tuple[int, int, int]) -> np.ndarray:
    """A noisy 48-px image of a disc of one colour on a pale background."""
    yy, xx = np.mgrid[:48, :48]
    centre = 24 + rng.integers(-4, 5, 2)
    inside = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < rng.integers(80, 160)
    image = np.full((48, 48, 3), 235.0) + rng.normal(0, 8, (48, 48, 3))
    image[inside] = colour
    return image.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A labelled folder: violet discs are LYT, pink ones NGS, 40 images each."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for code, colour in (("LYT", (90, 40, 140)), ("NGS", (200, 120, 160))):
        (root / code / "nested").mkdir(parents=True)
        for i in range(40):
            Image.fromarray(_disc_image(rng, colour)).save(root / code / "nested" / f"{i}.png")
    return root


@pytest.fixture
def card_path(tmp_path, tiny_card_toml):
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_card_toml)
    return path


CONFIG = TrainConfig(
    epochs=6, batch_size=16, lr=3e-3, warmup_epochs=0.3, val_fraction=0.2, test_fraction=0.2
)


def test_training_lowers_the_loss_and_writes_a_scored_card(folder, card_path, tmp_path):
    out = tmp_path / "out" / "tiny.toml"
    result = train_classifier(folder, card_path, out, CONFIG, workdir=tmp_path / "w", log=str)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    card = load_card(tmp_path / "out" / "tiny.toml")
    assert card.weights[0].path.name == "tiny.safetensors"
    assert card.provenance["test_scores"]["n"] == result.test_scores["n"] > 0
    assert card.model.mean != (0.5, 0.5, 0.5)  # measured on the training split


def test_saved_and_reloaded_model_gives_identical_probabilities(folder, card_path, tmp_path):
    config = dataclasses.replace(CONFIG, epochs=1)
    out = tmp_path / "a" / "tiny.toml"
    result = train_classifier(folder, card_path, out, config, workdir=tmp_path / "w", log=str)
    crops = np.random.default_rng(1).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    first = Classifier(result.card, device="cpu")
    again = save_weights(first.models[0], tmp_path / "b" / "tiny.safetensors")
    copy = write_card(dataclasses.replace(result.card, weights=(again,)), tmp_path / "b" / "t.toml")
    assert again.sha256 == result.card.weights[0].sha256  # fp16 round trip is exact
    np.testing.assert_array_equal(
        Classifier(copy, device="cpu").predict_proba(crops), first.predict_proba(crops)
    )


def test_snapshot_ensemble_and_resume(folder, card_path, tmp_path):
    config = dataclasses.replace(CONFIG, epochs=2, snapshots=2)
    workdir = tmp_path / "work"
    out = tmp_path / "snap" / "tiny.toml"
    first = train_classifier(folder, card_path, out, config, workdir=workdir, log=str)
    assert [w.path.name for w in first.card.weights] == [
        "tiny.snapshot1.safetensors",
        "tiny.snapshot2.safetensors",
    ]
    lines: list[str] = []
    longer = dataclasses.replace(config, epochs=3)
    resumed = train_classifier(folder, card_path, out, longer, workdir=workdir, log=lines.append)
    assert any(line.startswith("resumed from") for line in lines)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]


def test_missing_class_is_a_clear_error(folder, tmp_path, tiny_card_toml):
    card = tmp_path / "three.toml"
    card.write_text(tiny_card_toml + '[[classes]]\ncode = "BLA"\n')
    with pytest.raises(InputError, match="no images of BLA"):
        train_classifier(folder, card, tmp_path / "x.toml", CONFIG, workdir=tmp_path, log=str)


def test_cosine_schedule_with_warmup_and_restarts():
    factors = [lr_at(s, 100, 2, 10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert factors[49] < 0.01 and factors[50] == 1.0  # restart at the second cycle


def test_augmentation_keeps_shape_and_range():
    x = torch.rand(4, 3, 32, 32)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)
