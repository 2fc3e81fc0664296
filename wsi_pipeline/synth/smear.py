"""Synthetic May-Grünwald-Giemsa bone-marrow aspirate smears written as pyramidal Aperio SVS.

The slide is a wedge smear along x: glass margins, a thick zone on the left, a monolayer zone
in the middle and a sparse, feathered zone on the right. Red cells, platelets and debris are
scattered by density; white cells of thirteen MLL classes sit on a jittered grid (touching pairs
share a grid cell). Every object is drawn from its own random generator, seeded by the slide seed
and the object's identity, into its own small patch of optical density (Beer-Lambert), and patches
are added into whatever region is being rendered. A region therefore renders the same whichever
band or tile asks for it, and the writer streams the slide one tile-high band at a time.

The ground truth (white cells only) is written beside the slide as ``OUT.cells.csv`` with the
columns ``id,x,y,class,diameter_um`` in level-0 pixels.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
import tifffile
from numpy.typing import NDArray
from scipy.ndimage import gaussian_filter
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.core.files import atomic_path

__all__ = [
    "CLASS_MIX",
    "MORPHOLOGY",
    "TrueCells",
    "Region",
    "SlideLayout",
    "SynthError",
    "cells_csv_path",
    "clear_of_ground_truth",
    "layout_slide",
    "match_ground_truth",
    "render_region",
    "write_synthetic_slide",
]

FloatArray = NDArray[np.float32]

#: Relative frequency of each white-cell class: marrow-like, yet every class well represented.
CLASS_MIX: dict[str, float] = {
    "NGS": 0.14,
    "NGB": 0.10,
    "MMZ": 0.08,
    "MYB": 0.08,
    "PMO": 0.06,
    "BLA": 0.07,
    "EBO": 0.14,
    "PEB": 0.04,
    "LYT": 0.10,
    "MON": 0.05,
    "EOS": 0.05,
    "BAS": 0.03,
    "PLM": 0.06,
}

GLASS_RGB = np.array([243.0, 241.0, 246.0], dtype=np.float32)
WBC_GRID_UM = 50.0  # one grid cell holds at most one white cell or one touching pair
PAIR_FRACTION = 0.15
SCATTER_ROW_UM = 32.0  # height of the rows in which small objects are scattered
RBC_SPACING_UM = 7.9  # hexagonal lattice pitch: monolayer red cells just touch
_MAX_SEED = 2**63 - 1

# Stream ids keep the random generators of different object kinds independent.
_GEOMETRY, _WBC_LAYOUT, _WBC, _RBC_ROW, _TEMPLATE, _PLATELET, _DEBRIS, _STAIN = range(8)


class SynthError(InputError):
    """Bad arguments or an unwritable destination; ``str()`` is one line naming the file."""


def _od(rgb: tuple[float, ...]) -> FloatArray:
    """Optical density per channel of a stain that makes glass look ``rgb`` (Beer-Lambert)."""
    return -np.log(np.asarray(rgb, dtype=np.float32) / GLASS_RGB)


def _layer(amount: NDArray, od: NDArray) -> FloatArray:
    """Planar (3, h, w) optical density of a stain layer of the given amount (h, w)."""
    return (np.asarray(od, dtype=np.float32)[:, None, None] * amount[None]).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Morphology of the white-cell classes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellStyle:
    """How one white-cell class looks under May-Grünwald-Giemsa staining.

    Sizes are in µm; colours are the RGB a layer of the stain gives on glass; chromatin
    ``(amplitude, grain_um)`` modulates nuclear density (coarse and strong = condensed).
    """

    diameter_um: tuple[float, float]
    nucleus: str  # key of _NUCLEUS_SHAPES
    nucleus_rgb: tuple[float, float, float]
    cytoplasm_rgb: tuple[float, float, float]
    chromatin: tuple[float, float]
    granule_rgb: tuple[float, float, float] | None = None
    granules_per_um2: float = 0.0
    granule_um: float = 0.3
    granules_over_nucleus: float = 0.3  # fraction of granule density that lies over the nucleus
    nucleoli: tuple[int, int] = (0, 0)
    hof: float = 0.0  # strength of the pale perinuclear zone (Golgi, plasma-cell hof)
    vacuoles: tuple[int, int] = (0, 0)
    elongation: float = 1.0  # cell aspect ratio (plasma cells are oval)
    alt_cytoplasm_rgb: tuple[float, float, float] | None = None  # EBO: poly- to orthochromatic


#: Appearance of every synthesised class (MLL codes); sizes follow haematology atlases.
MORPHOLOGY: dict[str, CellStyle] = {
    "BLA": CellStyle(
        (12, 18), "blast", (150, 105, 175), (120, 160, 215), (0.18, 0.25), nucleoli=(1, 3)
    ),
    "PMO": CellStyle(
        (15, 25),
        "eccentric_oval",
        (140, 95, 165),
        (165, 175, 220),
        (0.25, 0.35),
        granule_rgb=(150, 45, 110),
        granules_per_um2=0.22,
        granule_um=0.4,
        nucleoli=(0, 2),
        hof=0.55,
    ),
    "MYB": CellStyle(
        (12, 18),
        "eccentric_round",
        (115, 70, 145),
        (215, 185, 210),
        (0.45, 0.5),
        granule_rgb=(175, 110, 160),
        granules_per_um2=1.2,
        granule_um=0.22,
        hof=0.25,
    ),
    "MMZ": CellStyle(
        (10, 15),
        "kidney",
        (105, 60, 140),
        (225, 195, 215),
        (0.55, 0.55),
        granule_rgb=(190, 140, 175),
        granules_per_um2=1.2,
        granule_um=0.2,
    ),
    "NGB": CellStyle(
        (10, 14),
        "band",
        (95, 50, 130),
        (230, 205, 220),
        (0.55, 0.55),
        granule_rgb=(195, 150, 180),
        granules_per_um2=1.0,
        granule_um=0.2,
    ),
    "NGS": CellStyle(
        (10, 14),
        "segmented",
        (90, 45, 125),
        (232, 208, 222),
        (0.55, 0.5),
        granule_rgb=(195, 150, 180),
        granules_per_um2=1.0,
        granule_um=0.2,
    ),
    "EOS": CellStyle(
        (12, 17),
        "bilobed",
        (110, 70, 150),
        (230, 200, 190),
        (0.45, 0.5),
        granule_rgb=(225, 105, 60),
        granules_per_um2=2.2,
        granule_um=0.45,
        granules_over_nucleus=0.15,
    ),
    "BAS": CellStyle(
        (10, 14),
        "lobulated",
        (125, 85, 160),
        (210, 190, 220),
        (0.3, 0.5),
        granule_rgb=(45, 20, 70),
        granules_per_um2=0.9,
        granule_um=0.5,
        granules_over_nucleus=1.0,
    ),
    "MON": CellStyle(
        (14, 20),
        "folded",
        (140, 100, 170),
        (180, 185, 210),
        (0.35, 0.45),
        granule_rgb=(175, 120, 170),
        granules_per_um2=0.4,
        granule_um=0.15,
        vacuoles=(2, 8),
    ),
    "LYT": CellStyle((7, 10), "lymphocyte", (70, 35, 105), (150, 195, 235), (0.45, 0.45)),
    "PLM": CellStyle(
        (8, 15),
        "plasma",
        (85, 45, 120),
        (70, 100, 180),
        (0.7, 0.45),
        hof=0.7,
        elongation=1.3,
    ),
    "PEB": CellStyle(
        (14, 19),
        "proerythroblast",
        (120, 75, 155),
        (55, 80, 165),
        (0.2, 0.3),
        nucleoli=(1, 2),
    ),
    "EBO": CellStyle(
        (8, 12),
        "erythroblast",
        (60, 30, 85),
        (160, 165, 200),
        (0.5, 0.5),
        alt_cytoplasm_rgb=(225, 175, 185),
    ),
}


# ----------------------------------------------------------------------------------------------
# Layout: smear geometry and the white-cell table (pure, no rendering)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrueCells:
    """Ground truth of the white cells, one entry per cell (columns, level-0 pixels)."""

    id: NDArray[np.int64]
    x: NDArray[np.int64]
    y: NDArray[np.int64]
    cls: NDArray[np.str_]
    diameter_um: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.id)

    def to_csv(self) -> str:
        """Return the table as CSV text with the columns ``id,x,y,class,diameter_um``."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["id", "x", "y", "class", "diameter_um"])
        for row in zip(self.id, self.x, self.y, self.cls, self.diameter_um, strict=True):
            writer.writerow([int(row[0]), int(row[1]), int(row[2]), str(row[3]), f"{row[4]:.1f}"])
        return out.getvalue()


