"""Shared fixtures: the real data beside the checkout, skipped with a reason when absent."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSI_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$WSI_SHARED_DATA``): real slides, smears and cell images."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}; see README.md, Test data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def untrained_card(tmp_path_factory) -> Path:
    """A real classifier card with untrained weights, for tests about plumbing, not accuracy."""
    from wsi_pipeline.model.cards import build_model, load_card, save_weights, write_card

    folder = tmp_path_factory.mktemp("card")
    base = load_card("synthetic-demo")
    weights = save_weights(build_model(base), folder / "untrained.safetensors")
    path = folder / "untrained.toml"
    write_card(dataclasses.replace(base, name="untrained", path=path, weights=(weights,)), path)
    return path


@pytest.fixture(scope="session")
def tiny_card_toml() -> str:
    """A two-class compact CoAtNet card at 32 px, fast enough to train in a test."""
    return """
name = "tiny"
[model]
architecture = "coatnet_pico_rw_224"
input_size = 32
fov_um = 32.0
cfg = { embed_dim = [16, 32, 32, 64], depths = [1, 1, 1, 1], stem_width = [8, 16] }
[[classes]]
code = "LYT"
[[classes]]
code = "NGS"
"""
