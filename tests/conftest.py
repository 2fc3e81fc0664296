"""Shared fixtures: the real data beside the checkout, skipped with a reason when absent."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSI_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory) -> Iterator[Path]:
    """A cache of exported networks of this session's own (``XDG_CACHE_HOME``, inherited by the
    CLI and Dask workers), so the cards the tests train never land in the user's cache."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        yield cache


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


def disc_image(rng: np.random.Generator, colour: tuple[int, int, int]) -> np.ndarray:
    """A noisy 48-px image of a disc of one colour on a pale background."""
    yy, xx = np.mgrid[:48, :48]
    centre = 24 + rng.integers(-4, 5, 2)
    inside = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < rng.integers(80, 160)
    image = np.full((48, 48, 3), 235.0) + rng.normal(0, 8, (48, 48, 3))
    image[inside] = colour
    return image.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    """A labelled folder: violet discs are LYT, pink ones NGS, 40 images each."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for code, colour in (("LYT", (90, 40, 140)), ("NGS", (200, 120, 160))):
        (root / code / "nested").mkdir(parents=True)
        for i in range(40):
            Image.fromarray(disc_image(rng, colour)).save(root / code / "nested" / f"{i}.png")
    return root
