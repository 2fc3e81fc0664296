"""Bad input at the command line: one line naming the file and the problem, exit code 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WSI_RUN = Path(sys.executable).with_name("wsi-run")


def wsi_run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(WSI_RUN), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_missing_path(tmp_path):
    assert_one_line_error(wsi_run(tmp_path / "nope.svs"), "nope.svs", "no such file")


def test_directory_without_slides(tmp_path):
    (tmp_path / "readme.txt").write_text("not a slide")
    assert_one_line_error(wsi_run(tmp_path), str(tmp_path), "no slide files found")


def test_zero_byte_file(tmp_path):
    (tmp_path / "zero.svs").touch()
    assert_one_line_error(wsi_run(tmp_path / "zero.svs"), "zero.svs", "empty file")


def test_non_slide_file(tmp_path):
    (tmp_path / "fake.tif").write_text("this is text, not a TIFF\n" * 10)
    assert_one_line_error(wsi_run(tmp_path / "fake.tif"), "fake.tif", "not a slide")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("unopenable.tiff", "Unsupported TIFF compression: 52479"),
        ("unreadable.svs", "tiles cannot be decoded"),
    ],
)
def test_broken_fixtures(shared_data, tmp_path, name, problem):
    shutil.copy(shared_data / "openslide-fixtures" / name, tmp_path / name)
    assert_one_line_error(wsi_run(tmp_path / name, "--out", tmp_path / "out"), name, problem)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_mpp_says_how_to_fix_it(shared_data):
    tcga = shared_data / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"
    assert_one_line_error(wsi_run(tcga), "TCGA-CR-7395-01A-01-TS1.svs", "pass --mpp")
