"""Every benchmark script runs on its smallest input (``--smoke``), so a renamed field breaks a
test, not a table in the README.

The scripts are found by glob: a new one fails here until :data:`PROMISES` says what its JSON
holds. Each runs in a subprocess, as a user runs it, with its temporary files in the test's own
folder; the results committed beside the scripts must stay untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

BENCHMARKS = REPO / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


@dataclass(frozen=True)
class Promise:
    """What a script's JSON document holds (dotted paths; a number indexes a list), the further
    arguments of its smoke run (``{data}``: the shared data, ``{tmp}``: a scratch folder), and
    whether it reads the shared data."""

    fields: tuple[str, ...]
    arguments: tuple[str, ...] = ()
    shared_data: bool = False


PROMISES = {
    "bccd_transfer.py": Promise(
        ("parent.macro_f1", "parent.retained_recall.BLA", "curve.0.macro_f1", "curve.0.reviewed"),
        ("--work", "{tmp}/work"),
        shared_data=True,
    ),
    "bench_classify.py": Promise(("classify_cells_per_s", "bare_loop_cells_per_s", "ratio")),
    "bench_cohort.py": Promise(
        ("runs.0.slides_per_minute", "runs.0.cells", "speed_up"), ("--cache", "{tmp}")
    ),
    "bench_detect.py": Promise(
        ("recall", "precision", "detect_cells_per_s", "rss_ratio_large_to_small", "runs")
    ),
    "bench_slide_io.py": Promise(
        ("write.0.write_mp_per_s", "rss_ratio_large_small", "read.slide_vs_tifffile")
    ),
    "classifier_speed.py": Promise(("cells_per_second", "ratio_to_first", "machine")),
    "detect_versions.py": Promise(("ms_cpu_per_cell.base", "ms_cpu_per_cell.head", "head_vs_base")),
    "detection.py": Promise(
        (
            "bccd.recall",
            "bccd.precision",
            "bccd.mean_cell_box_iou",
            "bccd.halves.a",
            "raabin.recall",
            "marrow.recall_by_class.BLA",
            "marrow_fields.recall",
            "marrow_fields.mean_cell_iou",
            "not_cells.pbc_platelets.detections_per_image",
            "not_cells.mll_artefacts.counted_share_of_detections",
            "synthetic.mean_cell_iou",
        ),
        ("--data", "{data}"),
        shared_data=True,
    ),
    "novel_classes.py": Promise(
        ("plasma_cells.uncertain_share", "plasma_cells.pooled_differential", "rule"),
        shared_data=True,
    ),
    "plausibility.py": Promise(
        (
            "known_mll.uncertain_share",
            "known_pbc.severity",
            "unseen_bccd.findings_above_info",
            "unseen_bccd.labelled_mix_percent",
            "unseen_raabin.largest_groups_percent",
        ),
        shared_data=True,
    ),
    "run.py": Promise(
        (
            "ratios.read_vs_tifffile",
            "ratios.classify_vs_bare_loop",
            "ratios.end_to_end_vs_classifier",
            "ratios.peak_rss_large_vs_small",
            "aims.end_to_end_vs_classifier.met",
            "stages.detect",
            "stages.end_to_end",
            "generation",
            "machine",
            "versions",
        ),
        ("--cache", "{tmp}"),
    ),
    "saliency.py": Promise(
        ("quality.layers.-1.cell.enrichment", "quality.smoothgrad", "speed.gradcam.speedup"),
        shared_data=True,
    ),
    "saliency_inside.py": Promise(
        ("cells", "area_share_mean", "gradcam.inside_share_mean", "smoothgrad.enrichment_mean")
    ),
    "unseen_lab.py": Promise(
        ("unadapted.all_cells.macro_f1_five_groups", "unadapted.uncertain_share", "cells_per_type"),
        shared_data=True,
    ),
}


def field(document: object, path: str) -> object:
    """The value at a dotted path of a JSON document."""
    for part in path.split("."):
        document = document[int(part)] if isinstance(document, list) else document[part]
    return document


def test_every_script_promises_its_fields():
    assert {p.name for p in SCRIPTS} == set(PROMISES)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_smoke(script: Path, tmp_path: Path, request: pytest.FixtureRequest):
    promise = PROMISES.get(script.name)
    if promise is None:
        pytest.fail(f"{script.name}: say in PROMISES what its JSON holds")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    data = ""
    if promise.shared_data:
        data = str(request.getfixturevalue("shared_data"))  # skips when absent
        env["WSI_SHARED_DATA"] = data
    out = tmp_path / "result.json"
    arguments = [a.format(data=data, tmp=tmp_path) for a in promise.arguments]
    committed = {p: p.stat().st_mtime_ns for p in BENCHMARKS.glob("*.json")}
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(out), *arguments],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(out.read_text())
    missing = []
    for path in promise.fields:
        try:
            field(document, path)
        except (KeyError, IndexError, TypeError):
            missing.append(path)
    assert not missing, f"{script.name} no longer writes {missing}"
    rewritten = [p.name for p, mtime in committed.items() if p.stat().st_mtime_ns != mtime]
    assert not rewritten, f"{script.name} --smoke overwrote {rewritten}"
