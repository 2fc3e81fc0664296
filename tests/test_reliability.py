"""Reliability of folder runs: saliency under threads, duplicate names, one run per output
folder, outputs that always agree, and runs killed at random points."""

from __future__ import annotations

import contextlib
import os
import random
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

from wsi_pipeline.core.files import PendingFile, exclusive_folder
from wsi_pipeline.model.classify import get_classifier
from wsi_pipeline.results.geojson import read_result_key as geojson_key
from wsi_pipeline.results.report import read_result_key as report_key
from wsi_pipeline.run.folder import output_stems
from wsi_pipeline.run.publish import ExplainedCells, explain_cells
from wsi_pipeline.synth.smear import write_synthetic_slide

WSI_RUN = Path(sys.executable).with_name("wsi-run")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three small smears, two of them with the same name in different subfolders."""
    root = tmp_path_factory.mktemp("slides")
    for seed, name in enumerate(("a/x.svs", "b/x.svs", "y.svs"), start=11):
        (root / name).parent.mkdir(exist_ok=True)
        write_synthetic_slide(root / name, size=(2000, 1400), seed=seed)
    return root


def run_folder(folder: Path, out: Path, card: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [WSI_RUN, folder, "--out", out, "--classifier", card, "--saliency", "none", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def check_outputs_agree(out: Path) -> dict[str, str]:
    """Every complete store has its GeoJSON and report beside it, holding the same result;
    returns each complete store's stem and key."""
    keys = {}
    for store in out.glob("*.zarr"):
        attrs = zarr.open_group(store, mode="r").attrs.asdict()
        if attrs.get("status") != "complete":
            continue
        stem = store.name[: -len(".zarr")]
        assert geojson_key(out / f"{stem}.geojson") == attrs["result_key"], stem
        assert report_key(out / f"{stem}.report.html") == attrs["result_key"], stem
        keys[stem] = attrs["result_key"]
    return keys


def test_saliency_is_safe_while_other_threads_explain_and_classify():
    classifier = get_classifier("synthetic-demo", device="cpu")
    crops = np.random.default_rng(0).integers(0, 255, (6, 96, 96, 3), dtype=np.uint8)
    chosen = ExplainedCells(per_class=None)
    probabilities = classifier.predict_proba(crops)
    chosen.add(
        0,
        {
            "top_class": probabilities.argmax(1).astype(np.int16),
            "confidence": probabilities.max(1),
        },
        crops,
    )
    alone = explain_cells(classifier, chosen, ("gradcam", "smoothgrad"))
    results: list = []
    errors: list[BaseException] = []

    def work(job):
        try:
            results.append(job())
        except BaseException as error:  # noqa: BLE001 - every failure is the finding
            errors.append(error)

    jobs = [lambda: explain_cells(classifier, chosen, ("gradcam", "smoothgrad"))] * 3
    jobs += [lambda: classifier.predict_proba(crops)] * 3
    threads = [threading.Thread(target=work, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    maps = [r for r in results if isinstance(r, dict)]
    assert len(maps) == 3
    for result in maps:
        np.testing.assert_allclose(result["gradcam"], alone["gradcam"], rtol=1e-4, atol=1e-6)


def test_slides_of_the_same_name_get_outputs_of_their_own(folder, untrained_card, tmp_path):
    slides = [folder / "a" / "x.svs", folder / "b" / "x.svs", folder / "y.svs"]
    assert output_stems(slides) == dict(zip(slides, ["a__x", "b__x", "y"], strict=True))
    done = run_folder(folder, tmp_path / "out", untrained_card)
    assert done.returncode == 0, done.stderr
    assert set(check_outputs_agree(tmp_path / "out")) == {"a__x", "b__x", "y"}


def test_a_second_run_into_the_same_folder_is_refused(folder, untrained_card, tmp_path):
    out = tmp_path / "out"
    with exclusive_folder(out):
        done = subprocess.run(
            [WSI_RUN, folder / "y.svs", "--out", out, "--classifier", untrained_card],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "another wsi run is writing into this folder" in done.stderr
    assert not list(out.glob("*.zarr"))


def test_temporary_files_are_per_process_and_orphans_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".t.csv.{dead.pid}.abc.partial"
    orphan.write_text("left by a killed run")
    mine = PendingFile(tmp_path / "t.csv")
    theirs = tmp_path / f".t.csv.{os.getppid()}.xyz.partial"  # a live process: left alone
    theirs.write_text("being written")
    other = PendingFile(tmp_path / "t.csv")
    assert mine.temp != other.temp and str(os.getpid()) in mine.temp.name
    assert not orphan.exists() and theirs.exists()


def test_a_resume_redoes_a_slide_whose_outputs_disagree(folder, untrained_card, tmp_path):
    out = tmp_path / "out"
    assert run_folder(folder, out, untrained_card).returncode == 0
    first = check_outputs_agree(out)
    (out / "y.report.html").unlink()  # as a kill between publishing two outputs leaves it
    (out / "a__x.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    done = run_folder(folder, out, untrained_card)
    assert done.returncode == 0, done.stderr
    status = pd.read_csv(out / "cohort.csv").set_index("slide")["status"]
    assert status[str(folder / "y.svs")] == "complete"
    assert status[str(folder / "a" / "x.svs")] == "complete"
    assert status[str(folder / "b" / "x.svs")] == "reused"
    assert check_outputs_agree(out) == first


def _kill_tree(process: subprocess.Popen) -> None:
    children = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait()


def test_folder_runs_killed_at_random_points_never_lose_or_mix_outputs(
    folder, untrained_card, tmp_path
):
    """20 runs killed at random moments, each resuming the last; after every kill the
    published outputs agree, and after the tenth and the twentieth a run is let finish: each
    slide is then complete exactly once."""
    out = tmp_path / "out"
    command = [WSI_RUN, folder, "--out", out, "--classifier", untrained_card, "--saliency", "none"]
    started = time.perf_counter()
    assert run_folder(folder, tmp_path / "timing", untrained_card).returncode == 0
    duration = time.perf_counter() - started
    rng = random.Random(0)
    expected = {str(folder / "a" / "x.svs"), str(folder / "b" / "x.svs"), str(folder / "y.svs")}
    for kill in range(20):
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        time.sleep(rng.uniform(0.3, duration))
        if process.poll() is None:
            _kill_tree(process)
        check_outputs_agree(out)
        if kill % 10 == 9:
            done = run_folder(folder, out, untrained_card)
            assert done.returncode == 0, done.stderr
            table = pd.read_csv(out / "cohort.csv")
            assert sorted(table["slide"]) == sorted(expected)  # each slide exactly once
            assert set(table["status"]) <= {"complete", "reused"}
            assert set(check_outputs_agree(out)) == {"a__x", "b__x", "y"}
            assert not list(out.glob(".*.partial"))