@dataclass(frozen=True)
class SmearGeometry:
    """Where the smear lies on the glass and how thick it is, as smooth functions of position."""

    width: int
    height: int
    mpp: float
    phases: NDArray[np.float64]  # random phases of the wavy edges and density ripples

    def _waves(self, t: NDArray, k: int, amplitude: float) -> NDArray:
        """Sum of three sines of ``t`` (0..1) with this slide's phases, peak about ``amplitude``."""
        p = self.phases[3 * k : 3 * k + 3]
        return amplitude * (
            0.5 * np.sin(2 * np.pi * 1.3 * t + p[0])
            + 0.3 * np.sin(2 * np.pi * 3.7 * t + p[1])
            + 0.2 * np.sin(2 * np.pi * 9.1 * t + p[2])
        )

    def coverage(self, x: NDArray, y: NDArray) -> NDArray:
        """Fraction (0..1) of smear at level-0 positions ``x``, ``y`` (broadcast), soft edges."""
        w, h = self.width, self.height
        edge = 20.0 / self.mpp
        left = 0.04 * w + self._waves(y / h, 0, 0.01 * w)
        right = 0.94 * w + self._waves(y / h, 1, 0.035 * w)  # feathered end: deep tongues
        top = 0.07 * h + self._waves(x / w, 2, 0.02 * h)
        bottom = 0.93 * h + self._waves(x / w, 3, 0.02 * h)
        left, right, top, bottom = (
            np.asarray(e, dtype=x.dtype) for e in (left, right, top, bottom)
        )
        inside = np.minimum(np.minimum(x - left, right - x), np.minimum(y - top, bottom - y))
        return np.clip(inside / np.float32(edge), 0.0, 1.0)

    def rbc_density(self, x: NDArray, y: NDArray) -> NDArray:
        """Red-cell layers per monolayer area: above 1 in the thick zone, well below in the tail."""
        t = x / self.width
        zone = np.interp(t, [0.0, 0.2, 0.32, 0.72, 0.84, 1.0], [2.6, 2.3, 0.9, 0.8, 0.3, 0.12])
        ripple = 1.0 + 0.15 * np.sin(2 * np.pi * 3.0 * t + self.phases[12]) * np.sin(
            2 * np.pi * 2.0 * y / self.height + self.phases[13]
        )
        return self.coverage(x, y) * zone * ripple

    def wbc_probability(self, x: NDArray, y: NDArray) -> NDArray:
        """Chance that a white-cell grid cell centred at ``x``, ``y`` holds a cell."""
        return np.where(
            self.coverage(x, y) > 0.99, np.clip(0.2 + 0.2 * self.rbc_density(x, y), 0, 0.75), 0.0
        )


@dataclass(frozen=True)
class SlideLayout:
    """Everything about a synthetic slide that is decided before rendering."""

    size: tuple[int, int]
    seed: int
    mpp: float
    geometry: SmearGeometry
    cells: TrueCells
    stain: NDArray[np.float64]  # per-slide multipliers of red-cell, nuclear and cytoplasm density

    @cached_property
    def cell_index(self) -> cKDTree:
        """KD-tree of the white-cell centres, to keep red cells and platelets off them."""
        return cKDTree(np.column_stack([self.cells.x, self.cells.y]).reshape(-1, 2))

    @cached_property
    def cell_radius_px(self) -> NDArray[np.float64]:
        """White-cell radii in level-0 pixels."""
        return self.cells.diameter_um / 2.0 / self.mpp


def _check_args(size: tuple[int, int], seed: int, mpp: float) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be two integers (width, height), got {size!r}") from None
    if width < 256 or height < 256:
        raise ValueError(f"size must be at least 256 x 256 pixels, got {width} x {height}")
    if not 0 <= int(seed) <= _MAX_SEED:
        raise ValueError(f"seed must be a non-negative 63-bit integer, got {seed!r}")
    if not 0.05 <= float(mpp) <= 2.0:
        raise ValueError(f"mpp must lie between 0.05 and 2 microns per pixel, got {mpp!r}")
    return width, height


def layout_slide(size: tuple[int, int], seed: int = 0, mpp: float = 0.25) -> SlideLayout:
    """Lay out a synthetic smear without rendering it.

    Parameters
    ----------
    size
        Level-0 ``(width, height)`` in pixels.
    seed
        Non-negative seed; the same seed always gives the same slide.
    mpp
        Microns per pixel at level 0.

    Returns
    -------
    SlideLayout
        Smear geometry, stain variation and the white-cell ground truth.

    Raises
    ------
    ValueError
        A size below 256 x 256, a negative seed or an implausible ``mpp``.
    """
    width, height = _check_args(size, seed, mpp)
    geometry = SmearGeometry(
        width,
        height,
        float(mpp),
        np.random.default_rng([seed, _GEOMETRY]).uniform(0, 2 * np.pi, 14),
    )
    stain = np.random.default_rng([seed, _STAIN]).normal(1.0, 0.07, 3).clip(0.8, 1.2)
    cells = _place_white_cells(geometry, seed)
    return SlideLayout((width, height), int(seed), float(mpp), geometry, cells, stain)


