"""ONNX Runtime (and OpenVINO) give PyTorch's answers for every shipped card; the export cache is
keyed by the weights' SHA-256; ``wsi evaluate`` scores the same with either backend."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wsi_pipeline.cli import wsi
from wsi_pipeline.core.errors import InputError
from wsi_pipeline.learn.datasets import load_crops, scan_labelled_folder
from wsi_pipeline.model import backends
from wsi_pipeline.model.adapt import slide_colours
from wsi_pipeline.model.cards import (
    list_cards,
    load_card,
    load_state_dicts,
    save_weights,
    write_card,
)
from wsi_pipeline.model.classify import Classifier

TRAINED = [name for name in list_cards() if load_card(name).weights]
OTHER_BACKENDS = [b for b in backends.BACKENDS[2:] if backends.installed(b)]


@pytest.fixture(scope="module")
def crops(labelled_folder) -> np.ndarray:
    """40 crops (violet and pink discs on pale glass), enough to adapt to."""
    paths = [item.path for item in scan_labelled_folder(labelled_folder)][::2]
    return load_crops(paths, 96, 20.0, source_mpp=None)


@pytest.fixture(scope="module")
def torch_predictions(crops) -> dict:
    """Each trained card's torch prediction with every option that moves it: the ensemble,
    its temperature, all eight dihedral transforms and the slide's colours."""
    colours = slide_colours(crops)
    return {
        name: Classifier(name, device="cpu", backend="torch").predict(crops, 8, colours)
        for name in TRAINED
    }


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("name", TRAINED)
def test_backend_gives_torch_answers(name, backend, crops, torch_predictions):
    classifier = Classifier(name, device="cpu", backend=backend)
    colours = slide_colours(crops)
    assert classifier.backend == backend
    got, want = classifier.predict(crops, 8, colours), torch_predictions[name]
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-4)
    np.testing.assert_allclose(got.agreement, want.agreement, atol=1e-4)
    np.testing.assert_allclose(got.novelty, want.novelty, rtol=1e-4, atol=1e-4)  # NaN == NaN
    if load_card(name).novelty:
        assert np.isfinite(got.novelty).all()


def test_auto_is_torch_on_a_gpu_and_a_cpu_runtime_otherwise():
    assert backends.resolve_backend("auto", torch.device("cuda")) == "torch"
    assert backends.resolve_backend("auto", torch.device("cpu")) == "onnxruntime"
    with pytest.raises(InputError, match="runs on the CPU"):
        backends.resolve_backend("onnxruntime", torch.device("cuda"))
    with pytest.raises(InputError, match="unknown backend"):
        backends.resolve_backend("tensorrt", torch.device("cpu"))


def test_the_export_cache_is_keyed_by_the_weights_sha256(tmp_path, monkeypatch, crops):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base = load_card("synthetic-demo")
    first = dataclasses.replace(base, path=tmp_path / "one.toml", weights=base.weights[:1])
    write_card(first, first.path)
    Classifier(first, device="cpu", backend="onnxruntime").members()
    assert [p.name.split("-")[0] for p in backends.onnx_cache_dir().iterdir()] == [
        base.weights[0].sha256
    ]

    # Other weights under the same card: exported anew, never the first member's file.
    state = load_state_dicts(first)[0]
    model = Classifier(first, device="cpu", backend="torch").models[0]
    model.load_state_dict({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()})
    changed = save_weights(model, tmp_path / "changed.safetensors")
    second = dataclasses.replace(first, path=tmp_path / "two.toml", weights=(changed,))
    write_card(second, second.path)
    got = Classifier(second, device="cpu", backend="onnxruntime").predict(crops[:16], 2)
    want = Classifier(second, device="cpu", backend="torch").predict(crops[:16], 2)
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-4)
    assert sorted(p.name.split("-")[0] for p in backends.onnx_cache_dir().iterdir()) == sorted(
        [base.weights[0].sha256, changed.sha256]
    )

    # A cached member is read back, not exported again.
    def refuse(*args):
        raise AssertionError("exported again")

    monkeypatch.setattr(backends, "export_onnx", refuse)
    Classifier(second, device="cpu", backend="onnxruntime").members()


def test_evaluate_scores_the_same_with_either_backend(labelled_folder):
    runner = CliRunner()
    reports = {}
    for flags in ([], ["--backend", "torch"]):
        done = runner.invoke(wsi, ["evaluate", str(labelled_folder), "--json", *flags])
        assert done.exit_code == 0, done.output
        reports[flags[-1] if flags else "auto"] = json.loads(done.output)["reports"]["default"]
    assert reports["auto"].pop("backend") == "onnxruntime"
    assert reports["torch"].pop("backend") == "torch"
    assert reports["auto"] == reports["torch"]
