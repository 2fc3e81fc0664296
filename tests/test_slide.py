"""Slide reading: every real fixture behaves exactly as documented in ../shared/data/README.md."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image
from test_cli_errors import WSI_RUN

from wsi_pipeline.image import readers
from wsi_pipeline.image.slide import SlideError, find_slides, open_slide, resize_region
from wsi_pipeline.synth.smear import write_synthetic_slide


@pytest.fixture(scope="module")
def fixtures(shared_data):
    return shared_data / "openslide-fixtures"


@pytest.fixture(scope="module")
def slides(shared_data):
    return shared_data / "slides"


@pytest.mark.parametrize(
    ("name", "vendor", "size", "mpp"),
    [
        ("small.svs", "aperio", (16, 16), 0.499),
        ("boxes_0.dcm", "dicom", (16, 16), 0.499),
        ("boxes_1.dcm", "dicom", (16, 16), 0.499),
    ],
)
def test_openslide_fixtures_report_vendor_and_mpp(fixtures, name, vendor, size, mpp):
    with open_slide(fixtures / name) as slide:
        assert slide.info.vendor == vendor
        assert slide.info.backend == "openslide"
        assert slide.info.dimensions == size
        assert slide.mpp == pytest.approx(mpp)
        assert slide.info.mpp_source == "openslide.mpp-x"


def test_generic_tiff_with_a_72_dpi_tag_has_no_microns_per_pixel(fixtures):
    slide = open_slide(fixtures / "boxes.tiff")
    assert slide.info.vendor == "generic-tiff"
    assert slide.info.dimensions == (300, 250)
    assert slide.info.mpp is None
    assert "not a microscope pixel size" in slide.info.mpp_source
    with pytest.raises(SlideError, match=r"boxes\.tiff: no microns per pixel.*pass --mpp"):
        slide.mpp  # noqa: B018


def test_dicom_folder_opens_as_one_slide(fixtures, tmp_path):
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(fixtures / name, tmp_path / name)
    slide = open_slide(tmp_path)
    assert slide.info.vendor == "dicom"
    assert slide.info.path == tmp_path
    assert find_slides(tmp_path) == [tmp_path]


def test_dicom_files_among_other_slides_are_one_slide_of_that_folder(fixtures, tmp_path):
    for name in ("boxes_0.dcm", "boxes_1.dcm", "small.svs"):
        shutil.copy(fixtures / name, tmp_path / name)
    (tmp_path / "series").mkdir()  # a DICOM slide's own folder below
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(fixtures / name, tmp_path / "series" / name)
    slides = [tmp_path / "boxes_0.dcm", tmp_path / "series", tmp_path / "small.svs"]
    assert find_slides(tmp_path) == slides
    assert [open_slide(path).info.vendor for path in slides] == ["dicom", "dicom", "aperio"]
    with pytest.raises(SlideError, match="is a directory, not a slide"):
        open_slide(tmp_path)


def test_plain_png_is_a_one_level_slide(fixtures):
    slide = open_slide(fixtures / "boxes.png", mpp=0.5)
    assert (slide.info.vendor, slide.info.backend) == ("image", "pillow")
    assert slide.info.level_dimensions == ((300, 250),)
    expected = np.asarray(Image.open(fixtures / "boxes.png").convert("RGB"))
    np.testing.assert_array_equal(slide.read_region((0, 0), (300, 250)), expected)


def test_unopenable_tiff_names_file_and_compression(fixtures):
    with pytest.raises(SlideError) as caught:
        open_slide(fixtures / "unopenable.tiff")
    message = str(caught.value)
    assert message.startswith(str(fixtures / "unopenable.tiff"))
    assert "Unsupported TIFF compression: 52479" in message
    assert "\n" not in message


def test_undecodable_svs_fails_when_opened_not_later(fixtures):
    with pytest.raises(SlideError, match=r"unreadable\.svs: tiles cannot be decoded.*Bogus marker"):
        open_slide(fixtures / "unreadable.svs")


def test_real_scanner_svs_reads_at_any_resolution(slides):
    path = slides / "CMU-1-Small-Region.svs"
    slide = open_slide(path)
    info = slide.info
    assert (info.vendor, info.dimensions, len(info.level_dimensions)) == ("aperio", (2220, 2967), 1)
    assert info.mpp == pytest.approx(0.499)
    assert info.objective_power == 20

    native = slide.read_region((1000, 1200), (256, 128))
    raw = np.asarray(openslide.OpenSlide(str(path)).read_region((1000, 1200), 0, (256, 128)))
    np.testing.assert_array_equal(native, raw[..., :3])

    half = slide.read_region((1000, 1200), (128, 64), mpp=2 * info.mpp)
    assert half.shape == (64, 128, 3)
    block_means = native.reshape(64, 2, 128, 2, 3).mean(axis=(1, 3))
    assert np.abs(half.astype(float) - block_means).mean() < 2.0


def test_slide_without_mpp_needs_the_user_to_give_it(slides):
    path = slides / "TCGA-CR-7395-01A-01-TS1.svs"
    slide = open_slide(path)
    assert slide.info.vendor == "aperio"
    assert slide.info.level_dimensions == ((4443, 3567), (2221, 1783))
    assert slide.info.mpp is None
    with pytest.raises(SlideError, match="pass --mpp"):
        slide.read_region((0, 0), (64, 64), mpp=1.0)

    given = open_slide(path, mpp=0.25)
    assert (given.mpp, given.info.mpp_source) == (0.25, "user")
    assert given.best_level(2.0) == 1
    region = given.read_region((2000, 1500), (100, 80), mpp=0.5)  # from level 1
    assert region.shape == (80, 100, 3)
    assert region.std() > 5  # tissue, not blank


def test_non_pyramidal_tiff_falls_back_to_tiatoolbox(slides):
    path = slides / "kidney-48-5.tif"
    slide = open_slide(path, mpp=0.5)
    assert slide.info.backend == "tiatoolbox"
    assert slide.info.dimensions == (1493, 901)
    assert open_slide(path).info.mpp is None

    pixels = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(slide.read_region((0, 0), (1493, 901)), pixels)
    half = slide.read_region((300, 200), (200, 150), mpp=1.0)
    block_means = pixels[200:500, 300:700].reshape(150, 2, 200, 2, 3).mean(axis=(1, 3))
    assert np.abs(half - block_means).mean() < 1.0


@pytest.mark.parametrize(
    ("size", "out"),
    [
        ((1366, 1366), (1024, 1024)),  # 0.25 -> 1/3 um/px, the usual tile
        ((1366, 901), (800, 530)),  # ties between footprints fall as in Pillow
        ((300, 200), (299, 200)),
        ((100, 90), (40, 36)),  # more than 2x: Pillow itself
        ((50, 50), (80, 80)),  # enlarging: bilinear
    ],
)
def test_resize_is_pillows_box_filter_within_one_grey_level(size, out):
    image = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    filter_ = Image.BOX if out[0] < size[0] else Image.BILINEAR
    expected = np.asarray(Image.fromarray(image).resize(out, filter_)).astype(int)
    resized = resize_region(image, out)
    assert resized.shape == (out[1], out[0], 3)
    assert np.abs(resized - expected).max() <= 1


def test_ycbcr_jpeg_tiles_decode_by_simplejpeg_to_tifffiles_pixels(tmp_path):
    write_synthetic_slide(tmp_path / "s.svs", size=(1500, 1000), seed=3)
    with open_slide(tmp_path / "s.svs") as slide, tifffile.TiffFile(tmp_path / "s.svs") as tif:
        tiles = slide._reader._tiles
        assert tiles._jpeg_decoder(tiles.pages[0]) == "simplejpeg"  # the fast decoder is in use
        expected = tif.pages[0].asarray()
        np.testing.assert_array_equal(slide.read_region((0, 0), (1500, 1000)), expected)


def _decodes_of_two_overlapping_reads(path, monkeypatch) -> list[int]:
    """Tiles decoded while reading two regions that share a column of 256-px tiles."""
    with open_slide(path) as slide, tifffile.TiffFile(path) as tif:
        tiles = slide._reader._tiles
        decoded: list[int] = []
        decode = tiles._decode
        monkeypatch.setattr(tiles, "_decode", lambda *a: decoded.append(a[2]) or decode(*a))
        expected = tif.pages[0].asarray()
        # Tile rows 0-1; tile columns 0-2, then 2-4.
        np.testing.assert_array_equal(
            slide.read_region((0, 200), (700, 300)), expected[200:500, :700]
        )
        np.testing.assert_array_equal(
            slide.read_region((600, 200), (600, 300)), expected[200:500, 600:1200]
        )
    return decoded


def test_overlapping_reads_decode_shared_tiles_once(tmp_path, monkeypatch):
    write_synthetic_slide(tmp_path / "s.svs", size=(1500, 1000), seed=3)
    decoded = _decodes_of_two_overlapping_reads(tmp_path / "s.svs", monkeypatch)
    assert len(decoded) == len(set(decoded))
    monkeypatch.setattr(readers, "DECODED_TILES_MB", 0)
    assert len(_decodes_of_two_overlapping_reads(tmp_path / "s.svs", monkeypatch)) == 2 * 6


def test_transparent_pixels_become_glass_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (200, 0, 0, 255)
    Image.fromarray(rgba).save(tmp_path / "half.png")
    region = open_slide(tmp_path / "half.png", mpp=1).read_region((0, 0), (8, 8))
    assert (region[:4] == (200, 0, 0)).all()
    assert (region[4:] == 255).all()


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda d: d / "missing.svs", "no such file"),
        (lambda d: (d / "empty.svs").touch() or d / "empty.svs", "empty file"),
        (lambda d: (d / "notes.svs").write_text("hello") and d / "notes.svs", "not a slide"),
    ],
)
def test_bad_paths_give_one_line(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(SlideError) as caught:
        open_slide(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert problem in str(caught.value)


def test_find_slides_in_a_tree(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.svs", "b.tif", "c.txt", ".hidden.svs"):
        (tmp_path / name).write_bytes(b"0")
    assert find_slides(tmp_path) == [tmp_path / "a/x.svs", tmp_path / "b.tif"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideError, match="no slide files found"):
        find_slides(tmp_path / "empty")


@pytest.mark.parametrize(
    "name",
    [
        "slides/CMU-1-Small-Region.svs",
        "openslide-fixtures/small.svs",
        "slides/TCGA-CR-7395-01A-01-TS1.svs",
    ],
)
def test_direct_tile_decoding_gives_openslides_pixels(shared_data, name):
    """Tiled JPEG levels are decoded by tifffile, JPEG 2000 ones by OpenSlide: same pixels."""
    path = shared_data / name
    slide, reference = open_slide(path, mpp=0.5), openslide.OpenSlide(str(path))
    rng = np.random.default_rng(0)
    for level, (width, height) in enumerate(slide.info.level_dimensions):
        if slide.info.level_downsamples[level] != round(slide.info.level_downsamples[level]):
            continue  # OpenSlide interpolates sub-pixel origins there
        downsample = round(slide.info.level_downsamples[level])
        for _ in range(5):  # some regions hang over the slide's edges
            size = (
                int(rng.integers(1, min(width, 600) + 1)),
                int(rng.integers(1, min(height, 600) + 1)),
            )
            origin = (
                int(rng.integers(-40, width)) * downsample,
                int(rng.integers(-40, height)) * downsample,
            )
            ours = slide._reader.read_level(level, origin, size)
            theirs = np.asarray(reference.read_region(origin, level, size))
            alpha = theirs[..., 3:] / 255
            composite = (theirs[..., :3] * alpha + 255 * (1 - alpha)).round()
            np.testing.assert_array_equal(ours, composite.astype(np.uint8))


def write_giant_tiff(path, side: int = 30000, tile: int = 512) -> None:
    """A tiled RGB TIFF that claims ``side`` x ``side`` pixels in about 30 KB: every tile's
    offset points at the same small compressed tile."""
    count = (-(-side // tile)) ** 2
    tiles = itertools.chain([np.full((tile, tile, 3), 240, np.uint8)], itertools.repeat(None))
    tifffile.imwrite(
        path,
        itertools.islice(tiles, count),
        shape=(side, side, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="zlib",
    )
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        offset, size = page.dataoffsets[0], page.databytecounts[0]
        page.tags["TileOffsets"].overwrite([offset] * count)
        page.tags["TileByteCounts"].overwrite([size] * count)


def test_no_read_is_larger_than_the_cap(tmp_path):
    write_giant_tiff(tmp_path / "giant.tif")
    with open_slide(tmp_path / "giant.tif", mpp=0.25) as slide:
        with pytest.raises(SlideError, match="more than one read may take"):
            slide.read_region((0, 0), (30000, 30000))
        thumbnail = slide.thumbnail(8.0)  # read in pieces under the cap
        assert thumbnail.shape == (938, 938, 3)
        assert (thumbnail[:-1, :-1] == 240).all()  # the last row and column reach past the edge
    huge = open_slide(tmp_path / "giant.tif", mpp=50)  # a slide 1.5 m wide
    with huge, pytest.raises(SlideError, match=r"overview at 4.0 µm per pixel, more than"):
        huge.thumbnail(4.0)


def test_a_run_on_a_huge_claimed_level_holds_its_memory(tmp_path):
    write_giant_tiff(tmp_path / "giant.tif")
    # Run under a Python that reports the peak RSS of its one child, the run.
    peak_of_child = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\n"
        "sys.exit(code)\n"
    )
    run = [WSI_RUN, tmp_path / "giant.tif", "--mpp", "0.25", "--out", tmp_path / "out"]
    fast = ["--classifier", "synthetic-demo", "--saliency", "none", "--quiet"]
    result = subprocess.run(
        [sys.executable, "-c", peak_of_child, *map(str, run + fast)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode in (0, 2), result.stderr
    assert "Traceback" not in result.stderr
    assert int(result.stdout) < 2500, f"peak RSS {result.stdout.strip()} MB"


def test_an_untiled_tiff_too_large_to_decode_whole_is_refused(tmp_path):
    """TIAToolbox decodes an untiled image whole, whatever its header claims."""
    path, side, rows = tmp_path / "strips.tif", 10000, 16
    strip = np.full((rows, side, 3), 240, np.uint8)
    tifffile.imwrite(path, strip, rowsperstrip=rows, photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as tif:  # claim `side` rows: every strip the first
        page = tif.pages[0]
        offset, size = page.dataoffsets[0], page.databytecounts[0]
        page.tags["ImageLength"].overwrite(side)
        page.tags["StripOffsets"].overwrite([offset] * (side // rows))
        page.tags["StripByteCounts"].overwrite([size] * (side // rows))
    with pytest.raises(SlideError, match="untiled image of 10000 x 10000 pixels is too large"):
        open_slide(path, mpp=0.25)
