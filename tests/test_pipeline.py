"""`wsi-run` end to end: the differential against ground truth, every output, kills and reruns."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from skimage.measure import points_in_poly

from wsi_pipeline.core.prefetch import prefetch
from wsi_pipeline.core.schema import CELL_FIELDS
from wsi_pipeline.image.slide import open_slide
from wsi_pipeline.model import classify
from wsi_pipeline.model.cards import load_card
from wsi_pipeline.results.geojson import open_geojson
from wsi_pipeline.results.store import read_summary
from wsi_pipeline.run import publish, tuning
from wsi_pipeline.run.local import run_slide
from wsi_pipeline.run.options import RunOptions
from wsi_pipeline.run.stages import TileCells, batched
from wsi_pipeline.run.tuning import lower_own_priority
from wsi_pipeline.synth.smear import write_synthetic_slide

BIN = Path(sys.executable).parent
FAST = RunOptions(classifier="synthetic-demo", saliency_cells=4, device="cpu")


def needs_weights(name: str) -> None:
    if not load_card(name).weights:
        pytest.skip(f"classifier card {name!r} has no trained weights yet")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A synthetic smear with a seed the synthetic-demo classifier never saw."""
    path = tmp_path_factory.mktemp("slides") / "marrow-101.svs"
    write_synthetic_slide(path, size=(8000, 5000), seed=101)
    return path


@pytest.fixture(scope="module")
def synthetic_run(synthetic, tmp_path_factory):
    needs_weights("synthetic-demo")
    out = tmp_path_factory.mktemp("out")
    with open_slide(synthetic) as slide:
        return run_slide(slide, out, FAST, progress=False), out


def test_a_run_writes_exactly_the_declared_cell_fields(synthetic_run):
    run, _ = synthetic_run
    cells = zarr.open_group(run.store, mode="r")["cells"]
    declared = {f.name: f.dtype for f in CELL_FIELDS}
    assert {name: str(cells[name].dtype) for name in cells.array_keys()} == declared


def test_the_store_says_why_the_classifier_did_not_adapt(synthetic_run):
    run, _ = synthetic_run
    adaptation = read_summary(run.store)["adaptation"]
    assert adaptation["ran"] is False
    assert adaptation["reason"] == "card 'synthetic-demo' records no reference colours"


def ground_truth(slide: Path, rings: list) -> dict[str, int]:
    with open(slide.with_suffix(".cells.csv")) as stream:
        rows = list(csv.DictReader(stream))
    xy = np.array([(float(r["x"]), float(r["y"])) for r in rows])
    inside = np.zeros(len(rows), dtype=bool)
    for ring in rings:
        inside |= points_in_poly(xy, np.asarray(ring))
    counts: dict[str, int] = {}
    for row, keep in zip(rows, inside, strict=True):
        if keep:
            counts[row["class"]] = counts.get(row["class"], 0) + 1
    return counts


def test_differential_matches_ground_truth_within_two_points(synthetic, synthetic_run):
    run, _ = synthetic_run
    root = zarr.open_group(run.store, mode="r")
    truth = ground_truth(synthetic, root.attrs["region"]["rings"])
    total = sum(truth.values())
    assert total >= 150  # 2 points are then a few cells of a class, not one
    result = run.differential
    assert result.uncertain <= 0.05 * result.total_cells
    for row in result.classes:
        if row.assessable:
            expected = 100 * truth.get(row.key, 0) / total
            assert row.percent == pytest.approx(expected, abs=2.0), row.key


def test_store_holds_every_part(synthetic_run):
    run, out = synthetic_run
    root = zarr.open_group(run.store, mode="r")
    attrs = root.attrs.asdict()
    assert attrs["status"] == "complete"
    n = attrs["n_cells"]
    assert n == root["cells/id"].shape[0] == root["crops"].shape[0] > 0
    assert root["crops"].shape[1:] == (96, 96, 3)
    assert root["cells/probabilities"].shape == (n, len(attrs["class_codes"]))
    assert root["cells/contour"].shape == (n, 32, 2)
    np.testing.assert_allclose(root["cells/probabilities"][:].sum(1), 1, atol=1e-4)
    m = root["saliency/cell_index"].shape[0]
    assert 0 < m <= 4 * len(attrs["class_codes"])
    for method in ("gradcam", "smoothgrad"):
        assert root[f"saliency/{method}"].shape == (m, 96, 96)
        assert len(root[f"mosaics/{method}"]) > 0
    assert len(list((out / "marrow-101.mosaics").glob("*.png"))) == 2 * len(root["mosaics/gradcam"])
    assert set(attrs["timings"]) >= {"open", "plan", "detect", "classify", "explain", "report"}
    assert attrs["slide"]["sha256"] and attrs["classifier"]["weights"]["sha256"]


