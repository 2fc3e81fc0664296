"""The QuPath export: parse the file and check every rule of QuPath's GeoJSON reader."""

from __future__ import annotations

import json
import tracemalloc
import uuid
import zipfile

import numpy as np
import pytest
import shapely.geometry

from wsi_pipeline.core.taxonomy import cell_class
from wsi_pipeline.results.geojson import (
    UNCERTAIN_CLASS,
    GeoJSONWriter,
    cell_uuid,
    hex_to_rgb,
    open_geojson,
    write_geojson,
)

CODES = ("BLA", "EBO", "NGS")
COLORS = {code: hex_to_rgb(cell_class(code).colour) for code in CODES}
SLIDE_SHA = "ab" * 32
REGION = [np.array([[0, 0], [5000, 0], [5000, 4000], [0, 4000]], dtype=float)]


def cell_batches(n_batches: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    angle = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    circle = np.stack([np.cos(angle), np.sin(angle)], axis=1) * 24
    for batch in range(n_batches):
        probabilities = rng.dirichlet(np.ones(len(CODES)), n).astype(np.float32)
        centres = rng.uniform(100, 3900, (n, 1, 2))
        yield {
            "id": batch * n + np.arange(n, dtype=np.int64),
            "contour": (circle[None] + centres).astype(np.float32),
            "nucleus_contour": (circle[None] / 2 + centres).astype(np.float32),
            "top_class": probabilities.argmax(1).astype(np.int16),
            "confidence": probabilities.max(1),
            "probabilities": probabilities,
            "cell_area_um2": np.full(n, 113.1, np.float32),
            "nucleus_area_um2": np.full(n, 28.3, np.float32),
            "nc_ratio": np.full(n, 0.25, np.float32),
            "circularity": np.full(n, 0.98, np.float32),
            "edge": np.arange(n) % 2 == 0,
        }


@pytest.mark.parametrize("name", ["demo.geojson", "demo.geojson.zip"])
def test_every_feature_follows_qupath_rules(tmp_path, name):
    path = write_geojson(
        tmp_path / name, cell_batches(3, 40), CODES, SLIDE_SHA, region=REGION, threshold=0.5
    )
    if name.endswith(".zip"):  # QuPath reads the .geojson entries of a zip
        assert zipfile.ZipFile(path).namelist() == ["demo.geojson"]
    with open_geojson(path) as stream:
        document = json.load(stream)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left
    assert document["type"] == "FeatureCollection"
    features = document["features"]
    assert len(features) == 1 + 120
    ids = set()
    for feature in features:
        assert feature["type"] == "Feature"
        assert str(uuid.UUID(feature["id"])) == feature["id"]
        ids.add(feature["id"])
        assert "objectType" not in feature  # it belongs inside properties
        props = feature["properties"]
        klass = props["classification"]
        assert isinstance(klass["name"], str)
        assert len(klass["color"]) == 3 and all(0 <= c <= 255 for c in klass["color"])
        rings = (
            [feature["geometry"]["coordinates"]]
            if feature["geometry"]["type"] == "Polygon"
            else feature["geometry"]["coordinates"]
        )
        for polygon in rings:
            for ring in polygon:
                assert len(ring) >= 4 and ring[0] == ring[-1]
    assert len(ids) == len(features)

    region, *cells = features
    rows = []
    assert region["properties"]["objectType"] == "annotation"
    assert region["geometry"]["coordinates"][0][2] == [5000.0, 4000.0]
    for feature in cells:
        props = feature["properties"]
        assert props["objectType"] == "cell"
        assert feature["geometry"]["type"] == "Polygon"
        assert len(feature["geometry"]["coordinates"][0]) == 33
        # QuPath reads a cell's nucleus beside its geometry, inside the cell.
        nucleus = shapely.geometry.shape(feature["nucleusGeometry"])
        assert shapely.geometry.shape(feature["geometry"]).contains(nucleus)
        measurements = props["measurements"]
        assert isinstance(measurements, dict)
        cell_id = measurements.pop("Cell id")
        assert isinstance(cell_id, int)
        rows.append(cell_id)
        # The same id on every run: derived from the slide and the cell's row.
        assert feature["id"] == cell_uuid(SLIDE_SHA, cell_id)
        assert all(isinstance(v, float) for v in measurements.values())
        assert set(measurements) == {
            "Confidence",
            "Cell: Area µm^2",
            "Nucleus: Area µm^2",
            "Nucleus/Cell area ratio",
            "Cell: Circularity",
            "Cut by image edge",
        } | {f"Probability {c}" for c in CODES}
        name = props["classification"]["name"]
        if measurements["Confidence"] < 0.5:
            assert name == UNCERTAIN_CLASS
        else:
            best = max(CODES, key=lambda c: measurements[f"Probability {c}"])
            assert name == cell_class(best).label == f"{cell_class(best).name} ({best})"
            assert props["classification"]["color"] == list(COLORS[best])
    assert sorted(rows) == list(range(120))


def test_memory_does_not_grow_with_the_cell_count(tmp_path):
    def peak(n_batches: int) -> int:
        tracemalloc.start()
        write_geojson(tmp_path / "m.geojson", cell_batches(n_batches, 500), CODES, SLIDE_SHA)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(1), peak(8)
    assert large < 1.5 * small  # 8x the cells, about the same peak: features are streamed


def test_nothing_is_published_before_commit(tmp_path):
    path = tmp_path / "demo.geojson"
    with (
        pytest.raises(RuntimeError, match="classifier failed"),
        GeoJSONWriter(path, CODES, SLIDE_SHA, region=REGION) as out,
    ):
        out.write(next(cell_batches(1, 10)))
        assert not path.exists()  # only the hidden partial file so far
        raise RuntimeError("classifier failed")
    assert not any(tmp_path.iterdir())  # the partial file is gone too
