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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import cast

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from wsi_pipeline.core.errors import SlideError
from wsi_pipeline.core.files import file_sha256
from wsi_pipeline.image.readers import (
    IMAGE_SUFFIXES,
    PLAUSIBLE_MPP,
    Pair,
    Reader,
    open_reader,
    plausible_mpp,
)

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
    ".qptiff", *IMAGE_SUFFIXES,
)  # fmt: skip

#: Most pixels one read may decode or return (100 MB of RGB): a header can claim any size, so
#: nothing is ever read whole on its word. The pipeline's tiles are about 4 million pixels.
MAX_READ_PIXELS = 2**25
#: Most pixels of a thumbnail: a 25 x 75 mm glass slide at 4 µm per pixel is 117 million.
MAX_THUMBNAIL_PIXELS = 2**28
#: Side, in thumbnail pixels, below which a piece that cannot be decoded is not split further.
UNREADABLE_PIECE_PX = 8


class UnreadableRegion(SlideError):
    """Pixels of an open slide that cannot be decoded (a corrupt tile); names where they are."""


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


class Slide:
    """An open slide: its :class:`SlideInfo` and reads at any microns per pixel."""

    def __init__(self, info: SlideInfo, reader: Reader):
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

        Raises
        ------
        SlideError
            When the read would take more than :data:`MAX_READ_PIXELS` pixels.
        UnreadableRegion
            When the slide's pixels there cannot be decoded.
        """
        width, height = (int(v) for v in size)
        x, y = (int(round(v)) for v in location)
        level, level_size = self._level_read(size, mpp)
        if max(level_size[0] * level_size[1], width * height) > MAX_READ_PIXELS:
            raise SlideError(
                self.info.path,
                f"a read of {level_size[0]} x {level_size[1]} pixels at level {level} for "
                f"{width} x {height} output pixels is more than one read may take "
                f"({MAX_READ_PIXELS} pixels)",
            )
        try:
            region = self._reader.read_level(level, (x, y), level_size)
        except SlideError:
            raise
        except Exception as error:  # the readers raise their own error types
            raise UnreadableRegion(
                self.info.path,
                f"cannot decode the region at ({x}, {y}) level {level}: {error}",
            ) from error
        if level_size != (width, height):
            region = resize_region(region, (width, height))
        return region

    def _level_read(self, size: tuple[int, int], mpp: float | None) -> tuple[int, Pair]:
        """The level :meth:`read_region` reads ``size`` output pixels from, and its size there."""
        downsample = 1.0 if mpp is None else mpp / self.mpp
        level = self.best_level(downsample)
        scale = downsample / self.info.level_downsamples[level]
        width, height = (int(v) for v in size)
        return level, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` microns per pixel, read in pieces of bounded size.

        Parts that cannot be decoded (corrupt tiles) are inpainted from their surroundings, so
        the tiles over them are planned as their neighbours are; detection then reads them
        again and records them as unreadable.

        Raises
        ------
        SlideError
            When the thumbnail would have more than :data:`MAX_THUMBNAIL_PIXELS` pixels.
        """
        width, height = self.info.dimensions
        factor = self.mpp / mpp
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        if size[0] * size[1] > MAX_THUMBNAIL_PIXELS:
            raise SlideError(
                self.info.path,
                f"{width} x {height} pixels of {self.mpp} µm make a {size[0]} x {size[1]} "
                f"overview at {mpp} µm per pixel, more than {MAX_THUMBNAIL_PIXELS} pixels",
            )
        level_size = self._level_read(size, mpp)[1]
        if max(level_size[0] * level_size[1], size[0] * size[1]) <= MAX_READ_PIXELS:
            try:
                return self.read_region((0, 0), size, mpp)
            except UnreadableRegion:
                pass  # read it piece by piece, to find the parts that cannot be decoded
        # Square pieces whose reads stay under MAX_READ_PIXELS (level sizes are rounded up).
        read_per_pixel = max(level_size[0] / size[0], 1.0)
        piece = max(1, int((math.isqrt(MAX_READ_PIXELS) - 1) / read_per_pixel))
        thumbnail = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
        unreadable = np.zeros((size[1], size[0]), dtype=np.uint8)
        for top in range(0, size[1], piece):
            for left in range(0, size[0], piece):
                rows = slice(top, min(top + piece, size[1]))
                cols = slice(left, min(left + piece, size[0]))
                self._read_piece(thumbnail[rows, cols], unreadable[rows, cols], (left, top), mpp)
        if unreadable.any():
            return cv2.inpaint(thumbnail, unreadable, 3, cv2.INPAINT_TELEA)
        return thumbnail

    def _read_piece(
        self, out: NDArray[np.uint8], unreadable: NDArray[np.uint8], origin: Pair, mpp: float
    ) -> None:
        """Read ``out`` (whose top-left is ``origin`` in pixels at ``mpp``) in place; where it
        cannot be decoded, split it in four and retry, down to :data:`UNREADABLE_PIECE_PX`,
        and mark what stays unreadable."""
        height, width = out.shape[:2]
        location = (round(origin[0] * mpp / self.mpp), round(origin[1] * mpp / self.mpp))
        try:
            out[:] = self.read_region(location, (width, height), mpp)
            return
        except UnreadableRegion:
            if max(width, height) <= UNREADABLE_PIECE_PX:
                unreadable[:] = 1
                return
        half_w, half_h = -(-width // 2), -(-height // 2)
        for top in range(0, height, half_h):
            for left in range(0, width, half_w):
                rows, cols = slice(top, top + half_h), slice(left, left + half_w)
                corner = (origin[0] + left, origin[1] + top)
                self._read_piece(out[rows, cols], unreadable[rows, cols], corner, mpp)


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
        # cv2's stubs do not track dtypes: remap of uint8 is uint8.
        return cast(
            NDArray[np.uint8], cv2.remap(np.ascontiguousarray(region), *maps, cv2.INTER_LINEAR)
        )
    box = width > size[0] or height > size[1]
    resample = Image.Resampling.BOX if box else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(region).resize(cast(Pair, tuple(size)), resample))


