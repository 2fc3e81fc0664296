"""A tile whose image data is corrupt is never decoded silently: it is left out and reported, or
it stops the run (``--on-bad-tile stop``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tifffile
import zarr
from test_cli_errors import assert_one_line_error, wsi_run

from wsi_pipeline.image.slide import UnreadableRegion, open_slide

CMU = "CMU-1-Small-Region.svs"
#: The 240-px JPEG tile at row 6, column 3 of the CMU slide: inside the counted pipeline tile 9
#: (level-0 origin (600, 1200)) and in no other tile's read, and away from the centre tile that
#: opening a slide decodes.
BAD_JPEG_TILE = 6 * 10 + 3
BAD_TILE_ORIGIN = (600, 1200)
FAST = ("--classifier", "synthetic-demo", "--saliency", "none", "--quiet")


def corrupt_tile(path: Path, index: int) -> None:
    """Zero the middle third of one JPEG tile's bytes, as a bad sector or a broken copy would.

    libjpeg only warns about such data ("premature end of data segment") and returns pixels.
    """
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as stream:
        stream.seek(offset + count // 3)
        stream.write(bytes(count // 3))


@pytest.fixture
def damaged_slide(shared_data, tmp_path) -> Path:
    path = tmp_path / CMU
    shutil.copy(shared_data / "slides" / CMU, path)
    corrupt_tile(path, BAD_JPEG_TILE)
    return path


def test_reading_a_corrupt_tile_raises_and_names_it(damaged_slide):
    with open_slide(damaged_slide) as slide:
        with pytest.raises(UnreadableRegion, match=r"premature end of data segment") as caught:
            slide.read_region((720, 1440), (240, 240))
        assert str(caught.value).startswith(f"{damaged_slide}: ")
        assert f"tile {BAD_JPEG_TILE} of TIFF page 0" in str(caught.value)
        slide.read_region((0, 0), (240, 240))  # the other tiles still read


def test_openslide_reads_after_a_corrupt_tile(damaged_slide):
    """OpenSlide's errors are sticky; the reader reopens the slide after one."""
    with open_slide(damaged_slide) as slide:
        slide._reader._tiles = None  # read through OpenSlide, as for JPEG 2000 levels
        with pytest.raises(UnreadableRegion, match="Corrupt JPEG data"):
            slide.read_region((720, 1440), (240, 240))
        assert slide.read_region((0, 0), (240, 240)).shape == (240, 240, 3)


def test_thumbnail_inpaints_what_cannot_be_decoded(damaged_slide, shared_data):
    with open_slide(damaged_slide) as slide, open_slide(shared_data / "slides" / CMU) as intact:
        thumbnail, expected = slide.thumbnail(4.0).astype(int), intact.thumbnail(4.0)
    assert thumbnail.shape == expected.shape
    assert abs(thumbnail - expected).mean() < 2  # read in pieces: the same within a grey level
    # The corrupt tile, level-0 (720, 1440) to (960, 1680), is smear like its surroundings, not
    # glass, so the tile over it is planned like its neighbours and detection reports it.
    damaged = thumbnail[180:210, 90:120].mean(axis=(0, 1))
    assert abs(damaged - expected[180:210, 90:120].mean(axis=(0, 1))).max() < 15


def test_run_leaves_the_tile_out_and_says_so(damaged_slide, tmp_path):
    result = wsi_run(damaged_slide, "--out", tmp_path / "out", *FAST)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "unreadable" in line]
    assert len(said) == 1, result.stderr
    assert str(damaged_slide) in said[0] and str(BAD_TILE_ORIGIN) in said[0]
    assert "1 unreadable tile left out" in result.stdout  # the summary's warnings

    store = zarr.open_group(tmp_path / "out" / "CMU-1-Small-Region.zarr", mode="r")
    unreadable = store.attrs["unreadable_tiles"]
    assert unreadable["count"] == 1
    assert [tile["origin"] for tile in unreadable["tiles"]] == [list(BAD_TILE_ORIGIN)]
    assert "premature end of data segment" in unreadable["tiles"][0]["problem"]
    assert 9 not in set(store["cells/tile_id"][:])
    findings = store.attrs["counts"]["findings"]
    assert any(f["severity"] == "caution" and "1 unreadable tile" in f["message"] for f in findings)
    report = (tmp_path / "out" / "CMU-1-Small-Region.report.html").read_text()
    assert "1 unreadable tile left out" in report


def test_on_bad_tile_stop_ends_the_run_naming_the_tile(damaged_slide, tmp_path):
    result = wsi_run(damaged_slide, "--out", tmp_path / "out", "--on-bad-tile", "stop", *FAST)
    problem = "premature end of data segment"
    assert_one_line_error(
        result, f"{damaged_slide}: ", str(BAD_TILE_ORIGIN), problem, after_caveat=True
    )
    assert not list((tmp_path / "out").glob("*.zarr"))
