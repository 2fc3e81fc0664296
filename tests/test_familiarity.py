"""What a card knows of its data: per-slide colour adaptation and the novelty of cells."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from wsi_pipeline.learn.evaluate import evaluate_folder
from wsi_pipeline.learn.train import TrainConfig, train_classifier
from wsi_pipeline.model.adapt import ColourMoments, adapted_normalisation, colour_moments
from wsi_pipeline.model.cards import CardError, load_card, write_card
from wsi_pipeline.model.classify import Classifier
from wsi_pipeline.model.novelty import NoveltyModel, fit_gaussians
from wsi_pipeline.results.counts import certain, differential


@pytest.fixture(scope="module")
def trained(labelled_folder, tiny_card_toml, tmp_path_factory):
    """A tiny card trained on violet (LYT) and pink (NGS) discs, with its adaptation and
    novelty tables."""
    root = tmp_path_factory.mktemp("familiar")
    template = root / "tiny.toml"
    template.write_text(tiny_card_toml)
    config = TrainConfig(
        epochs=6, batch_size=16, lr=3e-3, warmup_epochs=0.3, val_fraction=0.2, test_fraction=0.2
    )
    out = root / "out" / "tiny.toml"
    return train_classifier(labelled_folder, template, out, config, workdir=root / "w", log=str)


def test_gaussians_put_a_far_point_far_and_survive_a_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (200, 8)), rng.normal(5, 1, (200, 8))])
    labels = np.repeat([0, 1], 200)
    gaussians = fit_gaussians(features, labels)
    near = gaussians.distance(torch.tensor(rng.normal(5, 1, (50, 8)), dtype=torch.float32))
    far = gaussians.distance(torch.full((1, 8), -8.0))
    assert far.item() > 10 * near.median().item()
    model = NoveltyModel((dataclasses.replace(gaussians, scale=2.0),), threshold=3.0)
    model.save(tmp_path / "n.safetensors")
    again = NoveltyModel.load(tmp_path / "n.safetensors", {"members": 1, "threshold": 3.0,
                                                            "quantile": 0.95})  # fmt: skip
    x = torch.tensor(features[:5], dtype=torch.float32)
    torch.testing.assert_close(again.members[0].distance(x), model.members[0].distance(x))


def test_novel_cells_are_uncertain_whatever_their_confidence():
    confidence, agreement = np.array([0.99, 0.99, 0.99]), np.ones(3)
    novelty = np.array([0.5, 3.0, np.nan])  # familiar, novel, no novelty model
    assert certain(confidence, agreement, novelty=novelty).tolist() == [True, False, True]
    counted = differential(["LYT", "LYT", "LYT"], confidence, ["LYT"], novelty=novelty)
    assert counted.uncertain == 1 and "novelty > 1" in counted.uncertain_rule


def test_a_trained_card_finds_cells_unlike_its_classes_novel(trained):
    card = trained.card
    assert card.novelty["quantile"] == 0.95 and card.adaptation["references"][0]["n"] > 0
    classifier = Classifier(card, device="cpu")
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)  # no cell at all
    yy, xx = np.mgrid[:32, :32]
    discs = np.full((20, 32, 32, 3), 235, np.uint8)
    discs[:, (yy - 16) ** 2 + (xx - 16) ** 2 < 60] = (90, 40, 140)  # a violet disc: LYT
    assert np.median(classifier.predict(noise).novelty) > 1
    assert np.median(classifier.predict(discs).novelty) < 1


def test_a_novelty_file_that_is_not_the_cards_is_refused(trained):
    other = {**trained.card.novelty, "sha256": "0" * 64}
    with pytest.raises(CardError, match="SHA-256 mismatch"):
        Classifier(dataclasses.replace(trained.card, novelty=other), device="cpu")


def test_adaptation_undoes_a_slide_wide_colour_shift():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.uniform(0.2, 0.8, (30, 3, 16, 16)), dtype=torch.float32)
    offset = torch.tensor([0.1, -0.05, 0.08]).view(1, 3, 1, 1)
    cast = x + offset  # another lab's stain and white balance: a shift per channel

    def moments(t: torch.Tensor) -> ColourMoments:
        channels = t.permute(1, 0, 2, 3).reshape(3, -1).double()
        mean, std = channels.mean(1).tolist(), channels.std(1, correction=0).tolist()
        return ColourMoments(tuple(mean), tuple(std), len(t))  # type: ignore[arg-type]

    reference, mean, std = moments(x), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def normalised(t: torch.Tensor, slide: ColourMoments) -> torch.Tensor:
        m, s = adapted_normalisation(mean, std, reference, slide)
        return (t - torch.tensor(m).view(1, 3, 1, 1)) / torch.tensor(s).view(1, 3, 1, 1)

    plain = (x - 0.5) / 0.25
    torch.testing.assert_close(normalised(cast, moments(cast)), plain, atol=1e-4, rtol=1e-4)
    assert (normalised(cast, reference) - plain).abs().max() > 0.1  # unadapted, it differs


def test_a_run_adapts_only_with_a_card_that_records_its_colours(trained):
    crops = np.random.default_rng(5).integers(60, 230, (40, 32, 32, 3), dtype=np.uint8)
    darker = (crops * 0.8).astype(np.uint8)
    adapted = Classifier(trained.card, device="cpu")
    plain = Classifier(dataclasses.replace(trained.card, adaptation={}), device="cpu")
    assert plain.reference_colours == []
    np.testing.assert_array_equal(
        plain.predict_proba(darker, slide_colours=colour_moments(darker)),
        plain.predict_proba(darker),
    )
    shifted = adapted.predict_proba(darker, slide_colours=colour_moments(darker))
    assert np.abs(shifted - adapted.predict_proba(darker)).max() > 1e-3


def test_evaluate_treats_the_folder_as_one_slide(trained, labelled_folder):
    card = trained.card
    on = evaluate_folder(labelled_folder, [str(card.path)], device="cpu")
    off = evaluate_folder(labelled_folder, [str(card.path)], device="cpu", adapt=False)
    assert on["reports"]["tiny"]["adapted"] and not off["reports"]["tiny"]["adapted"]
    assert 0 <= on["reports"]["tiny"]["novel_share"] <= 1


def test_a_card_without_tables_reads_and_writes_as_before(trained, tmp_path):
    bare = dataclasses.replace(trained.card, adaptation={}, novelty={})
    path = write_card(bare, tmp_path / "bare.toml")
    text = path.read_text()
    assert "[novelty]" not in text and "[adaptation]" not in text
    assert load_card(path).novelty == {}