def _slide_files(folder: Path) -> list[Path]:
    """The slide files directly in ``folder`` (hidden ones left out), sorted."""
    return sorted(
        p for p in folder.glob("[!.]*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
    )


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() == ".dcm"


def _dicom_series(folder: Path) -> Path | None:
    """The first file of a DICOM slide's folder (every slide file in it is DICOM), else None."""
    files = _slide_files(folder)
    return files[0] if files and all(_is_dicom(f) for f in files) else None


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
        dicom = _dicom_series(path)
        if dicom is None:
            raise SlideError(path, "is a directory, not a slide (not a folder of DICOM files)")
        target = dicom
    elif path.stat().st_size == 0:
        raise SlideError(path, "empty file (0 bytes)")
    if mpp is not None and plausible_mpp(mpp, "user")[0] is None:
        low, high = PLAUSIBLE_MPP
        raise SlideError(path, f"--mpp must be between {low} and {high} µm per pixel, got {mpp}")

    try:
        reader = open_reader(target)
    except SlideError as error:
        raise SlideError(path, error.problem) from error
    info = SlideInfo(
        path=path,
        vendor=reader.vendor,
        backend=reader.backend,
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
    """Slides under ``path``: the file itself, or every slide below a folder.

    A folder whose slide files are all DICOM is one slide (the files of one DICOM series). In
    a folder that holds other slide files too, each of those is a slide and its DICOM files
    together are one more, named by the first of them.

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
    found: list[Path] = []
    for folder in sorted({path, *(p for p in path.rglob("[!.]*") if p.is_dir())}):
        files = _slide_files(folder)
        dicom = [f for f in files if _is_dicom(f)]
        if files and len(dicom) == len(files):
            found.append(folder)
        else:
            found += [f for f in files if not _is_dicom(f)] + dicom[:1]
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