def _place_white_cells(geometry: SmearGeometry, seed: int) -> TrueCells:
    """White cells on a jittered grid: each grid cell holds nothing, one cell or a touching pair.

    A cell (or pair) lies wholly inside its grid cell, so white cells never overlap by accident.
    """
    mpp = geometry.mpp
    grid = WBC_GRID_UM / mpp
    cols, rows = math.ceil(geometry.width / grid), math.ceil(geometry.height / grid)
    gx, gy = np.meshgrid(np.arange(cols) * grid, np.arange(rows) * grid)
    gx, gy = gx.ravel(), gy.ravel()
    n = gx.size
    rng = np.random.default_rng([seed, _WBC_LAYOUT])
    codes = np.array(list(CLASS_MIX))
    mix = np.array(list(CLASS_MIX.values()))
    present = rng.random(n) < geometry.wbc_probability(gx + grid / 2, gy + grid / 2)
    paired = rng.random(n) < PAIR_FRACTION
    cls = rng.choice(codes, size=(n, 2), p=mix / mix.sum())
    lo = np.vectorize(lambda c: MORPHOLOGY[c].diameter_um[0])(cls)
    hi = np.vectorize(lambda c: MORPHOLOGY[c].diameter_um[1])(cls)
    diameter = np.round(lo + (hi - lo) * rng.random((n, 2)), 1)
    radius = diameter / 2.0 / mpp
    angle = rng.uniform(0, 2 * np.pi, n)
    place = rng.random((n, 2))
    # Offsets of the two members from the pair's midpoint; a single cell sits at the midpoint.
    gap = 0.92 * (radius[:, 0] + radius[:, 1])
    direction = np.column_stack([np.cos(angle), np.sin(angle)])
    offsets = np.stack([-0.5 * gap[:, None] * direction, 0.5 * gap[:, None] * direction], axis=1)
    paired &= np.all(_margins(radius, offsets, grid) >= 0, axis=1)  # the pair fits its grid cell
    offsets[~paired] = 0.0
    members = np.where(paired[:, None], radius, radius[:, :1])  # a lone cell is member 0
    room = _margins(members, offsets, grid)
    low = np.max(members[:, :, None] - offsets, axis=1)
    mid = np.column_stack([gx, gy]) + low + place * room
    centres = np.rint(mid[:, None, :] + offsets).astype(np.int64)
    member = np.column_stack([present, present & paired])
    inside = (
        (centres[..., 0] - radius >= 0)
        & (centres[..., 0] + radius < geometry.width)
        & (centres[..., 1] - radius >= 0)
        & (centres[..., 1] + radius < geometry.height)
    )
    keep = member & inside
    ids = np.arange(1, int(keep.sum()) + 1, dtype=np.int64)
    return TrueCells(ids, centres[keep][:, 0], centres[keep][:, 1], cls[keep], diameter[keep])


def _margins(radius: NDArray, offsets: NDArray, grid: float) -> NDArray:
    """Free play (x, y) of a group's midpoint in a grid cell, given member radii and offsets."""
    low = np.max(radius[:, :, None] - offsets, axis=1)
    high = np.max(radius[:, :, None] + offsets, axis=1)
    return grid - low - high


def cells_csv_path(slide_path: str | os.PathLike[str]) -> Path:
    """Ground-truth path beside a slide: ``OUT.svs`` -> ``OUT.cells.csv``."""
    path = Path(slide_path)
    return path.with_name(path.stem + ".cells.csv")


