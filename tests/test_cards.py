"""Classifier cards: shipped cards load, TOML round-trips, weights are checked by hash."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest
import torch

from wsi_pipeline.core.toml_writer import dump_toml
from wsi_pipeline.image.slide import file_sha256
from wsi_pipeline.model.cards import (
    CardError,
    ModelSpec,
    WeightsFile,
    build_model,
    list_cards,
    load_card,
    load_state_dicts,
    save_weights,
    write_card,
)


@pytest.fixture
def tiny_card(tmp_path, tiny_card_toml):
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_card_toml + 'colour = "#123456"\n')  # overrides the taxonomy's NGS colour
    return load_card(path)


def test_shipped_cards_load_by_name_with_their_classes():
    assert {"default", "synthetic-demo", "efficientnetv2", "resnext50"} <= set(list_cards())
    default = load_card("default")
    assert default.codes == (
        "BLA", "PMO", "MYB", "MMZ", "NGB", "NGS", "EOS", "BAS", "MON", "LYT", "EBO", "ART", "NIF"
    )  # fmt: skip
    assert default.mpp == pytest.approx(20 / 96)
    assert "PLM" in default.cannot_recognise and "BLA" not in default.cannot_recognise
    assert default.model.temperature == default.provenance["calibration"]["temperature"] != 1
    assert "not for diagnosis" in default.caveat
    assert "CC BY 4.0" in default.provenance["licence"]


@pytest.mark.parametrize("name", ["default", "synthetic-demo"])
def test_trained_cards_have_small_checked_weights(name):
    card = load_card(name)
    assert card.weights, f"{name} has no weights"
    for weights in card.weights:
        assert weights.path.stat().st_size < 15e6
        assert file_sha256(weights.path) == weights.sha256
    assert card.provenance["test_scores"]["macro"]["f1"] > 0.5  # chance is about 0.1


def test_card_fields_come_from_the_taxonomy_unless_overridden(tiny_card):
    lyt, ngs = tiny_card.classes
    assert (lyt.name, lyt.group) == ("Lymphocyte", "lymphocytes")
    assert ngs.colour == "#123456"
    assert "BLA" in tiny_card.cannot_recognise and "LYT" not in tiny_card.cannot_recognise


def test_compact_coatnet_is_built_at_the_card_input_size(tiny_card):
    model = build_model(tiny_card)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 2)


def test_toml_round_trip(tiny_card, tmp_path):
    card = dataclasses.replace(tiny_card, provenance={"scores": {"f1": 0.5}, "note": 'a "q"'})
    path = write_card(card, tmp_path / "again.toml")
    again = load_card(path)
    assert again.to_dict() == card.to_dict()
    assert tomllib.loads(dump_toml({"x": {}, "y": [1.5, float("inf")]})) == {
        "x": {},
        "y": [1.5, float("inf")],
    }


def test_weights_round_trip_and_a_wrong_hash_is_refused(tiny_card, tmp_path):
    model = build_model(tiny_card)
    weights = save_weights(model, tmp_path / "tiny.safetensors")
    card = dataclasses.replace(tiny_card, weights=(weights,))
    (state,) = load_state_dicts(card)
    assert torch.equal(state["head.fc.weight"], model.state_dict()["head.fc.weight"].half().float())

    wrong = dataclasses.replace(card, weights=(WeightsFile(weights.path, "0" * 64),))
    with pytest.raises(CardError) as error:
        load_state_dicts(wrong)
    message = str(error.value)
    assert "tiny.safetensors" in message and "SHA-256 mismatch" in message
    assert "\n" not in message


def test_corrupt_missing_and_absent_weights_are_clear_errors(tiny_card, tmp_path):
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"not safetensors")
    card = dataclasses.replace(tiny_card, weights=(WeightsFile(corrupt, file_sha256(corrupt)),))
    with pytest.raises(CardError, match="bad.safetensors.*not a readable safetensors"):
        load_state_dicts(card)
    missing = dataclasses.replace(tiny_card, weights=(WeightsFile(tmp_path / "none", "0"),))
    with pytest.raises(CardError, match="not found"):
        load_state_dicts(missing)
    with pytest.raises(CardError, match="no trained weights"):
        load_state_dicts(tiny_card)


def test_unknown_card_and_bad_cards_raise_one_line_errors(tmp_path):
    with pytest.raises(CardError, match="no classifier card named 'nope'.*default"):
        load_card("nope")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    with pytest.raises(CardError, match="broken.toml: not a valid TOML card"):
        load_card(broken)
    broken.write_text('[model]\narchitecture = "x"\n[[classes]]\ncode = "ZZZ"\n')
    with pytest.raises(CardError, match="invalid classifier card.*ZZZ"):
        load_card(broken)


def test_model_spec_mpp():
    assert ModelSpec("resnet18", input_size=64, fov_um=32.0).mpp == 0.5
