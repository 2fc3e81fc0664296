"""Open whole-slide images and read regions at a requested physical resolution.

Three readers stand behind one :class:`Slide`:

* OpenSlide for the scanner formats it knows (Aperio SVS, generic tiled TIFF, NDPI, MRXS, DICOM);
* TIAToolbox for what OpenSlide refuses but TIAToolbox opens (OME-TIFF, plain strip TIFFs, ...);
* Pillow for plain JPEG/PNG photographs, read as one-level slides.

Every position is a level-0 pixel coordinate; every size passed to :meth:`Slide.read_region` is
in output pixels at the requested microns per pixel. Failures raise :class:`SlideError`, whose
message is one line naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import simplejpeg
from numpy.typing import NDArray
from PIL import Image

from wsi_pipeline.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
    ".qptiff", *IMAGE_SUFFIXES,
)  # fmt: skip
Pair = tuple[int, int]
#: Decoded tiles kept for later reads, in MB: regions read next to each other share the tiles
#: along their common edge (about 85 JPEG tiles of 256 x 256).
DECODED_TILES_MB = 16


class SlideError(InputError):
    """A slide that cannot be opened or read; ``str()`` is one line naming the file."""


@dataclass(frozen=True)
class SlideInfo:
    """What is known of a slide before reading any pixels.

    Attributes
    ----------
    path : Path
        The file (or DICOM folder) as opened.
    vendor : str
        Format reported by the reader (``aperio``, ``generic-tiff``, ``dicom``, ``image``, ...).
    backend : str
        ``openslide``, ``tiatoolbox`` or ``pillow``.
    dimensions : tuple of int
        Level-0 ``(width, height)`` in pixels.
    level_dimensions : tuple of (int, int)
        ``(width, height)`` of every pyramid level, level 0 first.
    level_downsamples : tuple of float
        Downsample factor of every level relative to level 0.
    mpp : float or None
        Microns per pixel at level 0, or None when neither the file nor the user gives it.
    mpp_source : str
        Where ``mpp`` came from: a property name of the reader, ``user`` or ``none``.
    objective_power : float or None
        Scanning magnification, when recorded.
    """

    path: Path
    vendor: str
    backend: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str
    objective_power: float | None = None

    def as_dict(self) -> dict:
        """JSON-ready copy of the fields."""
        return {
            "path": str(self.path),
            "vendor": self.vendor,
            "backend": self.backend,
            "dimensions": list(self.dimensions),
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
        }


class _Reader(Protocol):
    """What each backend provides: metadata and raw RGB reads at one pyramid level."""

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


def _plausible_mpp(value: object, name: str) -> tuple[float | None, str]:
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
        usable = {
            (page.imagewidth, page.imagelength): page
            for page in self._tif.pages
            if page.is_tiled
            and page.compression.name in self.COMPRESSIONS
            and page.photometric.name in ("RGB", "YCBCR")
            and page.samplesperpixel == 3
            and page.dtype == np.uint8
            and page.planarconfig.name == "CONTIG"
        }
        self.pages = [usable.get(tuple(d)) for d in level_dimensions]
        self._simplejpeg: dict[int, bool] = {}  # by page index: decodes as tifffile does
        self._decoded: OrderedDict[Pair, np.ndarray] = OrderedDict()  # least recent first
        self._decoded_bytes = 0
        self._decoded_lock = threading.Lock()

    def _raw_tile(self, page, index: int) -> bytes:
        with self._lock:
            self._tif.filehandle.seek(page.dataoffsets[index])
            return self._tif.filehandle.read(page.databytecounts[index])

    def _tile(self, page, index: int) -> np.ndarray:
        """One decoded tile, from the last :data:`DECODED_TILES_MB` of tiles when it is there."""
        key = (page.index, index)
        with self._decoded_lock:
            tile = self._decoded.get(key)
            if tile is not None:
                self._decoded.move_to_end(key)
                return tile
        tile = self._decode(page, self._raw_tile(page, index), index)
        with self._decoded_lock:
            if key not in self._decoded:
                self._decoded[key] = tile
                self._decoded_bytes += tile.nbytes
            while self._decoded_bytes > DECODED_TILES_MB * 2**20:
                self._decoded_bytes -= self._decoded.popitem(last=False)[1].nbytes
        return tile

    def _decode(self, page, raw: bytes, index: int) -> np.ndarray:
        """One tile as (tile length, tile width, 3) uint8."""
        if page.compression.name == "JPEG" and self._simplejpeg_agrees(page):
            return _simplejpeg_decode(page, raw)
        return _tifffile_decode(page, raw, index)

    def _simplejpeg_agrees(self, page) -> bool:
        agrees = self._simplejpeg.get(page.index)
        if agrees is None:
            index = int(np.argmax(np.asarray(page.databytecounts) > 0))
            raw = self._raw_tile(page, index)
            try:
                tile = _simplejpeg_decode(page, raw)
            except ValueError:
                tile = None
            agrees = tile is not None and np.array_equal(tile, _tifffile_decode(page, raw, index))
            self._simplejpeg[page.index] = agrees
        return agrees

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
    """A JPEG tile by simplejpeg as RGB uint8 (its own shape: compare before trusting it)."""
    return simplejpeg.decode_jpeg(_whole_jpeg(raw, page.jpegtables), colorspace="RGB")


def _whole_jpeg(tile: bytes, tables: bytes | None) -> bytes:
    """A TIFF JPEG tile as a self-contained JPEG stream: the shared tables spliced in."""
    if not tables:
        return tile
    # The tables' stream without its end marker, then the tile's without its start marker.
    return tables[:-2] + tile[2:]


class _OpenSlideReader:
    # Formats whose pyramid levels are the TIFF pages themselves.
    TIFF_VENDORS = frozenset({"aperio", "generic-tiff"})

    def __init__(self, path: Path):
        import openslide

        self._error = openslide.OpenSlideError
        self._slide = openslide.OpenSlide(str(path))
        props = self._slide.properties
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
        self.level_dimensions = tuple(self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.mpp, self.mpp_source = _plausible_mpp(
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
        return _rgba_to_rgb(np.asarray(self._slide.read_region(location, level, size)))

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
        self._slide.close()


class _TiaToolboxReader:
    def __init__(self, path: Path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from tiatoolbox.wsicore.wsireader import WSIReader

            self._reader = WSIReader.open(path)
            meta = self._reader.info
        self.vendor = str(meta.vendor or "tiatoolbox")
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in meta.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in meta.level_downsamples)
        mpp = None if meta.mpp is None else np.asarray(meta.mpp).ravel()[0]
        self.mpp, self.mpp_source = _plausible_mpp(mpp, "tiatoolbox.mpp")
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
            region = np.asarray(Image.fromarray(region).resize(size, Image.BILINEAR))
        return np.ascontiguousarray(region[..., :3])

    def close(self) -> None:
        pass


class _ImageReader:
    def __init__(self, path: Path):
        with Image.open(path) as image:
            image.load()
            rgba = np.asarray(image.convert("RGBA"))
        self._rgb = _rgba_to_rgb(rgba)
        height, width = self._rgb.shape[:2]
        self.vendor = "image"
        self.level_dimensions = ((width, height),)
        self.level_downsamples = (1.0,)
        self.mpp = None
        self.mpp_source = "none"
        self.objective_power = None

    def read_level(self, level: int, location: Pair, size: Pair) -> np.ndarray:
        x, y = location
        width, height = size
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        src = self._rgb[max(y, 0) : y + height, max(x, 0) : x + width]
        out[max(-y, 0) : max(-y, 0) + src.shape[0], max(-x, 0) : max(-x, 0) + src.shape[1]] = src
        return out

    def close(self) -> None:
        pass


class Slide:
    """An open slide: its :class:`SlideInfo` and reads at any microns per pixel."""

    def __init__(self, info: SlideInfo, reader: _Reader):
        self.info = info
        self._reader = reader

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()

    @property
    def mpp(self) -> float:
        """Level-0 microns per pixel; raises :class:`SlideError` when unknown."""
        if self.info.mpp is None:
            detail = "" if self.info.mpp_source == "none" else f" ({self.info.mpp_source})"
            raise SlideError(
                self.info.path,
                f"no microns per pixel recorded in the slide{detail}; "
                "pass --mpp with the scanner's pixel size",
            )
        return self.info.mpp

    def best_level(self, downsample: float) -> int:
        """Coarsest level whose downsample does not exceed ``downsample``."""
        eligible = [i for i, d in enumerate(self.info.level_downsamples) if d <= downsample * 1.001]
        return eligible[-1] if eligible else 0

    def read_region(
        self, location: tuple[int, int], size: tuple[int, int], mpp: float | None = None
    ) -> np.ndarray:
        """Read an RGB region at a physical resolution.

        Parameters
        ----------
        location : (int, int)
            Top-left ``(x, y)`` in level-0 pixels.
        size : (int, int)
            ``(width, height)`` of the output in pixels at ``mpp``.
        mpp : float, optional
            Requested microns per pixel; level 0 when omitted.

        Returns
        -------
        ndarray of uint8, shape (height, width, 3)
        """
        width, height = (int(v) for v in size)
        x, y = (int(round(v)) for v in location)
        downsample = 1.0 if mpp is None else mpp / self.mpp
        level = self.best_level(downsample)
        level_ds = self.info.level_downsamples[level]
        scale = downsample / level_ds
        level_size = (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))
        try:
            region = self._reader.read_level(level, (x, y), level_size)
        except SlideError:
            raise
        except Exception as error:  # the readers raise their own error types
            raise SlideError(
                self.info.path,
                f"cannot decode the region at ({x}, {y}) level {level}: {error}",
            ) from error
        if level_size != (width, height):
            region = resize_region(region, (width, height))
        return region

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` microns per pixel."""
        width, height = self.info.dimensions
        factor = self.mpp / mpp
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        return self.read_region((0, 0), size, mpp)


