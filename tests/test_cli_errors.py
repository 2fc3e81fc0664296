"""Bad input at the command line: one line naming the file and the problem, exit code 2."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

WSI_RUN = Path(sys.executable).with_name("wsi-run")
WSI = Path(sys.executable).with_name("wsi")


def wsi_run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(WSI_RUN), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(
    result: subprocess.CompletedProcess, *needles: str, after_caveat: bool = False
) -> None:
    """Exit code 2 and one line on stderr holding every needle; ``after_caveat``: the card's
    caveat, printed once the card is loaded, comes first."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()[1 if after_caveat else 0 :]
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


def test_usage_errors_are_one_line(tmp_path):
    assert_one_line_error(wsi_run(tmp_path, "--bogus"), "No such option '--bogus'", "--help")
    group = subprocess.run([str(WSI), "nonsense"], capture_output=True, text=True, timeout=120)
    assert_one_line_error(group, "No such command 'nonsense'", "'wsi --help'")


@pytest.mark.parametrize("option", ["--min-confidence", "--min-agreement"])
def test_nan_thresholds_are_refused(tmp_path, option):
    assert_one_line_error(wsi_run(tmp_path / "x.svs", option, "nan"), option, "nan")


@pytest.mark.parametrize(
    ("option", "value"), [("--image-mpp", "nan"), ("--mpp", "nan"), ("--image-mpp", "-1")]
)
def test_evaluate_refuses_a_pixel_size_that_is_not_positive(tmp_path, option, value):
    result = subprocess.run(
        [str(WSI), "evaluate", str(tmp_path), option, value],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result, option, "must be a positive number of microns")


def test_unwritable_out_is_refused_before_anything_loads(shared_data, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = wsi_run(
        shared_data / "openslide-fixtures" / "small.svs", "--out", tmp_path / "file/out"
    )
    assert_one_line_error(result, str(tmp_path / "file/out"), "cannot write into the output folder")


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KB tmpfs filled to the last byte (needs root to mount; skipped otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]
    if shutil.which("mount") is None or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as filler:
            while True:
                filler.write(bytes(4096))
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_out_on_a_full_disk_is_refused_before_anything_loads(shared_data, full_disk):
    result = wsi_run(shared_data / "openslide-fixtures" / "small.svs", "--out", full_disk / "out")
    assert_one_line_error(result, "out", "No space left on device")


def test_png_too_large_to_decode_is_refused(tmp_path):
    for side in (60000, 10000):  # past Pillow's error limit, and past its warning limit
        path = tmp_path / f"{side}.png"
        path.write_bytes(png_header(side, side))
        result = wsi_run(path, "--mpp", "0.5", "--out", tmp_path / "out")
        assert_one_line_error(result, str(path), "too large to read as a plain image")


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels and holds a few bytes of them."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(bytes(16))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def card_with_weights(folder: Path, weights_file: Path, sha256: str | None = None) -> Path:
    """The synthetic-demo card with one weights file (and the SHA-256 it claims, by default
    the file's own), written to ``folder``."""
    from wsi_pipeline.core.files import file_sha256
    from wsi_pipeline.model.cards import WeightsFile, load_card, write_card

    path = folder / "mixed-up.toml"
    weights = WeightsFile(weights_file, sha256 or file_sha256(weights_file))
    base = load_card("synthetic-demo")
    write_card(dataclasses.replace(base, name="mixed-up", path=path, weights=(weights,)), path)
    return path


def test_weights_of_another_network_are_refused(shared_data, tmp_path):
    """The synthetic-demo card pointing at the default card's weights: other depths, classes."""
    from wsi_pipeline.model.cards import classifiers_dir

    weights = shutil.copy(classifiers_dir() / "default.snapshot1.safetensors", tmp_path)
    card = card_with_weights(tmp_path, Path(weights))
    result = wsi_run(
        shared_data / "openslide-fixtures" / "small.svs",
        "--classifier",
        card,
        "--out",
        tmp_path / "out",
    )
    assert_one_line_error(
        result, "default.snapshot1.safetensors", "do not fit", "of another shape", after_caveat=True
    )


def test_checksum_mismatch_shows_where_the_hashes_differ(shared_data, tmp_path):
    from wsi_pipeline.core.files import file_sha256
    from wsi_pipeline.model.cards import classifiers_dir

    weights = Path(
        shutil.copy(classifiers_dir() / "synthetic-demo.snapshot1.safetensors", tmp_path)
    )
    actual = file_sha256(weights)
    claimed = actual[:20] + ("0" if actual[20] != "0" else "1") + actual[21:]
    card = card_with_weights(tmp_path, weights, claimed)
    result = wsi_run(
        shared_data / "openslide-fixtures" / "small.svs",
        "--classifier",
        card,
        "--out",
        tmp_path / "out",
    )
    assert_one_line_error(result, "SHA-256 mismatch", after_caveat=True)
    expects, has = re.search(r"expects (\w+)\.\.\., file has (\w+)\.\.\.", result.stderr).groups()
    assert expects != has and claimed.startswith(expects) and actual.startswith(has)


def test_cuda_without_a_gpu_is_refused(shared_data, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = wsi_run(
        shared_data / "openslide-fixtures" / "small.svs",
        "--device",
        "cuda",
        "--classifier",
        "synthetic-demo",
        "--out",
        tmp_path / "out",
    )
    assert_one_line_error(result, "cuda", "0 CUDA GPU", after_caveat=True)


def test_unreachable_scheduler_is_refused_within_seconds(shared_data, tmp_path):
    start = time.monotonic()
    result = wsi_run(
        shared_data / "openslide-fixtures" / "small.svs",
        "--scheduler",
        "tcp://127.0.0.1:1",
        "--classifier",
        "synthetic-demo",
        "--out",
        tmp_path / "out",
    )
    assert_one_line_error(
        result, "tcp://127.0.0.1:1", "cannot reach the Dask scheduler", after_caveat=True
    )
    assert time.monotonic() - start < 30


def test_local_cluster_logs_only_problems_unless_verbose():
    script = (
        "from wsi_pipeline.run.cluster import Workflow, dask_client\n"
        "with dask_client(Workflow('test', workers=1), verbose={}) as client:\n"
        "    assert client.submit(sum, [1, 2]).result() == 3\n"
    )
    for verbose in (False, True):
        result = subprocess.run(
            [sys.executable, "-c", script.format(verbose)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert (" - INFO - " in result.stderr) == verbose, result.stderr


def test_every_command_takes_dash_h():
    from click.testing import CliRunner

    from wsi_pipeline.cli import wsi

    runner = CliRunner()
    for name in [None, *sorted(wsi.commands)]:
        result = runner.invoke(wsi, [*([name] if name else []), "-h"])
        assert result.exit_code == 0 and result.output.startswith("Usage: "), (name, result.output)
    shortcut = subprocess.run([str(WSI_RUN), "-h"], capture_output=True, text=True, timeout=60)
    assert shortcut.returncode == 0 and shortcut.stdout.startswith("Usage: wsi-run")
