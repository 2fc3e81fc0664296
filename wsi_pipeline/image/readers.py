"""The backends behind :class:`~wsi_pipeline.image.slide.Slide`: one reader per kind of file.

* OpenSlide for the scanner formats it knows (Aperio SVS, generic tiled TIFF, NDPI, MRXS, DICOM),
  with plain tiled RGB TIFF pages decoded directly by tifffile/simplejpeg (:class:`_TiledPages`);
* TIAToolbox for what OpenSlide refuses but TIAToolbox opens (OME-TIFF, plain strip TIFFs, ...);
* Pillow for plain JPEG/PNG photographs, read as one-level slides.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np
import simplejpeg
from PIL import Image

from wsi_pipeline.core.errors import SlideError

__all__ = [
    "DECODED_TILES_MB",
    "IMAGE_SUFFIXES",
    "PLAUSIBLE_MPP",
    "Reader",
    "open_reader",
    "plausible_mpp",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
Pair = tuple[int, int]

#: Decoded tiles kept for later reads, in MB: regions read next to each other share the tiles
#: along their common edge (about 85 JPEG tiles of 256 x 256).
DECODED_TILES_MB = 16


class Reader(Protocol):
    """What each backend provides: metadata and raw RGB reads at one pyramid level."""

    backend: str
    vendor: str
    level_dimensions: tuple[Pair, ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str
    objective_power: float | None

    def read_level(self, level: int, location: Pair, size: Pair) -> np.ndarray:
        """RGB uint8 of ``size`` (level pixels) whose top-left is ``location`` (level-0 pixels)."""

    def close(self) -> None: ...


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite RGBA on white; transparent slide margins become glass-white."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


# Microscope scans lie between ~0.05 (100x oil) and ~10 µm/px (overview images); a value outside
# this range is a software default such as 72 dpi, not a pixel size.
PLAUSIBLE_MPP = (0.01, 50.0)


def plausible_mpp(value: object, name: str) -> tuple[float | None, str]:
    """Level-0 microns per pixel from a reader property and where it came from."""
    mpp = _positive_float(value)
    if mpp is None:
        return None, "none"
    if not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        return None, f"none ({name} = {mpp:.4g} µm/px ignored: not a microscope pixel size)"
    return mpp, name


def _positive_float(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


class _TiledPages:
    """Direct tile decoding with tifffile for levels stored as plain tiled RGB TIFF pages.

    OpenSlide turns every tile into premultiplied ARGB and openslide-python turns it back; for
    tiled 8-bit RGB pages, decoding the covering tiles with tifffile and imagecodecs
    (libjpeg-turbo, zlib) gives the same pixels several times faster. JPEG tiles go through
    simplejpeg (libjpeg-turbo too, about a tenth faster) on pages where it decodes a first tile
    to exactly tifffile's pixels; JPEG colour conventions in TIFF vary, so other pages keep
    tifffile. Levels stored any other way (JPEG 2000, stripped, NDPI, ...) return None and are
    read through OpenSlide. On levels whose downsample is not a whole number, origins are
    floored to whole level pixels where OpenSlide interpolates a sub-pixel offset. The last
    :data:`DECODED_TILES_MB` of decoded tiles are kept: the pipeline's overlapping tiles, read
    row by row, share the tiles along their common edge (a quarter of the decoding).
    """

    COMPRESSIONS = frozenset({"JPEG", "ADOBE_DEFLATE", "DEFLATE", "LZW", "NONE"})

    def __init__(self, path: Path, level_dimensions: tuple[Pair, ...]):
        import tifffile

        self._tif = tifffile.TiffFile(path)
        self._lock = threading.Lock()  # one file handle: seek and read as one step
        # tifffile declares compression, photometric and planarconfig as int, but sets them to
        # its COMPRESSION, PHOTOMETRIC and PLANARCONFIG enums.
        usable: dict[tuple[int, ...], tifffile.TiffPage] = {
            (page.imagewidth, page.imagelength): page
            for page in self._tif.pages
            if isinstance(page, tifffile.TiffPage)  # not a TiffFrame: TiffFile's default
            and page.is_tiled
            and page.compression.name in self.COMPRESSIONS  # type: ignore[attr-defined]
            and page.photometric.name in ("RGB", "YCBCR")  # type: ignore[attr-defined]
            and page.samplesperpixel == 3
            and page.dtype == np.uint8
            and page.planarconfig.name == "CONTIG"  # type: ignore[attr-defined]
        }
        self.pages = [usable.get(tuple(d)) for d in level_dimensions]
        self._jpeg_decoders: dict[int, str] = {}  # by page index: see _jpeg_decoder
        self._decoded: OrderedDict[Pair, np.ndarray] = OrderedDict()  # least recent first
        self._decoded_bytes = 0
        self._decoded_lock = threading.Lock()

    def _raw_tile(self, page, index: int) -> bytes:
        with self._lock:
            self._tif.filehandle.seek(page.dataoffsets[index])
            return self._tif.filehandle.read(page.databytecounts[index])

    def _tile(self, page, index: int) -> np.ndarray:
        """One decoded tile, from the last :data:`DECODED_TILES_MB` of tiles when it is there.

        A tile the file leaves out (no bytes) is glass, as OpenSlide shows it.
        """
        if not page.databytecounts[index]:
            return np.full((page.tilelength, page.tilewidth, 3), 255, dtype=np.uint8)
        key = (page.index, index)
        with self._decoded_lock:
            tile = self._decoded.get(key)
            if tile is not None:
                self._decoded.move_to_end(key)
                return tile
        try:
            tile = self._decode(page, self._raw_tile(page, index), index)
        except Exception as error:  # each decoder raises its own types
            raise ValueError(f"tile {index} of TIFF page {page.index}: {error}") from error
        with self._decoded_lock:
            if key not in self._decoded:
                self._decoded[key] = tile
                self._decoded_bytes += tile.nbytes
            while self._decoded_bytes > DECODED_TILES_MB * 2**20:
                self._decoded_bytes -= self._decoded.popitem(last=False)[1].nbytes
        return tile

    def _decode(self, page, raw: bytes, index: int) -> np.ndarray:
        """One tile as (tile length, tile width, 3) uint8; corrupt data raises ValueError."""
        decoder = self._jpeg_decoder(page) if page.compression.name == "JPEG" else "tifffile"
        if decoder == "simplejpeg":
            return _simplejpeg_decode(page, raw)
        if decoder == "checked":
            # imagecodecs ignores libjpeg's warnings and returns the pixels of a corrupt tile;
            # simplejpeg raises on them.
            _simplejpeg_decode(page, raw)
        return _tifffile_decode(page, raw, index)

    def _jpeg_decoder(self, page) -> str:
        """How the JPEG tiles of a page are decoded, from its first tile.

        ``simplejpeg`` when it decodes that tile to exactly tifffile's pixels; ``checked`` when
        it decodes it to other pixels (tifffile decodes, simplejpeg checks the data);
        ``tifffile`` when simplejpeg cannot decode it at all.
        """
        decoder = self._jpeg_decoders.get(page.index)
        if decoder is None:
            index = int(np.argmax(np.asarray(page.databytecounts) > 0))
            raw = self._raw_tile(page, index)
            try:
                tile = _simplejpeg_decode(page, raw)
            except ValueError:
                decoder = "tifffile"
            else:
                same = np.array_equal(tile, _tifffile_decode(page, raw, index))
                decoder = "simplejpeg" if same else "checked"
            self._jpeg_decoders[page.index] = decoder
        return decoder

    def read(self, level: int, origin: Pair, size: Pair) -> np.ndarray | None:
        """RGB of ``size`` whose top-left is ``origin`` in level pixels; None if not tiled."""
        page = self.pages[level]
        if page is None:
            return None
        (x, y), (width, height) = origin, size
        th, tw = page.tilelength, page.tilewidth
        across = -(-page.imagewidth // tw)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, page.imagewidth), min(y + height, page.imagelength)
        if (x0, y0, x1, y1) == (x, y, x + width, y + height):
            out = np.empty((height, width, 3), dtype=np.uint8)  # every pixel gets decoded
        else:
            out = np.full((height, width, 3), 255, dtype=np.uint8)  # outside the image is glass
        for row in range(y0 // th, -(-y1 // th)):
            for col in range(x0 // tw, -(-x1 // tw)):
                index = row * across + col
                tile = self._tile(page, index)
                ty0, tx0 = row * th, col * tw
                sy, sx = max(y0, ty0), max(x0, tx0)
                ey, ex = min(y1, ty0 + th), min(x1, tx0 + tw)
                out[sy - y : ey - y, sx - x : ex - x] = tile[
                    sy - ty0 : ey - ty0, sx - tx0 : ex - tx0
                ]
        return out

    def close(self) -> None:
        self._tif.close()


def _tifffile_decode(page, raw: bytes, index: int) -> np.ndarray:
    """A tile by tifffile (imagecodecs) as (tile length, tile width, 3) uint8."""
    tile = page.decode(raw, index, jpegtables=page.jpegtables)[0]
    return tile.reshape(page.tilelength, page.tilewidth, 3)


def _simplejpeg_decode(page, raw: bytes) -> np.ndarray:
    """A JPEG tile by simplejpeg as RGB uint8 (its own shape: compare before trusting it).

    simplejpeg is strict: data libjpeg can only partly decode raises ValueError.
    """
    rgb = page.photometric.name == "RGB"
    return simplejpeg.decode_jpeg(_whole_jpeg(raw, page.jpegtables, rgb), colorspace="RGB")


#: An Adobe APP14 segment whose transform 0 tells libjpeg the components are RGB, not YCbCr.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def _whole_jpeg(tile: bytes, tables: bytes | None, rgb: bool = False) -> bytes:
    """A TIFF JPEG tile as a self-contained JPEG stream: the shared tables spliced in.

    With ``rgb`` (photometric RGB, as Aperio writes) an Adobe segment says so: a stream without
    one is taken for YCbCr by libjpeg.
    """
    start = b"\xff\xd8" + (_ADOBE_RGB if rgb else b"")
    if not tables:
        return start + tile[2:]
    # The tables' stream without its start and end markers, then the tile's without its start.
    return start + tables[2:-2] + tile[2:]


class _OpenSlideReader:
    backend = "openslide"
    # Formats whose pyramid levels are the TIFF pages themselves.
    TIFF_VENDORS = frozenset({"aperio", "generic-tiff"})

    def __init__(self, path: Path):
        import openslide

        self._path = path
        self._error = openslide.OpenSlideError
        self._slide = openslide.OpenSlide(str(path))
        props = self._slide.properties
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
        self.level_dimensions = tuple(self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.mpp, self.mpp_source = plausible_mpp(
            props.get(openslide.PROPERTY_NAME_MPP_X), openslide.PROPERTY_NAME_MPP_X
        )
        self.objective_power = _positive_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        self._tiles = (
            _TiledPages(path, self.level_dimensions) if self.vendor in self.TIFF_VENDORS else None
        )

    def read_level(self, level: int, location: Pair, size: Pair) -> np.ndarray:
        if self._tiles is not None:
            downsample = self.level_downsamples[level]
            origin = (int(location[0] / downsample), int(location[1] / downsample))
            region = self._tiles.read(level, origin, size)
            if region is not None:
                return region
        slide = self._slide
        try:
            return _rgba_to_rgb(np.asarray(slide.read_region(location, level, size)))
        except self._error:
            # OpenSlide's errors are sticky: the handle would refuse every later read. Reads in
            # progress on other threads keep the old handle until they return.
            if self._slide is slide:
                self._slide = type(slide)(str(self._path))
            raise

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
        self._slide.close()


class _TiaToolboxReader:
    backend = "tiatoolbox"

    def __init__(self, path: Path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from tiatoolbox.wsicore.wsireader import WSIReader

            self._reader = WSIReader.open(path)
            meta = self._reader.info
        self.vendor = str(meta.vendor or "tiatoolbox")
        self.level_dimensions = tuple((int(w), int(h)) for w, h in meta.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in meta.level_downsamples)
        mpp = None if meta.mpp is None else np.asarray(meta.mpp).ravel()[0]
        self.mpp, self.mpp_source = plausible_mpp(mpp, "tiatoolbox.mpp")
        self.objective_power = _positive_float(meta.objective_power)

    def read_level(self, level: int, location: Pair, size: Pair) -> np.ndarray:
        x, y = location
        ds = self.level_downsamples[level]
        bounds = (x, y, x + round(size[0] * ds), y + round(size[1] * ds))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            region = self._reader.read_bounds(bounds, resolution=level, units="level")
        region = np.asarray(region)
        if region.shape[-1] == 4:
            region = _rgba_to_rgb(region)
        if region.shape[1::-1] != tuple(size):
            region = np.asarray(Image.fromarray(region).resize(size, Image.Resampling.BILINEAR))
        return np.ascontiguousarray(region[..., :3])

    def close(self) -> None:
        pass


class _ImageReader:
    backend = "pillow"

    def __init__(self, path: Path):
        # A plain image is decoded whole: refuse one larger than Pillow's decompression-bomb
        # limit (about 89 million pixels), which it would otherwise only warn about.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(path) as image:
                    image.load()
                    rgba = np.asarray(image.convert("RGBA"))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
                raise SlideError(
                    path, f"too large to read as a plain image ({error}); save it as a tiled TIFF"
                ) from error
        self._rgb = _rgba_to_rgb(rgba)
        height, width = self._rgb.shape[:2]
        self.vendor = "image"
        self.level_dimensions: tuple[Pair, ...] = ((width, height),)
        self.level_downsamples: tuple[float, ...] = (1.0,)
        self.mpp: float | None = None
        self.mpp_source = "none"
        self.objective_power: float | None = None

    def read_level(self, level: int, location: Pair, size: Pair) -> np.ndarray:
        x, y = location
        width, height = size
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        src = self._rgb[max(y, 0) : y + height, max(x, 0) : x + width]
        out[max(-y, 0) : max(-y, 0) + src.shape[0], max(-x, 0) : max(-x, 0) + src.shape[1]] = src
        return out

    def close(self) -> None:
        pass


def _refuse_large_untiled(path: Path) -> None:
    """Refuse an untiled TIFF larger than Pillow's limit: TIAToolbox would decode it whole,
    whatever size its header claims."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            tiled, width, height = page.is_tiled, page.imagewidth, page.imagelength
    except (tifffile.TiffFileError, ValueError, OSError):
        return  # not a TIFF: TIAToolbox says what it is
    limit = Image.MAX_IMAGE_PIXELS  # None when the user lifted Pillow's limit
    if not tiled and limit is not None and width * height > limit:
        raise SlideError(
            path,
            f"an untiled image of {width} x {height} pixels is too large to read whole (more "
            f"than {limit}); save it as a tiled pyramidal TIFF",
        )


def open_reader(path: Path) -> Reader:
    import openslide

    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            return _ImageReader(path)
        except (OSError, ValueError) as error:
            raise SlideError(path, f"not a readable image: {error}") from error

    if openslide.OpenSlide.detect_format(str(path)) is not None:
        try:
            return _OpenSlideReader(path)
        except openslide.OpenSlideError as error:
            raise SlideError(path, f"OpenSlide cannot open it: {error}") from error

    _refuse_large_untiled(path)
    try:
        return _TiaToolboxReader(path)
    except Exception as tia_error:  # TIAToolbox raises many types for unsupported files
        try:
            return _ImageReader(path)
        except (OSError, ValueError):
            pass
        raise SlideError(
            path, f"not a slide that OpenSlide or TIAToolbox can read ({tia_error})"
        ) from tia_error