def test_an_ngff_reader_opens_the_overview_and_the_mosaics(synthetic_run):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    run, _ = synthetic_run
    root = zarr.open_group(run.store, mode="r")
    names = ["overview"] + [
        f"mosaics/{m}-{c}" for m in ("gradcam", "smoothgrad") for c in root[f"mosaics/{m}"]
    ]
    for name in names:
        (image, *_) = Reader(parse_url(run.store / "images" / name))()
        assert image.load(Multiscales), name
        levels = [np.asarray(level) for level in image.data]
        assert levels[0].shape[0] == 3 and levels[0].dtype == np.uint8
        assert [axis["name"] for axis in image.metadata["axes"]] == ["c", "y", "x"]
        if name.startswith("mosaics/"):  # the same pixels as the plain array
            method, code = name.removeprefix("mosaics/").split("-")
            assert np.array_equal(levels[0].transpose(1, 2, 0), root[f"mosaics/{method}/{code}"][:])
    (node, *_) = Reader(parse_url(run.store / "images/overview"))()
    overview = [np.asarray(level) for level in node.data]
    assert max(overview[0].shape[1:]) > 500  # not a few dozen pixels wide


def test_geojson_and_report_beside_the_store(synthetic_run):
    run, _ = synthetic_run
    features = json.loads(run.geojson.read_text())["features"]
    kinds = [f["properties"]["objectType"] for f in features]
    assert kinds.count("annotation") == 1
    assert kinds.count("cell") == read_summary(run.store)["n_cells"]
    page = run.report.read_text()
    assert 'id="differential"' in page and "synthetic-demo" in page


def test_inspect_prints_the_summary_as_json(synthetic_run):
    run, _ = synthetic_run
    shown = subprocess.run(
        [BIN / "wsi", "inspect", run.store, "--json"], capture_output=True, text=True, check=True
    )
    summary = json.loads(shown.stdout)
    assert summary["status"] == "complete"
    assert summary["classifier"]["name"] == "synthetic-demo"
    # --backend auto on a CPU: what ran is recorded, not what was asked for.
    assert summary["inference"] == {"backend": "onnxruntime", "device": "cpu"}
    counts = summary["counts"]
    for key in ("classes", "groups", "me_ratio", "blast_percent", "findings", "adequate"):
        assert key in counts
    assert "detect" in summary["timings"]


def test_killed_run_leaves_no_complete_store_and_rerun_completes(
    synthetic, untrained_card, tmp_path
):
    out = tmp_path / "out"
    command = [BIN / "wsi-run", synthetic, "--out", out, "--classifier", untrained_card]
    command.append("--quiet")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out / ".marrow-101.zarr.partial" / "cells" / "id"
    deadline = time.monotonic() + 300
    while not partial.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "marrow-101.zarr").exists()

    subprocess.run([*command, "--saliency", "none"], check=True, capture_output=True)
    assert read_summary(out / "marrow-101.zarr")["status"] == "complete"
    assert not (out / ".marrow-101.zarr.partial").exists()


def test_a_run_failing_midway_gives_torch_its_threads_back(synthetic, tmp_path, monkeypatch):
    needs_weights("synthetic-demo")
    taken: list[int] = []

    def failing(self, first_index: int, cells: dict, crops: np.ndarray) -> None:
        taken.append(len(crops))
        if len(taken) == 3:
            raise MemoryError("out of memory")

    # Raised while the run consumes its batches, with the classifier's workers mid-stream.
    monkeypatch.setattr(publish.ExplainedCells, "add", failing)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with open_slide(synthetic) as slide:
            try:
                run_slide(slide, tmp_path, FAST, progress=False)
            except MemoryError as error:
                failure = error  # its traceback keeps the run's frames, and their generators
        assert "out of memory" in str(failure)
        # Yet the classifier's workers stopped and torch has both threads again.
        assert torch.get_num_threads() == 2
        assert not classify._one_thread_per_op.locked()
    finally:
        torch.set_num_threads(threads)
    assert taken == [32, 32, 32]  # one forward pass a batch on 2 workers


