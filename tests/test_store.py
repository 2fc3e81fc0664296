"""The Zarr result store: layout, batched writes, atomic publication, summaries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import zarr

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.core.schema import field_names
from wsi_pipeline.results.counts import differential
from wsi_pipeline.results.store import format_summary, read_summary
from wsi_pipeline.results.store_writer import FLUSH_CELLS, ResultWriter

CODES = ("BLA", "EBO", "LYT", "NGS")
CROP = 16
ATTRS = {"slide": {"path": "demo.svs", "mpp": 0.25}, "classifier": {"name": "t"}, "parameters": {}}


def cell_batch(n: int, start: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(start)
    probabilities = rng.dirichlet(np.ones(len(CODES)), n).astype(np.float32)
    return {
        "id": np.arange(start, start + n),
        "x": rng.uniform(0, 1000, n),
        "y": rng.uniform(0, 1000, n),
        "bbox": rng.integers(0, 1000, (n, 4)),
        "contour": rng.uniform(0, 1000, (n, 32, 2)).astype(np.float32),
        "nucleus_contour": rng.uniform(0, 1000, (n, 32, 2)).astype(np.float32),
        "cell_area_um2": rng.uniform(50, 150, n).astype(np.float32),
        "nucleus_area_um2": rng.uniform(20, 50, n).astype(np.float32),
        "nc_ratio": rng.uniform(0.2, 0.9, n).astype(np.float32),
        "circularity": rng.uniform(0.6, 1.0, n).astype(np.float32),
        "edge": rng.random(n) < 0.1,
        "tile_id": np.zeros(n, np.int32),
        "score": np.ones(n, np.float32),
        "probabilities": probabilities,
        "top_class": probabilities.argmax(1).astype(np.int16),
        "confidence": probabilities.max(1),
        "agreement": np.ones(n, np.float32),
        "novelty": np.full(n, np.nan, np.float32),
        "review_priority": 1 - probabilities.max(1),
    }


def write_store(out, batches=3, n=50):
    with ResultWriter(out, "demo", CODES, CROP, ATTRS) as writer:
        for b in range(batches):
            cells = cell_batch(n, b * n)
            writer.append_cells(cells, np.full((n, CROP, CROP, 3), b, np.uint8))
        maps = np.random.default_rng(0).random((5, CROP, CROP))
        writer.append_saliency(np.arange(5), {"gradcam": maps, "smoothgrad": 2 * maps})
        writer.write_mosaic("BLA", np.zeros((20, 40, 3), np.uint8))
        top = np.asarray(CODES)[writer.read_columns("top_class")[0]]
        writer.write_counts(differential(top, np.ones(top.size), CODES))
        assert zarr.open_group(writer.path).attrs["status"] == "incomplete"
        return writer.commit({"detect": 1.25})


def test_layout_matches_the_architecture(tmp_path):
    path = write_store(tmp_path)
    assert path == tmp_path / "demo.zarr"
    assert sorted(os.listdir(tmp_path)) == ["demo.zarr"]  # the temporary store is gone
    root = zarr.open_group(path, mode="r")
    assert root.metadata.zarr_format == 3
    attrs = root.attrs.asdict()
    assert attrs["status"] == "complete" and attrs["n_cells"] == 150
    assert {"slide", "classifier", "parameters", "software", "timings", "counts"} <= set(attrs)
    assert set(root["cells"].array_keys()) == set(field_names())
    assert root["cells/contour"].shape == (150, 32, 2)
    assert root["cells/probabilities"].dtype == np.float32
    assert root["cells/top_class"].dtype == np.int16
    assert root["crops"].shape == (150, CROP, CROP, 3)
    assert root["crops"][100, 0, 0, 0] == 2  # batches land in order
    assert root["saliency/gradcam"].shape == (5, CROP, CROP)
    np.testing.assert_allclose(root["saliency/smoothgrad"][:], 2 * root["saliency/gradcam"][:])
    assert root["mosaics/BLA"].shape == (20, 40, 3)
    counts = root["counts"]
    assert counts.attrs["differential"] == attrs["counts"]
    bla = counts.attrs["codes"].index("BLA")
    assert counts["count"][bla] == attrs["counts"]["classes"][2]["count"]
    assert counts["count"][counts.attrs["codes"].index("MON")] == -1  # not assessable


def test_commit_replaces_an_older_store(tmp_path):
    write_store(tmp_path, batches=1)
    path = write_store(tmp_path, batches=2)
    assert zarr.open_group(path, mode="r").attrs["n_cells"] == 100
    assert sorted(os.listdir(tmp_path)) == ["demo.zarr"]


def test_failure_inside_the_writer_leaves_nothing(tmp_path):
    cells = cell_batch(4, 0)
    cells["x"] = cells["x"][:3]
    with (
        pytest.raises(ValueError, match="cells/x has shape"),
        ResultWriter(tmp_path, "demo", CODES, CROP, ATTRS) as writer,
    ):
        writer.append_cells(cells)
    assert os.listdir(tmp_path) == []


def test_commit_refuses_an_inconsistent_store(tmp_path):
    with ResultWriter(tmp_path, "demo", CODES, CROP, ATTRS) as writer:
        writer.append_cells(cell_batch(4, 0))
        with pytest.raises(ValueError, match="differential was not written"):
            writer.commit()


KILLED_WRITER = """
import sys, time, numpy as np
sys.path.insert(0, {tests!r})
from test_store import ATTRS, CODES, CROP, cell_batch
from wsi_pipeline.results.store_writer import ResultWriter
writer = ResultWriter({out!r}, "demo", CODES, CROP, ATTRS)
writer.append_cells(cell_batch(10, 0), np.zeros((10, CROP, CROP, 3), np.uint8))
print("written", flush=True)
time.sleep(60)
"""


def test_killed_run_leaves_no_complete_looking_store(tmp_path):
    script = KILLED_WRITER.format(tests=os.path.dirname(__file__), out=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "written"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert not (tmp_path / "demo.zarr").exists()
    (partial,) = tmp_path.iterdir()
    assert zarr.open_group(partial, mode="r").attrs["status"] == "incomplete"
    with pytest.raises(InputError, match="incomplete result store"):
        read_summary(partial)
    write_store(tmp_path)  # a rerun clears the leftover and completes
    assert sorted(os.listdir(tmp_path)) == ["demo.zarr"]


def test_summary_and_its_text(tmp_path):
    summary = read_summary(write_store(tmp_path))
    json.dumps(summary, allow_nan=False)
    assert summary["status"] == "complete"
    assert summary["classifier"]["classes"] == list(CODES)
    assert summary["timings"] == {"detect": 1.25}
    counts = summary["counts"]
    assert counts["countable"] == 150 and counts["me_ratio"] is not None
    text = format_summary(summary)
    assert "complete" in text and "not assessable" in text and "detect 1.2 s" in text
    assert "BLA Blast" in text


def test_read_summary_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(InputError, match="no zarr.json") as error:
        read_summary(tmp_path)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)
    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(InputError, match="not a wsi-pipeline result store"):
        read_summary(tmp_path / "other.zarr")


def test_batches_held_in_memory_land_in_order(tmp_path):
    # More cells than one write holds, in batches that do not divide a crop chunk.
    n, batches = 37, FLUSH_CELLS // 37 + 3
    path = write_store(tmp_path, batches=batches, n=n)
    root = zarr.open_group(path, mode="r")
    assert root.attrs["n_cells"] == n * batches
    np.testing.assert_array_equal(root["cells/id"][:], np.arange(n * batches))
    np.testing.assert_array_equal(root["crops"][::n, 0, 0, 0], np.arange(batches) % 256)


def test_batches_either_all_have_crops_or_none(tmp_path):
    with ResultWriter(tmp_path, "demo", CODES, CROP, ATTRS) as writer:
        writer.append_cells(cell_batch(3, 0), np.zeros((3, CROP, CROP, 3), np.uint8))
        with pytest.raises(ValueError, match="every batch"):
            writer.append_cells(cell_batch(3, 3))
