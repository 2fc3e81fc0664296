"""Training on a tiny generated folder: the loss falls, checkpoints resume, weights reload."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from conftest import disc_image
from PIL import Image

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.learn.augment import augment
from wsi_pipeline.learn.calibrate import ensemble_probabilities
from wsi_pipeline.learn.datasets import load_crops
from wsi_pipeline.learn.evaluate import evaluate_folder
from wsi_pipeline.learn.export import member_logits
from wsi_pipeline.learn.loop import lr_at
from wsi_pipeline.learn.train import TrainConfig, train_classifier
from wsi_pipeline.model.cards import load_card, save_weights, write_card
from wsi_pipeline.model.classify import Classifier


@pytest.fixture
def card_path(tmp_path, tiny_card_toml):
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_card_toml)
    return path


CONFIG = TrainConfig(
    epochs=6, batch_size=16, lr=3e-3, warmup_epochs=0.3, val_fraction=0.2, test_fraction=0.2
)


def test_training_lowers_the_loss_and_writes_a_scored_card(labelled_folder, card_path, tmp_path):
    out = tmp_path / "out" / "tiny.toml"
    result = train_classifier(
        labelled_folder, card_path, out, CONFIG, workdir=tmp_path / "w", log=str
    )
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    card = load_card(tmp_path / "out" / "tiny.toml")
    assert card.weights[0].path.name == "tiny.safetensors"
    assert card.provenance["test_scores"]["n"] == result.test_scores["n"] > 0
    assert card.model.mean != (0.5, 0.5, 0.5)  # measured on the training split


def test_saved_and_reloaded_model_gives_identical_probabilities(
    labelled_folder, card_path, tmp_path
):
    config = dataclasses.replace(CONFIG, epochs=1)
    out = tmp_path / "a" / "tiny.toml"
    result = train_classifier(
        labelled_folder, card_path, out, config, workdir=tmp_path / "w", log=str
    )
    crops = np.random.default_rng(1).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    first = Classifier(result.card, device="cpu")
    again = save_weights(first.models[0], tmp_path / "b" / "tiny.safetensors")
    copy = write_card(
        dataclasses.replace(result.card, weights=(again,), novelty={}), tmp_path / "b" / "t.toml"
    )
    assert again.sha256 == result.card.weights[0].sha256  # fp16 round trip is exact
    np.testing.assert_array_equal(
        Classifier(copy, device="cpu").predict_proba(crops), first.predict_proba(crops)
    )


def test_snapshot_ensemble_and_resume(labelled_folder, card_path, tmp_path):
    config = dataclasses.replace(CONFIG, epochs=2, snapshots=2)
    workdir = tmp_path / "work"
    out = tmp_path / "snap" / "tiny.toml"
    first = train_classifier(labelled_folder, card_path, out, config, workdir=workdir, log=str)
    assert [w.path.name for w in first.card.weights] == [
        "tiny.snapshot1.safetensors",
        "tiny.snapshot2.safetensors",
    ]
    lines: list[str] = []
    longer = dataclasses.replace(config, epochs=3)
    resumed = train_classifier(
        labelled_folder, card_path, out, longer, workdir=workdir, log=lines.append
    )
    assert any(line.startswith("resumed from") for line in lines)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]


def test_missing_class_is_a_clear_error(labelled_folder, tmp_path, tiny_card_toml):
    card = tmp_path / "three.toml"
    card.write_text(tiny_card_toml + '[[classes]]\ncode = "BLA"\n')
    with pytest.raises(InputError, match="no images of BLA"):
        train_classifier(
            labelled_folder, card, tmp_path / "x.toml", CONFIG, workdir=tmp_path, log=str
        )


def test_cosine_schedule_with_warmup_and_restarts():
    factors = [lr_at(s, 100, 2, 10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert factors[49] < 0.01 and factors[50] == 1.0  # restart at the second cycle


def test_augmentation_keeps_shape_and_range():
    x = torch.rand(4, 3, 32, 32)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Two labelled folders at different pixel sizes: the second's images are twice as large
    (half the microns per pixel) and hold LYT and NGS too."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(1)
    for name, zoom in (("lab-a", 1), ("lab-b", 2)):
        for code, colour in (("LYT", (90, 40, 140)), ("NGS", (200, 120, 160))):
            (root / name / code).mkdir(parents=True)
            for i in range(20):
                image = Image.fromarray(disc_image(rng, colour)).resize((48 * zoom, 48 * zoom))
                image.save(root / name / code / f"{name}-{i}.png")
    return root / "lab-a", root / "lab-b"


def test_several_folders_each_at_its_own_pixel_size(two_sources, card_path, tmp_path):
    config = dataclasses.replace(CONFIG, epochs=1, image_mpp=(0.5, 0.25), test_fraction=0.4)
    out = tmp_path / "two" / "tiny.toml"
    result = train_classifier(two_sources, card_path, out, config, workdir=tmp_path / "w", log=str)
    provenance = load_card(out).provenance
    assert provenance["training"]["folders"] == [str(f) for f in two_sources]
    by_source = provenance["test_confusion_by_source"]
    assert set(by_source) == {"lab-a", "lab-b"}
    tested = sum(sum(row.values()) for rows in by_source.values() for row in rows.values())
    assert tested == result.test_scores["n"]


def test_fine_tuning_starts_from_the_parent_card(labelled_folder, card_path, tmp_path):
    parent = train_classifier(
        labelled_folder,
        card_path,
        tmp_path / "p" / "tiny.toml",
        CONFIG,
        workdir=tmp_path / "wp",
        log=str,
    )
    # One step at a negligible rate: the child is its parent (batch-norm statistics aside),
    # while a card trained from scratch on the same budget is no better than chance.
    config = dataclasses.replace(CONFIG, epochs=1, max_steps=1, lr=1e-9, init=str(parent.card.path))
    child = train_classifier(
        labelled_folder,
        parent.card.path,  # as `wsi train --init PARENT` without --card: the parent is the template
        tmp_path / "c" / "tiny.toml",
        config,
        workdir=tmp_path / "wc",
        log=str,
    )
    scratch = train_classifier(
        labelled_folder,
        card_path,
        tmp_path / "s" / "tiny.toml",
        dataclasses.replace(config, init=None),
        workdir=tmp_path / "ws",
        log=str,
    )
    # The child's novelty model is its own, beside it, not the parent's.
    assert (child.card.path.parent / child.card.novelty["file"]).is_file()
    recorded = load_card(child.card.path).provenance["training"]["parent"]
    assert recorded["weights_sha256"] == [w.sha256 for w in parent.card.weights]
    assert recorded["layers_restarted"] == []
    accuracy = {
        name: result.test_scores["accuracy"]
        for name, result in (("parent", parent), ("child", child), ("scratch", scratch))
    }
    assert accuracy["child"] >= accuracy["parent"] - 0.05, accuracy
    assert accuracy["child"] > accuracy["scratch"] + 0.1, accuracy


def test_the_trained_card_is_calibrated_on_the_validation_split(
    labelled_folder, card_path, tmp_path
):
    config = dataclasses.replace(CONFIG, epochs=2)
    result = train_classifier(
        labelled_folder, card_path, tmp_path / "t.toml", config, workdir=tmp_path / "w", log=str
    )
    card = load_card(result.card.path)
    calibration = card.provenance["calibration"]
    assert card.model.temperature == calibration["temperature"] > 0
    assert calibration["val_ece_after"] <= calibration["val_ece_before"] + 1e-3
    crops = np.random.default_rng(3).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    logits = member_logits(Classifier(card, device="cpu"), crops)
    np.testing.assert_allclose(  # the classifier divides the logits by the card's temperature
        Classifier(card, device="cpu").predict_proba(crops),
        ensemble_probabilities(logits, card.model.temperature),
        atol=1e-5,
    )


def test_an_image_smaller_than_the_field_of_view_is_padded_not_stretched(tmp_path):
    image = np.full((20, 20, 3), 230, np.uint8)
    image[5:15, 5:15] = (90, 40, 140)  # a 10-px cell
    Image.fromarray(image).save(tmp_path / "small.png")
    crop = load_crops([tmp_path / "small.png"], 40, fov_um=40.0, source_mpp=1.0)[0]
    cell = (crop == (90, 40, 140)).all(axis=2)
    assert 8 <= cell.sum(axis=1).max() <= 11  # still about 10 px wide, not 20
    assert tuple(crop[0, 0]) == (230, 230, 230)  # padded with the background


def test_evaluate_reports_calibration_uncertainty_and_where_unknown_classes_go(
    labelled_folder, card_path, tmp_path
):
    trained = train_classifier(
        labelled_folder,
        card_path,
        tmp_path / "e" / "tiny.toml",
        CONFIG,
        workdir=tmp_path / "w",
        log=str,
    )
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for code in ("LYT", "NGS"):
        (mixed / code).symlink_to(labelled_folder / code)
    (mixed / "BLA").mkdir(parents=True)  # a class the card lacks
    rng = np.random.default_rng(5)
    for i in range(6):
        Image.fromarray(disc_image(rng, (60, 60, 200))).save(mixed / "BLA" / f"{i}.png")
    result = evaluate_folder(mixed, [str(trained.card.path)], out_dir=tmp_path / "out")
    report = result["reports"]["tiny"]
    assert report["n"] == 80 and report["n_unrecognised"] == 6
    assert sum(report["unrecognised_called"].values()) == 6
    assert 0 <= report["ece"] <= 1 and 0 <= report["uncertain_share"] <= 1
    assert "| expected calibration error |" in result["comparison"]
    rows = (tmp_path / "out" / "tiny.predictions.csv").read_text().splitlines()
    assert rows[0] == "image,true,predicted,confidence,agreement,uncertain"
    assert len(rows) == 1 + 86


def test_distillation_keeps_the_parent_s_answers_where_the_new_labels_are_silent(
    labelled_folder, card_path, tmp_path
):
    """A lab's corrections never show every class. With the parent's answers in the loss
    (``distill``), what the parent knew survives where the new labels say nothing about it;
    here every image is labelled LYT, and the child trained with distillation still calls
    more of the pink discs NGS than the one trained without."""
    parent = train_classifier(
        labelled_folder,
        card_path,
        tmp_path / "p" / "tiny.toml",
        CONFIG,
        workdir=tmp_path / "wp",
        log=str,
    )
    all_lymphocytes = tmp_path / "all-lyt"
    shutil.copytree(labelled_folder / "LYT", all_lymphocytes / "LYT" / "violet")
    shutil.copytree(labelled_folder / "NGS", all_lymphocytes / "LYT" / "pink")
    pink = load_crops(sorted((labelled_folder / "NGS").rglob("*.png")), 32, 32.0, None)
    recall = {}
    for distill in (0.0, 1.0):
        config = dataclasses.replace(
            CONFIG, epochs=3, lr=1e-3, init=str(parent.card.path), distill=distill
        )
        out = tmp_path / f"d{distill}" / "tiny.toml"
        child = train_classifier(
            all_lymphocytes, card_path, out, config, workdir=tmp_path / f"w{distill}", log=str
        )
        predicted = Classifier(child.card, device="cpu").predict_proba(pink).argmax(1)
        recall[distill] = float((predicted == child.card.codes.index("NGS")).mean())
    assert recall[1.0] > recall[0.0] + 0.2, recall
