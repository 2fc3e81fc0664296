"""The cell table: the one definition of what is recorded for each white cell.

Detection fills the detection fields, classification adds its own, the writer numbers the cells;
the result store keeps every field as one ``cells/<name>`` array, the QuPath GeoJSON exports the
fields that have a measurement name, and ``docs/outputs.md`` documents each field. All writers
check their columns against :data:`CELL_FIELDS` (:func:`check_columns`), so no writer can emit a
field or a dtype that is not declared here.

Coordinates are level-0 pixels of the slide, x to the right and y down; areas are µm².
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "CELL_FIELDS",
    "MEASURED_FIELDS",
    "CONTOUR_VERTICES",
    "CellField",
    "SchemaError",
    "check_columns",
    "empty_columns",
    "field_names",
]

#: Vertices of every cell contour, evenly spaced along it.
CONTOUR_VERTICES = 32

Stage = Literal["write", "detect", "classify"]


class SchemaError(ValueError):
    """Columns that do not match the cell-table schema."""


@dataclass(frozen=True)
class CellField:
    """One field of the cell table.

    Attributes
    ----------
    name : str
        Column name (``cells/<name>`` in the store).
    dtype : str
        NumPy dtype of the column.
    tail : tuple of int or "classes"
        Shape after the cell axis; ``"classes"`` stands for the number of the card's classes.
    unit : str
        Unit of the values ("" for counts, indices and probabilities).
    stage : {"write", "detect", "classify"}
        The stage that fills the field.
    doc : str
        What the field holds.
    measurement : str or None
        Name of the QuPath measurement that exports the field, if any; for a field with a
        ``"classes"`` axis, a pattern with ``{code}``, one measurement per class.
    decimals : int
        Decimals kept in that measurement.
    """

    name: str
    dtype: str
    tail: tuple[int | Literal["classes"], ...]
    unit: str
    stage: Stage
    doc: str
    measurement: str | None = None
    decimals: int = 5

    def shape_tail(self, n_classes: int) -> tuple[int, ...]:
        """:attr:`tail` with ``"classes"`` replaced by ``n_classes``."""
        return tuple(n_classes if n == "classes" else int(n) for n in self.tail)


CELL_FIELDS: tuple[CellField, ...] = (
    CellField(
        "id",
        "int64",
        (),
        "",
        "write",
        "Row of the cell in the store, from 0 in order.",
        measurement="Cell id",
        decimals=0,
    ),
    CellField("x", "float64", (), "level-0 px", "detect", "Centre of the nucleus, x."),
    CellField("y", "float64", (), "level-0 px", "detect", "Centre of the nucleus, y."),
    CellField(
        "bbox", "int64", (4,), "level-0 px", "detect", "Bounding box (x0, y0, x1, y1), half-open."
    ),
    CellField(
        "contour",
        "float32",
        (CONTOUR_VERTICES, 2),
        "level-0 px",
        "detect",
        "Cell boundary (membrane) as (x, y) vertices evenly spaced along it; the last joins the "
        "first.",
    ),
    CellField(
        "nucleus_contour",
        "float32",
        (CONTOUR_VERTICES, 2),
        "level-0 px",
        "detect",
        "Nucleus boundary (all lobes together), as ``contour``.",
    ),
    CellField(
        "cell_area_um2",
        "float32",
        (),
        "µm²",
        "detect",
        "Area of the whole cell, nucleus and cytoplasm.",
        measurement="Cell: Area µm^2",
        decimals=3,
    ),
    CellField(
        "nucleus_area_um2",
        "float32",
        (),
        "µm²",
        "detect",
        "Area of the nucleus (the lobes of a segmented nucleus and the space between them).",
        measurement="Nucleus: Area µm^2",
        decimals=3,
    ),
    CellField(
        "nc_ratio",
        "float32",
        (),
        "",
        "detect",
        "Nucleus area over cell area, in (0, 1].",
        measurement="Nucleus/Cell area ratio",
        decimals=3,
    ),
    CellField(
        "circularity",
        "float32",
        (),
        "",
        "detect",
        "4 pi area / perimeter² of the cell boundary: 1 for a circle.",
        measurement="Cell: Circularity",
        decimals=3,
    ),
    CellField(
        "edge",
        "bool",
        (),
        "",
        "detect",
        "The cell is cut by the edge of the image it was found in (a single image's border, or "
        "a slide's); counted all the same.",
        measurement="Cut by image edge",
        decimals=0,
    ),
    CellField(
        "tile_id", "int32", (), "", "detect", "Tile that counted the cell (-1: not assigned)."
    ),
    CellField("score", "float32", (), "", "detect", "Detection score in [0, 1): stain contrast."),
    CellField(
        "probabilities",
        "float32",
        ("classes",),
        "",
        "classify",
        "Probability of each of the card's classes, in the card's order.",
        measurement="Probability {code}",
    ),
    CellField("top_class", "int16", (), "", "classify", "Index of the most probable class."),
    CellField(
        "confidence",
        "float32",
        (),
        "",
        "classify",
        "Probability of the top class (calibrated when the card is).",
        measurement="Confidence",
    ),
    CellField(
        "agreement",
        "float32",
        (),
        "",
        "classify",
        "Share of the ensemble's members whose own top class is the top class (1: all agree).",
        measurement="Snapshot agreement",
        decimals=3,
    ),
    CellField(
        "novelty",
        "float32",
        (),
        "",
        "classify",
        "Distance of the cell's features from the nearest class the card was trained on, over "
        "the card's threshold (Mahalanobis; above 1: unlike every known class, so uncertain). "
        "NaN when the card has no novelty model.",
        measurement="Novelty",
        decimals=3,
    ),
    CellField(
        "review_priority",
        "float32",
        (),
        "",
        "classify",
        "1 - confidence x agreement x min(1, 1 / novelty): the cells an expert's look teaches "
        "the most score highest (least confident, members disagreeing, unlike known classes).",
        measurement="Review priority",
        decimals=3,
    ),
)

_BY_NAME = {f.name: f for f in CELL_FIELDS}

#: The fields exported as QuPath measurements, in the order they are written.
MEASURED_FIELDS: tuple[CellField, ...] = tuple(
    _BY_NAME[name]
    for name in (
        "id",
        "confidence",
        "agreement",
        "novelty",
        "review_priority",
        "cell_area_um2",
        "nucleus_area_um2",
        "nc_ratio",
        "circularity",
        "edge",
        "probabilities",
    )
)


def field_names(*stages: Stage) -> tuple[str, ...]:
    """Names of the fields filled by ``stages`` (all fields if none is given), in store order."""
    return tuple(f.name for f in CELL_FIELDS if not stages or f.stage in stages)


def empty_columns(names: Iterable[str], n_classes: int = 0) -> dict[str, NDArray]:
    """Zero-length columns of the fields ``names``, with their dtypes and shapes."""
    return {
        name: np.zeros((0, *_BY_NAME[name].shape_tail(n_classes)), dtype=_BY_NAME[name].dtype)
        for name in names
    }


def check_columns(
    columns: Mapping[str, NDArray], n_classes: int, required: Iterable[str] = ()
) -> int:
    """Check a batch of cell-table columns against the schema; return its number of cells.

    Parameters
    ----------
    columns : mapping of str to ndarray
        Columns of one batch of cells.
    n_classes : int
        Number of the card's classes (the ``probabilities`` width).
    required : iterable of str
        Fields the batch must hold.

    Raises
    ------
    SchemaError
        A column the schema does not declare, one of another dtype, or one whose shape is not
        (n, ...declared) with n the length of the first field present; or a required field
        missing.
    """
    missing = [name for name in required if name not in columns]
    if missing:
        raise SchemaError(f"cell columns lack {', '.join(missing)}")
    n = next((len(columns[f.name]) for f in CELL_FIELDS if f.name in columns), 0)
    for name, values in columns.items():
        declared = _BY_NAME.get(name)
        if declared is None:
            raise SchemaError(f"cells/{name} is not declared in the cell-table schema")
        if values.dtype != np.dtype(declared.dtype):
            raise SchemaError(f"cells/{name} is {values.dtype}, declared {declared.dtype}")
        expected = (n, *declared.shape_tail(n_classes))
        if values.shape != expected:
            raise SchemaError(f"cells/{name} has shape {values.shape}, expected {expected}")
    return n