def _box_sources(n_in: int, n_out: int) -> NDArray[np.float32] | None:
    """Where in the input each output pixel of a box-filtered shrink samples, or None.

    Pillow's box filter averages the input pixels whose centres fall in an output pixel's
    footprint, of width ``n_in / n_out``. Below a factor of 2 that is one pixel or two
    neighbours, i.e. a bilinear sample at their mean position. The footprints are computed with
    Pillow's own double-precision steps so that pixels on a footprint's edge fall on the same
    side as in Pillow.
    """
    scale = n_in / n_out
    if not 1.0 <= scale < 2.0:
        return None
    support, inverse = 0.5 * scale, 1.0 / scale
    centre = (np.arange(n_out) + 0.5) * scale
    first = np.maximum(np.trunc(centre - support + 0.5), 0.0)
    stop = np.minimum(np.trunc(centre + support + 0.5), n_in)
    candidates = first[:, None] + np.arange(3)
    weight = (candidates - centre[:, None] + 0.5) * inverse
    inside = (candidates < stop[:, None]) & (weight > -0.5) & (weight <= 0.5)
    count = inside.sum(axis=1)
    if count.min() < 1:
        return None
    return ((candidates * inside).sum(axis=1) / count).astype(np.float32)


@lru_cache(maxsize=8)
def _box_maps(in_size: Pair, out_size: Pair) -> tuple[np.ndarray, np.ndarray] | None:
    """Fixed-point :func:`cv2.remap` maps of a box shrink from ``in_size`` to ``out_size``."""
    xs = _box_sources(in_size[0], out_size[0])
    ys = _box_sources(in_size[1], out_size[1])
    if xs is None or ys is None:
        return None
    shape = (out_size[1], out_size[0])
    map_x = np.ascontiguousarray(np.broadcast_to(xs[None, :], shape))
    map_y = np.ascontiguousarray(np.broadcast_to(ys[:, None], shape))
    return cv2.convertMaps(map_x, map_y, cv2.CV_16SC2)


