"""Folders of slides on a real Dask cluster of process workers: failures, dead workers, resumes."""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import zarr

from wsi_pipeline.image.slide import open_slide
from wsi_pipeline.results.plausibility import worst
from wsi_pipeline.run.cluster import dask_client, load_workflow
from wsi_pipeline.run.folder import run_cohort
from wsi_pipeline.run.local import run_slide
from wsi_pipeline.run.options import RunOptions
from wsi_pipeline.synth.smear import write_synthetic_slide

WSI_RUN = Path(sys.executable).with_name("wsi-run")
GOOD = ("smear-1", "smear-2", "smear-3")


@pytest.fixture(scope="module")
def card(untrained_card) -> Path:
    """These tests are about scheduling, not accuracy."""
    return untrained_card


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    for seed, stem in enumerate(GOOD, start=1):
        write_synthetic_slide(folder / f"{stem}.svs", size=(2600, 1800), seed=seed)
    return folder


def options(card: Path) -> RunOptions:
    return RunOptions(classifier=str(card), saliency=(), device="cpu")


def as_stored(value: float | None):
    """What Parquet gives back for ``value``: None is NaN there."""
    return pytest.approx(np.nan if value is None else value, nan_ok=True)


def with_bad_fixtures(slides: Path, shared_data: Path, target: Path) -> Path:
    shutil.copytree(slides, target)
    fixtures = shared_data / "openslide-fixtures"
    for name in ("unreadable.svs", "unopenable.tiff", "boxes.tiff"):
        shutil.copy(fixtures / name, target / name)
    return target


def test_folder_runs_on_local_cluster_and_reports_bad_slides(card, slides, shared_data, tmp_path):
    folder = with_bad_fixtures(slides, shared_data, tmp_path / "slides")
    out = tmp_path / "out"
    done = subprocess.run(
        [WSI_RUN, folder, "--out", out, "--classifier", card, "--saliency", "none"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 2, done.stderr  # some slides failed: the batch says so
    assert "3 of 6 slides failed" in done.stderr
    table = pd.read_parquet(out / "cohort.parquet").set_index("slide")
    assert pd.read_csv(out / "cohort.csv").shape == table.reset_index().shape
    reasons = {Path(s).name: r for s, r in table["reason"].items() if isinstance(r, str) and r}
    assert "Bogus marker" in reasons["unreadable.svs"]
    assert "Unsupported TIFF compression" in reasons["unopenable.tiff"]
    assert "pass --mpp" in reasons["boxes.tiff"]

    # the same counts as a single-slide run in this process
    with open_slide(slides / "smear-1.svs") as slide:
        alone = run_slide(slide, tmp_path / "alone", options(card), progress=False)
    row = table.loc[str(folder / "smear-1.svs")]
    assert row["status"] == "complete"
    assert row["cells"] == alone.differential.total_cells > 0
    for tally in alone.differential.classes:
        assert row[f"percent:{tally.key}"] == as_stored(tally.percent)
    assert row["countable"] == alone.differential.countable
    assert row["blast_percent"] == as_stored(alone.differential.blast_percent)
    assert row["worst"] == worst(alone.differential.findings)
    assert row["findings"].startswith(alone.differential.findings[0].severity)
    page = (out / "cohort.html").read_text()
    assert 'href="smear-1.report.html"' in page and "Bogus marker" in page


def _worker_processes() -> list[psutil.Process]:
    me = psutil.Process()
    return [p for p in me.children(recursive=True) if "python" in p.name().lower()]


def test_killed_worker_is_replaced_and_every_slide_completes(card, slides, tmp_path):
    workflow = dataclasses.replace(load_workflow("local-cpu"), workers=2)
    rows = []
    with dask_client(workflow) as client:
        run = threading.Thread(
            target=lambda: rows.extend(
                run_cohort(sorted(slides.glob("*.svs")), tmp_path, options(card), client)
            )
        )
        run.start()
        deadline = time.monotonic() + 300
        while not client.processing() or not any(client.processing().values()):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        victim = max(_worker_processes(), key=lambda p: p.memory_info().rss)
        victim.send_signal(signal.SIGKILL)
        run.join(timeout=900)
    assert [r["status"] for r in rows] == ["complete"] * len(GOOD)
    for stem in GOOD:
        assert zarr.open_group(tmp_path / f"{stem}.zarr").attrs["status"] == "complete"


def test_interrupted_batch_resumes_without_redoing_finished_slides(card, slides, tmp_path):
    # The small slides finish within a fraction of a second of each other; a slide several
    # times larger is certain to be unfinished when the batch is killed after the first.
    folder = tmp_path / "slides"
    shutil.copytree(slides, folder)
    write_synthetic_slide(folder / "smear-large.svs", size=(9000, 6000), seed=4)
    stems = (*GOOD, "smear-large")
    out = tmp_path / "out"
    command = [WSI_RUN, folder, "--out", out, "--classifier", card, "--saliency", "none"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in first.stdout:  # stop the whole batch as soon as one slide is committed
        if ": complete" in line:
            break
    first.send_signal(signal.SIGKILL)
    first.wait()
    for child in psutil.Process().children(recursive=True):
        child.kill()  # the killed client's cluster would otherwise linger
    finished = {p.stem: p.stat().st_mtime_ns for p in out.glob("*.zarr")}
    assert len(finished) >= 1 and "smear-large" not in finished

    subprocess.run(command, check=True, capture_output=True, timeout=900)
    table = pd.read_csv(out / "cohort.csv")
    status = {Path(s).stem: st for s, st in zip(table["slide"], table["status"], strict=True)}
    for stem in stems:
        assert status[stem] == ("reused" if stem in finished else "complete")
    for stem, mtime in finished.items():
        assert (out / f"{stem}.zarr").stat().st_mtime_ns == mtime  # not rewritten
    assert not list(out.glob(".*.partial"))