def match_ground_truth(
    truth_xy: NDArray[np.floating],
    diameter_um: NDArray[np.floating],
    found_xy: NDArray[np.floating],
    mpp: float,
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Pair detected cells with ground-truth cells, one to one, within half a diameter.

    Parameters
    ----------
    truth_xy : (N, 2) float
        Ground-truth centres (level-0 pixels), e.g. the ``x`` and ``y`` of ``OUT.cells.csv``.
    diameter_um : (N,) float
        Their diameters.
    found_xy : (M, 2) float
        Detected centres (level-0 pixels).
    mpp : float
        Level-0 microns per pixel.

    Returns
    -------
    truth_index, found_index : (K,) int
        Matched pairs, chosen to minimise the total distance (Hungarian assignment).
    """
    distance = _distance_um(truth_xy, found_xy, mpp)
    if not distance.size:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    within = distance <= np.asarray(diameter_um, dtype=float)[:, None] / 2
    rows, cols = linear_sum_assignment(np.where(within, distance, 1e9))
    keep = within[rows, cols]
    return rows[keep], cols[keep]


def clear_of_ground_truth(
    truth_xy: NDArray[np.floating],
    diameter_um: NDArray[np.floating],
    found_xy: NDArray[np.floating],
    mpp: float,
) -> NDArray[np.bool_]:
    """Which detected cells lie farther than a whole diameter from every ground-truth cell
    (platelet clumps, debris); arguments as for :func:`match_ground_truth`."""
    distance = _distance_um(truth_xy, found_xy, mpp)
    return np.all(distance > np.asarray(diameter_um, dtype=float)[:, None], axis=0)


def _distance_um(
    truth_xy: NDArray[np.floating], found_xy: NDArray[np.floating], mpp: float
) -> NDArray[np.float64]:
    """(N, M) distances in µm between N ground-truth and M detected centres (level-0 px)."""
    truth_xy = np.asarray(truth_xy, dtype=float).reshape(-1, 2)
    found_xy = np.asarray(found_xy, dtype=float).reshape(-1, 2)
    return np.hypot(*(truth_xy[:, None, :] - found_xy[None, :, :]).transpose(2, 0, 1)) * mpp


# ----------------------------------------------------------------------------------------------
# Drawing primitives (signed distances in µm, coverage with a one-pixel soft edge)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """Optical density of one object; ``cover`` (0..1) marks white-cell pixels for labels."""

    od: FloatArray  # (h, w, 3)
    x0: int
    y0: int
    cover: FloatArray | None = None


def _grid_um(half: int, mpp: float, angle: float) -> tuple[FloatArray, FloatArray]:
    """Rotated patch coordinates ``(u, v)`` in µm of a (2 half + 1)² patch centred on a pixel."""
    axis = np.arange(-half, half + 1, dtype=np.float32) * mpp
    c, s = math.cos(angle), math.sin(angle)
    return axis[None, :] * c + axis[:, None] * s, -axis[None, :] * s + axis[:, None] * c


def _cover(distance: FloatArray, mpp: float) -> FloatArray:
    """Anti-aliased coverage of the shape whose signed distance (µm, negative inside) is given."""
    return np.clip(0.5 - distance / mpp, 0.0, 1.0)


def _ellipse(u: FloatArray, v: FloatArray, cx: float, cy: float, a: float, b: float) -> FloatArray:
    return (np.hypot((u - cx) / a, (v - cy) / b) - 1.0) * min(a, b)


def _wobbly_disc(
    u: FloatArray, v: FloatArray, radius: float, wobble: float, rng: np.random.Generator
) -> FloatArray:
    """A disc whose radius varies smoothly with angle (cell membranes, irregular nuclei)."""
    theta = np.arctan2(v, u)
    harmonics = sum(
        rng.normal(0, wobble / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        for k in range(2, 6)
    )
    # float32: numpy's stubs promote Python-float scalars times float32 arrays to float64.
    return cast(FloatArray, np.hypot(u, v) - radius * (1.0 + harmonics))


def _polyline(u: FloatArray, v: FloatArray, points: NDArray, half_width: float) -> FloatArray:
    """Signed distance to a tube of ``half_width`` around a polyline of ``points`` (k, 2)."""
    a, b = points[:-1], points[1:]
    ab = b - a
    pu, pv = u[..., None] - a[:, 0], v[..., None] - a[:, 1]
    t = np.clip((pu * ab[:, 0] + pv * ab[:, 1]) / np.maximum((ab**2).sum(1), 1e-9), 0, 1)
    dist = np.hypot(pu - t * ab[:, 0], pv - t * ab[:, 1]).min(axis=-1)
    return dist - half_width


def _arc(radius: float, start: float, span: float, n: int = 12) -> NDArray:
    angles = start + np.linspace(0.0, span, n)
    return np.column_stack([radius * np.cos(angles), radius * np.sin(angles)])


def _nuclear_path(r: float, rng: np.random.Generator, open_ends: bool = False) -> NDArray:
    """Centre line of a band or segmented nucleus: a C, U or S curve inside the cell.

    With ``open_ends`` the curve is a C of at most 1.35 pi, whose ends stay apart: the ends of
    the S and of wider Cs come close enough for lobes placed there to touch.
    """
    s_shape = rng.random() < 0.3  # drawn either way: later draws, and so the slides, stay put
    if s_shape and not open_ends:  # two half-arcs bending opposite ways
        rho = 0.3 * r
        first = _arc(rho, np.pi, -np.pi * 0.9) + [0.0, -rho]
        second = _arc(rho, np.pi, np.pi * 0.9) + [0.0, rho]
        return np.vstack([first[::-1], second])
    span = rng.uniform(1.1, 1.6) * np.pi
    if open_ends:
        span = min(span, 1.35 * np.pi)
    return _arc(rng.uniform(0.42, 0.52) * r, -span / 2, span)


def _noise(shape: tuple[int, int], grain_px: float, rng: np.random.Generator) -> FloatArray:
    """Smooth random field with unit standard deviation and the given grain (pixels)."""
    field = gaussian_filter(rng.standard_normal(shape).astype(np.float32), max(grain_px, 0.5))
    return field / max(float(field.std()), 1e-6)


def _splat(where: FloatArray, count: int, radius_px: float, rng: np.random.Generator) -> FloatArray:
    """Density (peak about 1 per granule) of ``count`` round granules placed where ``where`` > 0."""
    weights = where.ravel().astype(np.float64)
    density = np.zeros(where.shape, dtype=np.float32)
    if count <= 0 or weights.sum() <= 0:
        return density
    idx = rng.choice(weights.size, size=count, p=weights / weights.sum())
    np.add.at(density.ravel(), idx, rng.uniform(0.7, 1.3, count).astype(np.float32))
    sigma = max(radius_px / 1.2, 0.5)
    return np.minimum(gaussian_filter(density, sigma) * (2 * np.pi * sigma**2), 1.6)


# ----------------------------------------------------------------------------------------------
# White cells
# ----------------------------------------------------------------------------------------------


def _nucleus_round(
    offset: tuple[float, float], size: tuple[float, float], wobble: float
) -> Callable[[FloatArray, FloatArray, float, np.random.Generator], FloatArray]:
    """Round or oval nucleus of ``size`` (semi-axes / cell radius) shifted by ``offset`` x r."""

    def shape(u: FloatArray, v: FloatArray, r: float, rng: np.random.Generator) -> FloatArray:
        cx = r * rng.uniform(*offset)
        a, b = r * rng.uniform(*size), r * rng.uniform(*size)
        return _wobbly_disc((u - cx) * (min(a, b) / a), v * (min(a, b) / b), min(a, b), wobble, rng)

    return shape


def _nucleus_kidney(u: FloatArray, v: FloatArray, r: float, rng: np.random.Generator) -> FloatArray:
    cx = r * rng.uniform(0.05, 0.2)
    body = _ellipse(u, v, cx, 0.0, 0.62 * r, 0.5 * r)
    notch = _ellipse(u, v, cx + 0.55 * r, 0.0, rng.uniform(0.22, 0.32) * r, 0.22 * r)
    return np.maximum(body, -notch)


def _nucleus_band(u: FloatArray, v: FloatArray, r: float, rng: np.random.Generator) -> FloatArray:
    return _polyline(u, v, _nuclear_path(r, rng), rng.uniform(0.15, 0.19) * r)


def _nucleus_segmented(
    u: FloatArray, v: FloatArray, r: float, rng: np.random.Generator
) -> FloatArray:
    path = _nuclear_path(r, rng, open_ends=True)
    strand = _polyline(u, v, path, 0.2)
    count = int(rng.integers(3, 5))
    centres, lobe_r = _apart_lobes(path, count, 0.24 * r * rng.uniform(0.9, 1.1, 4))
    dist = [
        _ellipse(u, v, cx, cy, lr, lr * 0.85) for (cx, cy), lr in zip(centres, lobe_r, strict=True)
    ]
    return np.minimum(strand, np.minimum.reduce(dist))


def _apart_lobes(
    path: NDArray, count: int, radii: NDArray[np.floating]
) -> tuple[NDArray, NDArray[np.floating]]:
    """Centres and radii of ``count`` lobes spread evenly along ``path``, or of three when
    ``count`` would bring two of them within 30 % of touching: touching lobes read as a lumpy
    band, not a segmented nucleus."""
    for n in range(count, 2, -1):
        centres = path[np.linspace(0, len(path) - 1, n).round().astype(int)]
        i, j = np.triu_indices(n, 1)
        if np.all(np.hypot(*(centres[i] - centres[j]).T) >= 1.3 * (radii[i] + radii[j])):
            break
    return centres, radii[:n]


def _nucleus_bilobed(
    u: FloatArray, v: FloatArray, r: float, rng: np.random.Generator
) -> FloatArray:
    sep = rng.uniform(0.32, 0.42) * r
    lobes = [_ellipse(u, v, s * sep, 0.0, 0.3 * r, 0.36 * r) for s in (-1, 1)]
    strand = _polyline(u, v, np.array([[-sep, 0.0], [sep, 0.0]]), 0.25)
    return np.minimum.reduce([*lobes, strand])


def _nucleus_lobulated(
    u: FloatArray, v: FloatArray, r: float, rng: np.random.Generator
) -> FloatArray:
    offsets = (0.25 * r * rng.uniform(-1, 1, 2) for _ in range(3))
    parts = [_ellipse(u, v, cx, cy, 0.35 * r, 0.3 * r) for cx, cy in offsets]
    return np.minimum.reduce(parts)


def _nucleus_folded(u: FloatArray, v: FloatArray, r: float, rng: np.random.Generator) -> FloatArray:
    body = _wobbly_disc(u / 1.15, v, 0.58 * r, 0.06, rng) * 1.0
    notch = _ellipse(u, v, 0.0, 0.62 * r, rng.uniform(0.25, 0.4) * r, 0.3 * r)
    return np.maximum(body, -notch)


_NUCLEUS_SHAPES: dict[
    str, Callable[[FloatArray, FloatArray, float, np.random.Generator], FloatArray]
] = {
    "blast": _nucleus_round((-0.08, 0.08), (0.72, 0.82), 0.03),
    "eccentric_oval": _nucleus_round((0.25, 0.35), (0.5, 0.62), 0.03),
    "eccentric_round": _nucleus_round((0.22, 0.32), (0.52, 0.6), 0.03),
    "kidney": _nucleus_kidney,
    "band": _nucleus_band,
    "segmented": _nucleus_segmented,
    "bilobed": _nucleus_bilobed,
    "lobulated": _nucleus_lobulated,
    "folded": _nucleus_folded,
    "lymphocyte": _nucleus_round((0.0, 0.12), (0.8, 0.88), 0.02),
    "plasma": _nucleus_round((0.38, 0.45), (0.42, 0.48), 0.02),
    "proerythroblast": _nucleus_round((-0.05, 0.05), (0.7, 0.78), 0.02),
    "erythroblast": _nucleus_round((-0.08, 0.08), (0.45, 0.55), 0.01),
}


def _chromatin(
    nucleus: FloatArray, style: CellStyle, mpp: float, rng: np.random.Generator
) -> FloatArray:
    """Nuclear density texture: fine and even for blasts, coarse clumps when condensed."""
    amplitude, grain_um = style.chromatin
    texture = 1.0 + amplitude * _noise(nucleus.shape, grain_um / mpp, rng)
    if style.nucleus == "plasma":  # clock-face: dark clumps around the nuclear rim
        inner = gaussian_filter(nucleus, 1.2 / mpp)
        texture *= 1.0 + 0.6 * np.clip(nucleus - inner, 0, 1) * (_noise(nucleus.shape, 2, rng) > 0)
    return np.clip(texture, 0.3, 2.2)


def _blobs(
    u: FloatArray,
    v: FloatArray,
    where: FloatArray,
    count: int,
    size_um: tuple[float, float],
    mpp: float,
    rng: np.random.Generator,
) -> FloatArray:
    """Coverage of ``count`` small round bodies (nucleoli, vacuoles) centred inside ``where``."""
    inside = np.flatnonzero(where.ravel() > 0.9)
    cover = np.zeros(u.shape, dtype=np.float32)
    if count == 0 or inside.size == 0:
        return cover
    for i in rng.choice(inside, size=count):
        radius = rng.uniform(*size_um) / 2
        cover = np.maximum(cover, _cover(np.hypot(u - u.flat[i], v - v.flat[i]) - radius, mpp))
    return cover


def _draw_white_cell(
    cls: str, diameter_um: float, mpp: float, stain: NDArray, rng: np.random.Generator
) -> tuple[FloatArray, FloatArray]:
    """Optical density (h, w, 3) and cell coverage (h, w) of one white cell centred in its patch."""
    style = MORPHOLOGY[cls]
    r = diameter_um / 2.0
    half = int(math.ceil(r * style.elongation * 1.12 / mpp)) + 2
    u, v = _grid_um(half, mpp, rng.uniform(0, 2 * np.pi))
    squash = math.sqrt(style.elongation)
    cell = _cover(_wobbly_disc(u / squash, v * squash, r, 0.025, rng), mpp)
    nucleus = _cover(_NUCLEUS_SHAPES[style.nucleus](u, v, r, rng), mpp) * cell
    cytoplasm = np.clip(cell - nucleus, 0, 1)
    jitter = rng.normal(1.0, 0.06, 3).astype(np.float32)

    cyto_rgb: tuple[float, ...] = style.cytoplasm_rgb
    if style.alt_cytoplasm_rgb is not None:  # maturing erythroblast: blue-grey to pink
        mix = rng.random()
        cyto_rgb = tuple(
            (1 - mix) * a + mix * b
            for a, b in zip(style.cytoplasm_rgb, style.alt_cytoplasm_rgb, strict=True)
        )
    cyto_amount = cytoplasm * (1.0 + 0.08 * _noise(u.shape, 1.0 / mpp, rng))
    if style.hof:  # pale zone against the nucleus, on the side of the cell centre
        near = gaussian_filter(nucleus, 1.2 / mpp) * (u < 0.15 * r)
        cyto_amount *= 1.0 - style.hof * np.clip(near * 2.0, 0, 1) * (1 - nucleus)
    if style.vacuoles[1]:
        vac = _blobs(u, v, cytoplasm, int(rng.integers(*style.vacuoles)), (0.6, 1.6), mpp, rng)
        cyto_amount *= 1.0 - 0.85 * vac

    nuclear_amount = nucleus * _chromatin(nucleus, style, mpp, rng)
    od = _layer(cyto_amount, _od(cyto_rgb) * jitter * stain[2])
    nuclear_od = _od(style.nucleus_rgb) * jitter * stain[1]
    if style.nucleoli[1]:
        count = int(rng.integers(style.nucleoli[0], style.nucleoli[1] + 1))
        nucleoli = _blobs(u, v, gaussian_filter(nucleus, 1.0 / mpp), count, (1.0, 2.0), mpp, rng)
        nuclear_amount *= 1.0 - 0.6 * nucleoli
        od += _layer(nucleus * nucleoli, _od((175, 185, 225)))
    od += _layer(nuclear_amount, nuclear_od)
    if style.granule_rgb is not None:
        area = float(cell.sum()) * mpp * mpp
        where = cytoplasm + style.granules_over_nucleus * nucleus
        granules = _splat(
            where,
            int(style.granules_per_um2 * area * rng.uniform(0.8, 1.2)),
            style.granule_um / mpp,
            rng,
        )
        od += _layer(granules, _od(style.granule_rgb))
    return od.astype(np.float32), cell


# ----------------------------------------------------------------------------------------------
# Red cells, platelets and debris
# ----------------------------------------------------------------------------------------------


def _draw_red_cell(mpp: float, rng: np.random.Generator) -> FloatArray:
    """A red cell: pale pink biconcave disc with central pallor, slightly oval at times."""
    r = rng.uniform(3.4, 4.1)
    half = int(math.ceil(r * 1.1 / mpp)) + 1
    u, v = _grid_um(half, mpp, rng.uniform(0, np.pi))
    ecc = rng.uniform(1.0, 1.1)
    disc = _cover(_wobbly_disc(u * ecc, v / ecc, r, 0.01, rng), mpp)
    rho = np.hypot(u, v) / r
    pallor = 1.0 - rng.uniform(0.45, 0.65) * np.exp(-((rho / rng.uniform(0.38, 0.5)) ** 2))
    colour = _od((222, 150, 155)) * rng.normal(1.0, 0.05, 3) * rng.uniform(0.85, 1.15)
    return _layer(disc * pallor, colour)


def _draw_platelets(mpp: float, rng: np.random.Generator) -> FloatArray:
    """One to four platelets (2-3 µm purple granular discs) clumped together."""
    count = int(rng.choice([1, 1, 1, 2, 3, 4]))
    half = int(math.ceil(4.0 / mpp))
    u, v = _grid_um(half, mpp, 0.0)
    body = np.zeros(u.shape, dtype=np.float32)
    for _ in range(count):
        cx, cy = rng.uniform(-2.0, 2.0, 2) if count > 1 else (0.0, 0.0)
        body = np.maximum(
            body, _cover(_wobbly_disc(u - cx, v - cy, rng.uniform(1.0, 1.5), 0.1, rng), mpp)
        )
    granules = _splat(body, 4 * count, 0.3 / mpp, rng)
    return _layer(body, _od((205, 185, 225))) + _layer(granules, _od((120, 60, 150)))


def _draw_debris(mpp: float, rng: np.random.Generator) -> FloatArray:
    """Stain precipitate (dark specks) or pale amorphous debris."""
    half = int(math.ceil(6.0 / mpp))
    u, v = _grid_um(half, mpp, rng.uniform(0, 2 * np.pi))
    if rng.random() < 0.6:
        # float32: numpy's stubs promote a float32 array minus a Python float to float64.
        specks = _splat(
            _cover(cast(FloatArray, np.hypot(u, v) - rng.uniform(1, 5)), mpp),
            int(rng.integers(1, 12)),
            rng.uniform(0.2, 0.6) / mpp,
            rng,
        )
        return _layer(specks, _od((60, 40, 110)))
    blob = _cover(_wobbly_disc(u, v * 1.6, rng.uniform(1.5, 4.0), 0.15, rng), mpp)
    amount = blob * (0.6 + 0.4 * np.clip(_noise(u.shape, 0.5 / mpp, rng), -1, 1))
    return _layer(amount, _od((200, 180, 200)))


_TEMPLATE_DRAWERS: dict[int, Callable[[float, np.random.Generator], FloatArray]] = {
    _RBC_ROW: _draw_red_cell,
    _PLATELET: _draw_platelets,
    _DEBRIS: _draw_debris,
}
_TEMPLATE_VARIANTS = 40


@lru_cache(maxsize=16)
def _templates(kind: int, seed: int, mpp: float, stain: float) -> tuple[FloatArray, ...]:
    """Variants of a small object kind, each from its own generator, scaled by the slide stain."""
    draw = _TEMPLATE_DRAWERS[kind]
    return tuple(
        draw(mpp, np.random.default_rng([seed, _TEMPLATE, kind, k])) * np.float32(stain)
        for k in range(_TEMPLATE_VARIANTS)
    )


# ----------------------------------------------------------------------------------------------
# Rendering a region
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """A rendered region: RGB pixels and, on request, the id of the white cell at each pixel."""

    rgb: NDArray[np.uint8]  # (h, w, 3)
    labels: NDArray[np.int64] | None  # (h, w), 0 outside white cells


_SMALL_REACH_UM = 7.0  # largest half-size of a red cell, platelet clump or debris patch


@dataclass(frozen=True)
class _Row:
    """Small objects of one scatter row, sorted by the left edge ``x0`` of their patches."""

    x0: NDArray[np.int64]
    patches: list[Patch]


class _Renderer:
    """Renders regions of one slide; ``keep_patches`` caches white-cell patches across bands."""

    def __init__(self, layout: SlideLayout, keep_patches: bool = False) -> None:
        self.layout = layout
        self.mpp = layout.mpp
        order = np.argsort(layout.cells.y, kind="stable")
        self._order, self._ys = order, layout.cells.y[order]
        self._max_cell_px = float(layout.cell_radius_px.max() * 1.4 + 4) if len(order) else 0.0
        self._keep = keep_patches
        self._patches: dict[int, Patch] = {}
        self._rows: dict[tuple[int, int], _Row] = {}
        self._row_px = SCATTER_ROW_UM / layout.mpp
        self._small_margin = max(
            t.shape[1] for kind in _TEMPLATE_DRAWERS for t in self._templates(kind)
        )
        self._row_pitches = {
            _RBC_ROW: RBC_SPACING_UM / layout.mpp * math.sqrt(3) / 2,
            _PLATELET: self._row_px,
            _DEBRIS: self._row_px,
        }

    # --- white cells ---------------------------------------------------------------------------
    def _cell_patch(self, i: int) -> Patch:
        if i in self._patches:
            return self._patches[i]
        cells, layout = self.layout.cells, self.layout
        rng = np.random.default_rng([layout.seed, _WBC, int(cells.id[i])])
        od, cover = _draw_white_cell(
            str(cells.cls[i]), float(cells.diameter_um[i]), self.mpp, layout.stain, rng
        )
        half = od.shape[1] // 2
        patch = Patch(od, int(cells.x[i]) - half, int(cells.y[i]) - half, cover)
        if self._keep:
            self._patches[i] = patch
        return patch

    def _cells_in(self, x: int, y: int, w: int, h: int) -> NDArray[np.int64]:
        reach = self._max_cell_px
        lo, hi = np.searchsorted(self._ys, [y - reach, y + h + reach])
        idx = self._order[lo:hi]
        xs = self.layout.cells.x[idx]
        return idx[(xs > x - reach) & (xs < x + w + reach)]

    # --- small scattered objects ---------------------------------------------------------------
    def _clear_of_cells(self, px: NDArray, py: NDArray, margin_px: float) -> NDArray[np.bool_]:
        """True where a point lies farther than a cell radius + ``margin_px`` from every cell."""
        if not len(self.layout.cells) or not len(px):
            return np.ones(len(px), dtype=bool)
        k = min(2, len(self.layout.cells))
        dist, idx = self.layout.cell_index.query(np.column_stack([px, py]), k=k)
        dist, idx = dist.reshape(len(px), k), idx.reshape(len(px), k)
        return np.all(dist > self.layout.cell_radius_px[idx] + margin_px, axis=1)

    def _rbc_row(self, row: int) -> list[Patch]:
        """Red cells of one lattice row, plus the extra overlapping layers of the thick zone."""
        geo, mpp, seed = self.layout.geometry, self.mpp, self.layout.seed
        pitch = RBC_SPACING_UM / mpp
        rng = np.random.default_rng([seed, _RBC_ROW, row])
        cols = int(geo.width / pitch) + 3
        px = (np.arange(-1, cols - 1) + 0.5 * (row % 2)) * pitch + rng.normal(0, 0.8 / mpp, cols)
        py = row * pitch * math.sqrt(3) / 2 + rng.normal(0, 0.8 / mpp, cols)
        density = geo.rbc_density(px, py)
        keep = rng.random(cols) < density
        # Thick zone: Poisson extra layers (density above one), thinned from the maximum 2.
        n_extra = rng.poisson(2.0 * cols)
        ex = rng.uniform(-pitch, geo.width + pitch, n_extra)
        ey = row * pitch * math.sqrt(3) / 2 + rng.uniform(-0.5, 0.5, n_extra) * pitch
        extra = rng.random(n_extra) * 2.0 < geo.rbc_density(ex, ey) - 1.0
        px, py = np.concatenate([px[keep], ex[extra]]), np.concatenate([py[keep], ey[extra]])
        clear = self._clear_of_cells(px, py, 0.5 * 3.8 / mpp)
        return self._place(_RBC_ROW, px[clear], py[clear], rng)

    def _scatter_row(self, kind: int, row: int) -> list[Patch]:
        """Platelet clumps or debris of one scatter row, thinned by the local smear density."""
        geo, mpp = self.layout.geometry, self.mpp
        per_um2 = 1 / 1400 if kind == _PLATELET else 1 / 25000
        rng = np.random.default_rng([self.layout.seed, kind, row])
        n = rng.poisson(per_um2 * 2.6 * geo.width * self._row_px * mpp * mpp)
        px = rng.uniform(0, geo.width, n)
        py = (row + rng.random(n)) * self._row_px
        keep = rng.random(n) * 2.6 < geo.rbc_density(px, py)
        keep &= self._clear_of_cells(px, py, 5.0 / mpp)
        return self._place(kind, px[keep], py[keep], rng)

    def _templates(self, kind: int) -> tuple[FloatArray, ...]:
        stain = float(self.layout.stain[0]) if kind == _RBC_ROW else 1.0
        return _templates(kind, self.layout.seed, self.mpp, stain)

    def _place(self, kind: int, px: NDArray, py: NDArray, rng: np.random.Generator) -> list[Patch]:
        """Patches of randomly chosen template variants centred on ``px``, ``py``."""
        variants = self._templates(kind)
        choice = rng.integers(0, len(variants), len(px))
        half = [t.shape[1] // 2 for t in variants]
        return [
            Patch(variants[k], x - half[k], y - half[k])
            for x, y, k in zip(
                np.rint(px).astype(int).tolist(),
                np.rint(py).astype(int).tolist(),
                choice.tolist(),
                strict=True,
            )
        ]

    def _row(self, kind: int, row: int) -> _Row:
        key = (kind, row)
        if key in self._rows:
            return self._rows[key]
        patches = self._rbc_row(row) if kind == _RBC_ROW else self._scatter_row(kind, row)
        patches.sort(key=lambda p: p.x0)
        result = _Row(np.array([p.x0 for p in patches], dtype=np.int64), patches)
        if self._keep:
            self._rows[key] = result
        return result

    def _scattered(self, x: int, y: int, w: int, h: int) -> Iterator[Patch]:
        """Small objects whose patches may overlap the region."""
        reach = int(_SMALL_REACH_UM / self.mpp)
        for kind, pitch in self._row_pitches.items():
            first = max(0, math.floor((y - reach) / pitch) - 1)  # no smear above the slide
            last = math.floor((y + h + reach) / pitch) + 1
            for row in range(first, last + 1):
                line = self._row(kind, row)
                lo, hi = np.searchsorted(line.x0, [x - 2 * reach, x + w])
                yield from line.patches[lo:hi]

    def forget_above(self, y: int) -> None:
        """Drop cached patches that lie wholly above level-0 row ``y`` (bands go downwards)."""
        self._patches = {i: p for i, p in self._patches.items() if p.y0 + p.od.shape[1] > y}
        reach = _SMALL_REACH_UM / self.mpp
        self._rows = {
            k: v for k, v in self._rows.items() if (k[1] + 2) * self._row_pitches[k[0]] + reach > y
        }

    # --- composition ---------------------------------------------------------------------------
    def render(self, x: int, y: int, w: int, h: int, labels: bool = False) -> Region:
        """Render the level-0 region at ``x, y`` of size ``w x h``."""
        film = self.layout.geometry.coverage(
            np.arange(x, x + w, dtype=np.float32)[None, :],
            np.arange(y, y + h, dtype=np.float32)[:, None],
        )
        # A margin as wide as the largest small patch lets the many red cells skip clipping.
        m = self._small_margin
        padded = np.zeros((3, h + 2 * m, w + 2 * m), dtype=np.float32)
        od = padded[:, m : m + h, m : m + w]
        for c, density in enumerate(_od((236, 228, 234))):  # faint plasma protein film
            np.multiply(film, density, out=od[c])
        for patch in self._scattered(x, y, w, h):
            ph, pw = patch.od.shape[1:]
            top, left = patch.y0 - y + m, patch.x0 - x + m
            if top + ph > m and left + pw > m and top < h + m and left < w + m:
                padded[:, top : top + ph, left : left + pw] += patch.od
        label_map = np.zeros((h, w), dtype=np.int64) if labels else None
        for i in self._cells_in(x, y, w, h):
            patch = self._cell_patch(int(i))
            _add(od, patch, x, y)
            if label_map is not None:
                _paint(label_map, patch, x, y, int(self.layout.cells.id[i]))
        return Region(_to_rgb(od), label_map)


def _to_rgb(od: FloatArray) -> NDArray[np.uint8]:
    """Beer-Lambert: glass seen through the planar optical density ``od`` (3, h, w), in place."""
    rgb = np.empty((*od.shape[1:], 3), dtype=np.uint8)
    for c in range(3):  # planes keep the arithmetic contiguous
        plane = od[c]
        np.negative(plane, out=plane)
        np.exp(plane, out=plane)
        plane *= GLASS_RGB[c]  # every stain absorbs (od >= 0), so values stay within 0..255
        plane += 0.5
        rgb[..., c] = plane
    return rgb


def _overlap(dst_shape: tuple[int, ...], patch: Patch, x: int, y: int) -> tuple[slice, ...] | None:
    """Slices of destination and patch where a patch overlaps a region whose origin is x, y."""
    ph, pw = patch.od.shape[-2:]
    top, left = patch.y0 - y, patch.x0 - x
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + ph, dst_shape[-2]), min(left + pw, dst_shape[-1])
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1), slice(y0 - top, y1 - top), slice(x0 - left, x1 - left)


def _add(od: FloatArray, patch: Patch, x: int, y: int) -> None:
    if (s := _overlap(od.shape, patch, x, y)) is not None:
        od[:, s[0], s[1]] += patch.od[:, s[2], s[3]]


def _paint(label_map: NDArray[np.int64], patch: Patch, x: int, y: int, cell_id: int) -> None:
    if patch.cover is not None and (s := _overlap(label_map.shape, patch, x, y)) is not None:
        label_map[s[0], s[1]][patch.cover[s[2], s[3]] > 0.5] = cell_id


def render_region(
    layout: SlideLayout, origin: tuple[int, int], size: tuple[int, int], labels: bool = False
) -> Region:
    """Render any level-0 region of a synthetic slide exactly as the writer renders it.

    Parameters
    ----------
    layout
        From :func:`layout_slide`.
    origin
        Top-left ``(x, y)`` in level-0 pixels (may lie outside the slide: glass).
    size
        ``(w, h)`` in pixels.
    labels
        Also return the id of the white cell covering each pixel (0 elsewhere).
    """
    (x, y), (w, h) = origin, size
    return _Renderer(layout).render(int(x), int(y), int(w), int(h), labels)


# ----------------------------------------------------------------------------------------------
# Streaming pyramidal SVS writer
# ----------------------------------------------------------------------------------------------


class _Downsampler:
    """Builds one pyramid level from rows of the level above, 4 x 4 box mean, rows kept on disk."""

    def __init__(self, width: int, height: int, folder: Path, child: _Downsampler | None):
        self.width, self.height = width, height
        self.rows_written = 0
        self.child = child
        fd, name = tempfile.mkstemp(dir=folder, prefix=".synth-", suffix=".raw")
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")
        self._carry: NDArray[np.uint8] | None = None

    def push(self, rows: NDArray[np.uint8]) -> None:
        """Accept rows of the parent level (full parent width); emit every complete group of 4."""
        if self._carry is not None:
            rows = np.concatenate([self._carry, rows])
        whole = rows.shape[0] // 4 * 4
        self._carry = rows[whole:] if whole < rows.shape[0] else None
        if whole:
            self._emit(rows[:whole])

    def finish(self) -> None:
        """Flush the last partial group (padded by repeating its last row) down the pyramid."""
        if self._carry is not None:
            carry, self._carry = self._carry, None
            self._emit(np.concatenate([carry, np.repeat(carry[-1:], 4 - len(carry), axis=0)]))
        self.file.close()
        if self.child is not None:
            self.child.finish()

    def _emit(self, rows: NDArray[np.uint8]) -> None:
        pad = self.width * 4 - rows.shape[1]
        rows = np.pad(rows, ((0, 0), (0, pad), (0, 0)), mode="edge") if pad else rows
        total = rows[0::4].astype(np.uint16)
        for k in (1, 2, 3):
            total += rows[k::4]
        total = total.reshape(total.shape[0], self.width, 4, 3)
        total = total[:, :, 0] + total[:, :, 1] + total[:, :, 2] + total[:, :, 3]
        small = ((total + 8) // 16).astype(np.uint8)[: self.height - self.rows_written]
        self.file.write(small.tobytes())
        self.rows_written += small.shape[0]
        if self.child is not None and small.size:
            self.child.push(small)

    def bands(self, tile: int) -> Iterator[NDArray[np.uint8]]:
        """Read the finished level back, ``tile`` rows at a time."""
        with open(self.path, "rb") as f:
            while block := f.read(tile * self.width * 3):
                yield np.frombuffer(block, dtype=np.uint8).reshape(-1, self.width, 3)


def _pyramid_sizes(width: int, height: int) -> list[tuple[int, int]]:
    """Level sizes, each 4 x smaller, until the smaller side drops below 1,000 pixels."""
    sizes = [(width, height)]
    while min(sizes[-1]) >= 1000:
        w, h = sizes[-1]
        sizes.append((math.ceil(w / 4), math.ceil(h / 4)))
    return sizes


def _tiles_of_band(band: NDArray[np.uint8], tile: int) -> Iterator[NDArray[np.uint8]]:
    """Full tiles of one band, edge-padded so JPEG blocks at the slide border stay clean."""
    h, w = band.shape[:2]
    padded = np.pad(band, ((0, tile - h), (0, -w % tile), (0, 0)), mode="edge")
    for x in range(0, padded.shape[1], tile):
        yield padded[:, x : x + tile]


def _level0_tiles(
    layout: SlideLayout, tile: int, first_level: _Downsampler | None
) -> Iterator[NDArray[np.uint8]]:
    """Render level 0 band by band, feeding each band to the pyramid before yielding its tiles.

    The consumer stops asking after the last tile, so nothing may wait until after a yield.
    """
    width, height = layout.size
    renderer = _Renderer(layout, keep_patches=True)
    chunk = max(tile, 4096 // tile * tile)  # bounded working memory whatever the width
    for y in range(0, height, tile):
        band = np.empty((tile, math.ceil(width / tile) * tile, 3), dtype=np.uint8)
        for x in range(0, band.shape[1], chunk):
            w = min(chunk, band.shape[1] - x)
            band[:, x : x + w] = renderer.render(x, y, w, tile).rgb
        renderer.forget_above(y + tile)
        if first_level is not None:
            first_level.push(band[: height - y, :width])
            if y + tile >= height:
                first_level.finish()
        yield from (band[:, t : t + tile] for t in range(0, band.shape[1], tile))


def _description(layout: SlideLayout, size: tuple[int, int], tile: int, quality: int) -> str:
    (w0, h0), (w, h) = layout.size, size
    head = f"Aperio Image Library v12.0.0\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile})"
    if size != layout.size:
        return f"{head} -> {w}x{h} JPEG/RGB Q={quality}"
    return (
        f"{head} JPEG/RGB Q={quality}|AppMag = {10.0 / layout.mpp:g}|MPP = {layout.mpp:g}"
        f"|Title = synthetic bone-marrow aspirate (wsi_pipeline.synth.smear seed {layout.seed})"
    )


def _write_svs(path: Path, layout: SlideLayout, tile: int, quality: int) -> None:
    sizes = _pyramid_sizes(*layout.size)
    levels: list[_Downsampler] = []
    child = None
    for w, h in reversed(sizes[1:]):
        child = _Downsampler(w, h, path.parent, child)
        levels.insert(0, child)
    options: dict[str, Any] = dict(
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": quality},
        metadata=None,
    )
    try:
        bigtiff = layout.size[0] * layout.size[1] * 3 > 2**31  # JPEG rarely beats 10:1 on smears
        with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
            tiles = _level0_tiles(layout, tile, levels[0] if levels else None)
            w0, h0 = layout.size
            tw.write(
                tiles,
                shape=(h0, w0, 3),
                description=_description(layout, (w0, h0), tile, quality),
                **options,
            )
            for level in levels:
                data = (t for band in level.bands(tile) for t in _tiles_of_band(band, tile))
                desc = _description(layout, (level.width, level.height), tile, quality)
                tw.write(data, shape=(level.height, level.width, 3), description=desc, **options)
    finally:
        for level in levels:
            level.file.close()
            level.path.unlink(missing_ok=True)


def write_synthetic_slide(
    path: str | os.PathLike[str],
    size: tuple[int, int] = (6000, 4000),
    seed: int = 0,
    mpp: float = 0.25,
    tile_size: int = 256,
    quality: int = 90,
) -> Path:
    """Write a synthetic bone-marrow aspirate as a pyramidal Aperio SVS plus its ground truth.

    Parameters
    ----------
    path
        Output slide, e.g. ``OUT.svs``; ``OUT.cells.csv`` is written beside it. Both files are
        written under temporary names and moved into place only when complete.
    size
        Level-0 ``(width, height)`` in pixels.
    seed
        Non-negative seed; the same seed gives byte-identical files.
    mpp
        Microns per pixel at level 0 (``AppMag`` is ``10 / mpp``).
    tile_size
        TIFF tile edge in pixels (multiple of 16).
    quality
        JPEG quality, 1-100.

    Returns
    -------
    Path
        The ground-truth CSV.

    Raises
    ------
    SynthError
        Bad arguments or a destination that cannot be written (one-line message).
    """
    path = Path(path)
    if tile_size < 64 or tile_size % 16:
        raise SynthError(
            path, f"tile size must be a multiple of 16 and at least 64, got {tile_size}"
        )
    if not 1 <= quality <= 100:
        raise SynthError(path, f"JPEG quality must lie in 1..100, got {quality}")
    try:
        layout = layout_slide(size, seed, mpp)
    except ValueError as exc:
        raise SynthError(path, str(exc)) from None
    csv_path = cells_csv_path(path)
    if not path.parent.is_dir():
        raise SynthError(path, f"folder {path.parent} does not exist")
    try:
        # The slide is published first (the inner block): if that fails, no truth file is left.
        with atomic_path(csv_path) as csv_temp, atomic_path(path) as slide_temp:
            _write_svs(slide_temp, layout, tile_size, quality)
            csv_temp.write_text(layout.cells.to_csv(), encoding="utf-8")
    except OSError as exc:
        raise SynthError(path, f"cannot write synthetic slide: {exc.strerror or exc}") from exc
    return csv_path