def resize_region(region: NDArray[np.uint8], size: Pair) -> NDArray[np.uint8]:
    """An RGB region resized to ``size`` ``(width, height)``: box filter down, bilinear up.

    Shrinks by less than 2x, which tiles read between pyramid levels nearly always are, run as
    one cached :func:`cv2.remap` that samples where Pillow's box filter averages: the same
    pixels within one grey level, about seven times faster.
    """
    height, width = region.shape[:2]
    maps = _box_maps((width, height), tuple(size))
    if maps is not None:
        return cv2.remap(np.ascontiguousarray(region), *maps, cv2.INTER_LINEAR)
    resample = Image.BOX if width > size[0] or height > size[1] else Image.BILINEAR
    return np.asarray(Image.fromarray(region).resize(tuple(size), resample))


def _dicom_file(folder: Path) -> Path | None:
    files = sorted(folder.glob("*.dcm"))
    return files[0] if files else None


def _open_reader(path: Path) -> _Reader:
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


def _check_decodes(slide: Slide) -> None:
    """Decode one tile of the smallest and of the largest level, so corrupt files fail early."""
    width, height = slide.info.dimensions
    probe = (min(width, 64), min(height, 64))
    centre = ((width - probe[0]) // 2, (height - probe[1]) // 2)
    for level in {len(slide.info.level_dimensions) - 1, 0}:
        try:
            slide._reader.read_level(level, centre, probe)
        except Exception as error:
            raise SlideError(slide.info.path, f"tiles cannot be decoded: {error}") from error


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a slide file, a DICOM folder or a plain image.

    Parameters
    ----------
    path : str or Path
        Slide file (SVS, TIFF, NDPI, MRXS, DICOM, JPEG/PNG, ...) or a folder of DICOM files.
    mpp : float, optional
        Level-0 microns per pixel given by the user; overrides what the file says.

    Raises
    ------
    SlideError
        When the path is missing, empty, not a slide, or its tiles cannot be decoded.
    """
    path = Path(path)
    target = path
    if not path.exists():
        raise SlideError(path, "no such file or directory")
    if path.is_dir():
        target = _dicom_file(path)
        if target is None:
            raise SlideError(path, "is a directory, not a slide (no DICOM files inside)")
    elif path.stat().st_size == 0:
        raise SlideError(path, "empty file (0 bytes)")
    if mpp is not None and _plausible_mpp(mpp, "user")[0] is None:
        low, high = PLAUSIBLE_MPP
        raise SlideError(path, f"--mpp must be between {low} and {high} µm per pixel, got {mpp}")

    try:
        reader = _open_reader(target)
    except SlideError as error:
        raise SlideError(path, error.problem) from error
    info = SlideInfo(
        path=path,
        vendor=reader.vendor,
        backend={
            _OpenSlideReader: "openslide",
            _TiaToolboxReader: "tiatoolbox",
            _ImageReader: "pillow",
        }[type(reader)],
        dimensions=reader.level_dimensions[0],
        level_dimensions=reader.level_dimensions,
        level_downsamples=reader.level_downsamples,
        mpp=float(mpp) if mpp is not None else reader.mpp,
        mpp_source="user" if mpp is not None else reader.mpp_source,
        objective_power=reader.objective_power,
    )
    slide = Slide(info, reader)
    _check_decodes(slide)
    return slide


def find_slides(path: str | Path) -> list[Path]:
    """Slides under ``path``: the file itself, or every slide file and DICOM folder below a folder.

    Raises
    ------
    SlideError
        When ``path`` does not exist or a folder holds no slides.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(path, "no such file or directory")
    if path.is_file():
        return [path]
    if _dicom_file(path) is not None:
        return [path]
    found: set[Path] = set()
    for candidate in sorted(path.rglob("[!.]*")):
        if candidate.is_file() and candidate.suffix.lower() == ".dcm":
            found.add(candidate.parent)
        elif candidate.is_file() and candidate.suffix.lower() in SLIDE_SUFFIXES:
            found.add(candidate)
    if not found:
        suffixes = ", ".join(SLIDE_SUFFIXES)
        raise SlideError(path, f"no slide files found in this directory (looked for {suffixes})")
    return sorted(found)


def slide_stem(path: str | Path) -> str:
    """Name of a slide without its suffix (``x.ome.tiff`` -> ``x``); names its outputs."""
    path = Path(path)
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.is_file() or path.suffix.lower() in SLIDE_SUFFIXES else name


def slide_checksum(path: str | Path) -> str:
    """SHA-256 of a slide file; for a slide folder (DICOM, MRXS data), of its files' digests."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = "".join(f"{f.relative_to(path)}\0{file_sha256(f)}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
