"""Tile grid geometry and the ownership rule."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.image.tiles import owning_tile, plan_tiles


@pytest.mark.parametrize("size", [(5000, 3000), (1023, 4097), (300, 200)])
def test_cores_partition_the_slide(size):
    tiles = plan_tiles(size, level0_mpp=0.25, tile_mpp=0.5, tile_size=512, overlap_um=30.0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, size[0], 20000)
    y = rng.uniform(0, size[1], 20000)
    owners = sum(tile.owns(x, y).astype(int) for tile in tiles)
    assert np.all(owners == 1)
    # Points exactly on core borders too.
    edges = np.array([t.core_x0 for t in tiles] + [t.core_x1 - 1e-9 for t in tiles], float)
    ey = np.full(edges.shape, size[1] / 2)
    assert np.all(sum(tile.owns(edges, ey).astype(int) for tile in tiles) == 1)


def test_owned_cells_lie_wholly_inside_their_tile():
    overlap_um, level0_mpp = 24.0, 0.25
    tiles = plan_tiles((6000, 4000), level0_mpp, 0.5, 400, overlap_um)
    radius = overlap_um / 2 / level0_mpp  # largest cell radius the overlap allows
    rng = np.random.default_rng(1)
    x, y = rng.uniform(radius, 6000 - radius, 5000), rng.uniform(radius, 4000 - radius, 5000)
    ids = owning_tile(tiles, x, y)
    for i, tile in enumerate(tiles):
        inside = ids == i
        assert np.all(x[inside] - radius >= tile.x0) and np.all(x[inside] + radius <= tile.x1)
        assert np.all(y[inside] - radius >= tile.y0) and np.all(y[inside] + radius <= tile.y1)


def test_tile_read_size_matches_the_requested_resolution():
    tiles = plan_tiles((10000, 8000), 0.25, 0.5, 1024, 32.0)
    assert tiles[0].read_size == (1024, 1024)
    assert tiles[0].x1 - tiles[0].x0 == 2048
    assert tiles[1].x0 == 2048 - 128  # overlap of 32 µm = 128 level-0 px
    assert all(t.x1 <= 10000 and t.y1 <= 8000 for t in tiles)


@pytest.mark.parametrize(
    "args",
    [
        ((0, 100), 0.25, 0.5, 512, 32.0),
        ((100, 100), 0.25, 0.5, 32, 32.0),
        ((100, 100), -1, 0.5, 64, 1),
    ],
)
def test_bad_arguments_raise(args):
    with pytest.raises(ValueError):
        plan_tiles(*args)
