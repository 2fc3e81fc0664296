"""The cell-table schema: one definition that every writer is held to."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.core.schema import (
    CELL_FIELDS,
    MEASURED_FIELDS,
    SchemaError,
    check_columns,
    empty_columns,
    field_names,
)
from wsi_pipeline.results.geojson import GeoJSONWriter
from wsi_pipeline.results.store_writer import ResultWriter

CODES = ("LYT", "NGS", "EOS")
ATTRS = {"slide": {"path": "s.svs"}, "classifier": {"name": "t"}, "parameters": {}}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"


def full_batch(n: int = 3) -> dict[str, np.ndarray]:
    columns = empty_columns(field_names(), n_classes=len(CODES))
    return {name: np.resize(values, (n, *values.shape[1:])) for name, values in columns.items()}


def test_empty_columns_follow_the_declared_dtypes_and_shapes():
    columns = empty_columns(field_names(), n_classes=len(CODES))
    assert list(columns) == [f.name for f in CELL_FIELDS]
    assert check_columns(columns, len(CODES), required=field_names()) == 0
    assert columns["probabilities"].shape == (0, len(CODES))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(extra=np.zeros(3)), "not declared"),
        (lambda c: c.update(nc_ratio=c["nc_ratio"].astype(np.float64)), "declared float32"),
        (lambda c: c.update(tile_id=c["tile_id"].astype(np.int64)), "declared int32"),
        (lambda c: c.update(bbox=np.zeros((3, 5), np.int64)), "shape"),
        (lambda c: c.update(x=np.zeros(2)), "has shape"),
        (lambda c: c.pop("confidence"), "lack confidence"),
    ],
)
def test_check_columns_refuses_what_the_schema_does_not_declare(change, message):
    columns = full_batch()
    change(columns)
    with pytest.raises(SchemaError, match=message):
        check_columns(columns, len(CODES), required=field_names())


def test_the_store_refuses_an_undeclared_field_or_dtype(tmp_path):
    with ResultWriter(tmp_path, "s", CODES, 8, ATTRS) as writer:
        crops = np.zeros((3, 8, 8, 3), np.uint8)
        writer.append_cells(full_batch(), crops)
        with pytest.raises(SchemaError, match="not declared"):
            writer.append_cells(full_batch() | {"nucleus_area": np.zeros(3)}, crops)
        with pytest.raises(SchemaError, match="declared float32"):
            writer.append_cells(full_batch() | {"score": np.zeros(3)}, crops)


def test_geojson_measurements_are_the_schema_measured_fields(tmp_path):
    batch = full_batch()
    batch["contour"][:] = np.random.default_rng(0).random(batch["contour"].shape)
    with GeoJSONWriter(tmp_path / "s.geojson", CODES, "0" * 64) as writer:
        writer.write(batch)
        path = writer.commit()
    features = json.loads(path.read_text())["features"]
    expected = []
    for field in MEASURED_FIELDS:
        assert field.measurement is not None
        if field.tail:
            expected += [field.measurement.format(code=code) for code in CODES]
        else:
            expected.append(field.measurement)
    assert [list(f["properties"]["measurements"]) for f in features] == [expected] * 3


def test_docs_describe_every_field_with_its_dtype():
    text = DOCS.read_text(encoding="utf-8")
    for field in CELL_FIELDS:
        row = re.search(rf"^\|[^|]*`cells/{field.name}`[^|]*\|([^|]*)\|", text, re.MULTILINE)
        assert row, f"docs/outputs.md does not describe cells/{field.name}"
        assert field.dtype in row.group(1), f"cells/{field.name} is {field.dtype} in the schema"