@pytest.mark.parametrize(
    ("name", "mpp"),
    [("CMU-1-Small-Region.svs", None), ("TCGA-CR-7395-01A-01-TS1.svs", 0.25)],
)
def test_real_he_slides_complete_and_say_what_they_found(shared_data, tmp_path, name, mpp):
    needs_weights("default")
    args = [BIN / "wsi-run", shared_data / "slides" / name, "--out", tmp_path, "--quiet", "--zip"]
    args += ["--saliency", "none"]  # saliency is checked on the synthetic slide
    done = subprocess.run(
        [*args, *(["--mpp", str(mpp)] if mpp else [])], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    stem = name.removesuffix(".svs")
    summary = read_summary(tmp_path / f"{stem}.zarr")
    adaptation = summary["adaptation"]  # the default card adapts to every slide it can
    assert adaptation["ran"] or "sample tiles" in adaptation["reason"]
    counts = summary["counts"]
    # The default card recognises blasts; plasma cells and proerythroblasts it cannot.
    assert counts["blast_percent"] is not None or counts["countable"] == 0
    said = {f["message"]: f["severity"] for f in counts["findings"]}
    assert any("not assessable" in message for message in said)
    if counts["countable"] < 500:
        assert any("500" in m and severity == "caution" for m, severity in said.items())
    with open_geojson(tmp_path / f"{stem}.geojson.zip") as stream:
        assert json.load(stream)["type"] == "FeatureCollection"
    page = (tmp_path / f"{stem}.report.html").read_text()
    assert 'id="differential"' in page


#: The summary block's frame colour in the report's CSS (``#summary``), RGB.
SUMMARY_FRAME = (0x1A, 0x4F, 0x8B)


def test_report_renders_in_headless_chromium_with_the_summary_on_the_first_screen(
    synthetic_run, tmp_path
):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium not installed (make test installs Debian's chromium)")
    run, _ = synthetic_run
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,800",
        "--hide-scrollbars",
    ]  # fmt: skip
    url = run.report.resolve().as_uri()
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    assert '<table id="differential"' in dom
    assert "Blast" in dom and "synthetic-demo" in dom
    summary = dom[dom.index('<section id="summary"') :]
    assert "<dt>Blasts</dt>" in summary[: summary.index("</section>")]
    # A laptop's first screen, no scrolling: the summary's frame is painted whole, top and
    # bottom edge, so every line inside it is visible.
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (800, 1280, 3)
    assert pixels.std() > 10  # text, table and images, not a blank page
    frame = (np.abs(pixels - SUMMARY_FRAME).max(axis=2) <= 8).sum(axis=1) > 600
    edges = np.flatnonzero(frame)
    assert edges.size >= 2 and edges[-1] - edges[0] > 150, "summary frame not on the first screen"


def test_batched_cuts_equal_batches_and_keeps_every_cell_and_second():
    sizes = [5, 0, 13, 1, 0, 9, 7]
    start = np.cumsum([0, *sizes])
    parts = [
        TileCells(
            {"id": np.arange(a, b)},
            np.full((b - a, 2, 2, 3), a, np.uint8),
            {"detect": 1.0},
        )
        for a, b in zip(start[:-1], start[1:], strict=True)
    ]
    taken: list[int] = []
    batches = list(batched(parts, 8, lambda: taken.append(1)))
    assert [len(b) for b in batches] == [8, 8, 8, 8, 3]
    assert np.array_equal(np.concatenate([b.columns["id"] for b in batches]), np.arange(35))
    crops = np.concatenate([b.crops for b in batches])
    assert np.array_equal(crops[:, 0, 0, 0], np.repeat(start[:-1], sizes))
    assert sum(b.seconds.get("detect", 0.0) for b in batches) == len(parts) == len(taken)


def test_prefetch_says_once_when_it_runs_a_whole_buffer_ahead():
    ahead: list[int] = []
    out = []

    def report() -> None:
        ahead.append(threading.get_native_id())

    for value in prefetch(lambda x: 2 * x, range(20), 4, report):
        out.append(value)
        time.sleep(0.01)  # a slow consumer: the buffer fills
    assert out == [2 * x for x in range(20)]
    # Once, on the background thread (where setting OpenCV to one thread keeps it there).
    assert len(ahead) == 1 and ahead[0] != threading.get_native_id()


def test_prefetch_behind_its_consumer_never_says_so():
    ahead: list[int] = []

    def slow(x: int) -> int:
        time.sleep(0.02)
        return x

    assert list(prefetch(slow, range(10), 3, lambda: ahead.append(1))) == list(range(10))
    assert ahead == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_lower_own_priority_lowers_that_thread_only():
    seen: dict[str, int] = {}

    def worker() -> None:
        before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        lower_own_priority(5)
        seen["expected"] = min(19, before + 5)
        seen["after"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["after"] == seen["expected"]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main


def test_detection_ahead_keeps_opencv_to_itself_until_the_run_ends():
    before = cv2.getNumThreads()
    with tuning.restoring_opencv_threads():
        thread = threading.Thread(target=tuning.keep_opencv_on_this_thread)
        thread.start()
        thread.join()
        assert cv2.getNumThreads() == 1
    assert cv2.getNumThreads() == before


_MALLOC_SCRIPT = """
import ctypes, resource, sys, threading
import numpy as np
from wsi_pipeline.run.tuning import tune_malloc
if sys.argv[1] == "tuned":
    tune_malloc(2)
start = threading.Barrier(8)
def allocate():
    start.wait()  # all eight threads alive and allocating at once
    held = [bytearray(1000) for _ in range(1000)]
    start.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
np.ones(64 << 20, np.uint8)  # a batch's worth of memory, then freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    np.ones(64 << 20, np.uint8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)  # pages faulted in again
ctypes.CDLL("libc.so.6").malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tune_malloc_reuses_large_blocks_and_caps_the_arenas():
    def run(mode: str) -> tuple[int, int]:
        done = subprocess.run(
            [sys.executable, "-c", _MALLOC_SCRIPT, mode], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return int(done.stdout), done.stderr.count("Arena ")

    (faults, arenas), (default_faults, default_arenas) = run("tuned"), run("default")
    assert arenas <= 2 < default_arenas
    # By default each of the ten blocks is mapped and faulted in anew (in 2 MB pages where
    # numpy asks for them: 330 faults here); tuned, the first block's memory is reused.
    assert faults < 10 <= default_faults


def test_the_cell_table_loads_in_pandas_as_the_store_holds_it(synthetic_run):
    import pandas as pd

    run, _ = synthetic_run
    table = pd.read_parquet(run.cells_table)
    cells = zarr.open_group(run.store, mode="r")["cells"]
    codes = zarr.open_group(run.store, mode="r").attrs["class_codes"]
    assert len(table) == cells["id"].shape[0] > 0
    assert table["id"].tolist() == cells["id"][:].tolist()
    np.testing.assert_array_equal(table["confidence"].to_numpy(), cells["confidence"][:])
    np.testing.assert_array_equal(
        np.stack([np.stack(ring) for ring in table["contour"]]), cells["contour"][:]
    )
    for k, code in enumerate(codes):
        np.testing.assert_array_equal(table[f"probabilities_{code}"], cells["probabilities"][:, k])
    assert (table["class"] == np.asarray(codes)[cells["top_class"][:]]).all()
    # Every column is documented in docs/outputs.md.
    docs = (Path(__file__).resolve().parents[1] / "docs" / "outputs.md").read_text()
    for column in table.columns:
        documented = (
            column.split("_")[0] + "_<CODE>" if column.startswith("probabilities_") else column
        )
        assert f"`{documented}`" in docs, column


def test_the_run_records_when_it_started_and_finished(synthetic_run):
    from datetime import datetime

    run, _ = synthetic_run
    times = zarr.open_group(run.store, mode="r").attrs["run"]
    started, finished = (datetime.fromisoformat(times[k]) for k in ("started", "finished"))
    assert started.utcoffset() is not None and started <= finished
    assert times["finished"] in run.report.read_text()
