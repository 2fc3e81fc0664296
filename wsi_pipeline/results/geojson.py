"""Stream classified cells to a GeoJSON FeatureCollection that QuPath 0.4-0.6 imports.

QuPath's reader (``PathObjectTypeAdapters`` in qupath-core) takes, per Feature:

* ``id``: a UUID string (from v0.4; v0.2 stored the object type there instead);
* ``geometry``: coordinates in full-resolution pixels, origin top-left (our level-0 pixels);
* ``properties.objectType``: ``"detection"``, ``"annotation"``, ``"cell"``... (inside
  ``properties``, not at the top level);
* ``properties.classification``: ``{"name": str, "color": [r, g, b]}``;
* ``properties.measurements``: a JSON object of name to number (from v0.4; a list before);
* ``nucleusGeometry``: beside ``geometry``, the nucleus of a ``cell`` object.

Each cell becomes a QuPath ``cell``: its membrane outline as a closed Polygon ring, its nucleus
as ``nucleusGeometry``, its measurements (areas, N:C ratio, circularity, edge, confidence,
probabilities) from the cell table's measured fields; the counted region
becomes one ``annotation``. :class:`GeoJSONWriter` writes the file batch by batch as cells are
classified, so memory does not grow with the number of cells, to a hidden temporary name that
only :meth:`GeoJSONWriter.commit` renames into place.
"""

from __future__ import annotations

import gzip
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from wsi_pipeline.core.files import PendingFile
from wsi_pipeline.core.schema import MEASURED_FIELDS
from wsi_pipeline.results.counts import certain

__all__ = [
    "UNCERTAIN_CLASS",
    "UNCERTAIN_COLOR",
    "REGION_CLASS",
    "REGION_COLOR",
    "GeoJSONWriter",
    "hex_to_rgb",
    "read_result_key",
    "write_geojson",
]

UNCERTAIN_CLASS = "Uncertain"
UNCERTAIN_COLOR = (160, 160, 160)
REGION_CLASS = "Counted region"
REGION_COLOR = (0, 160, 255)
RESULT_KEY_MEMBER = "wsi_pipeline_result"
_DECIMALS = 2  # level-0 pixel coordinates to 1/100 px: far below any contour's accuracy

RGB = tuple[int, int, int]


def hex_to_rgb(colour: str) -> RGB:
    """``"#rrggbb"`` to ``(r, g, b)`` integers."""
    value = colour.lstrip("#")
    if len(value) != 6:
        raise ValueError(f"expected a colour as #rrggbb, got {colour!r}")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def _closed_rings(contours: NDArray[np.floating]) -> list[list[list[float]]]:
    """``(n, K, 2)`` contours to rounded, closed rings (first vertex repeated at the end)."""
    rings = np.round(np.asarray(contours, dtype=np.float64), _DECIMALS).tolist()
    return [ring if ring[0] == ring[-1] else ring + ring[:1] for ring in rings]


def _feature(geometry: dict[str, Any], properties: dict[str, Any], **members: Any) -> str:
    """One GeoJSON feature; ``members`` are foreign members beside the geometry (QuPath
    reads a cell's ``nucleusGeometry`` there)."""
    feature = {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, **members}
    return json.dumps(feature | {"properties": properties}, allow_nan=False)


def _measurements(batch: Mapping[str, NDArray], class_codes: Sequence[str]) -> list[dict]:
    """Each cell's QuPath measurements: the schema's measured fields in the batch, rounded."""
    names: list[str] = []
    columns: list[list[float]] = []
    for field in (f for f in MEASURED_FIELDS if f.name in batch):
        assert field.measurement is not None
        values = np.round(np.asarray(batch[field.name], dtype=np.float64), field.decimals)
        if field.tail:
            names += [field.measurement.format(code=code) for code in class_codes]
            columns += values.T.tolist()
        else:
            names.append(field.measurement)
            columns.append(values.tolist())
    return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]


def _cell_features(
    batch: Mapping[str, NDArray],
    class_codes: Sequence[str],
    colors: Mapping[str, RGB],
    threshold: float,
    min_agreement: float,
) -> Iterable[str]:
    sure = certain(batch["confidence"], batch.get("agreement"), threshold, min_agreement)
    for ring, nucleus, top, is_certain, measurements in zip(
        _closed_rings(batch["contour"]),
        _closed_rings(batch["nucleus_contour"]),
        np.asarray(batch["top_class"]).tolist(),
        sure.tolist(),
        _measurements(batch, class_codes),
        strict=True,
    ):
        code = class_codes[top] if is_certain else UNCERTAIN_CLASS
        color = colors[code] if code != UNCERTAIN_CLASS else UNCERTAIN_COLOR
        # A QuPath cell: the membrane as the geometry, the nucleus beside it.
        yield _feature(
            {"type": "Polygon", "coordinates": [ring]},
            {
                "objectType": "cell",
                "classification": {"name": code, "color": list(color)},
                "measurements": measurements,
            },
            nucleusGeometry={"type": "Polygon", "coordinates": [nucleus]},
        )


def _region_feature(region: Sequence[NDArray[np.floating]]) -> str:
    polygons = [_closed_rings(np.asarray(ring)[None]) for ring in region]
    geometry = (
        {"type": "Polygon", "coordinates": polygons[0]}
        if len(polygons) == 1
        else {"type": "MultiPolygon", "coordinates": polygons}
    )
    return _feature(
        geometry,
        {
            "objectType": "annotation",
            "name": REGION_CLASS,
            "classification": {"name": REGION_CLASS, "color": list(REGION_COLOR)},
            "isLocked": True,
        },
    )


def read_result_key(path: str | Path) -> str | None:
    """The ``wsi_pipeline_result`` member of a GeoJSON file written here, or None (missing or
    unreadable file, or no such member)."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as stream:
            head = stream.read(256)
    except (OSError, EOFError, UnicodeDecodeError):
        return None
    found = re.search(rf'"{RESULT_KEY_MEMBER}": "([0-9a-f]*)"', head)
    return found.group(1) if found else None


def _open_text(path: Path, compress: bool) -> IO[str]:
    if compress:  # level 6: nearly the size of level 9 at a fraction of the time
        return gzip.open(path, "wt", encoding="utf-8", compresslevel=6)
    return open(path, "w", encoding="utf-8")


class GeoJSONWriter:
    """Write cells (and the counted region) as a QuPath-importable FeatureCollection, batch by
    batch; publish the file with :meth:`commit`.

    Parameters
    ----------
    path : path
        Output file; a name ending in ``.gz`` (``.geojson.gz``) is gzip-compressed.
    class_codes : sequence of str
        The card's classes in probability order.
    colors : mapping of str to (r, g, b)
        Display colour of each class code.
    region : sequence of (K, 2) arrays, optional
        Outer rings of the counted region in level-0 pixels: one annotation (a Polygon, or a
        MultiPolygon for several rings).
    threshold, min_agreement : float
        Cells the differential counts as uncertain (confidence under ``threshold``, or fewer
        than ``min_agreement`` of the snapshots agreeing: see
        :func:`~wsi_pipeline.results.counts.certain`) are classified ``"Uncertain"`` (grey);
        their probabilities stay in the measurements.

    result_key : str
        Identifies the result the file holds, as the store records it; written as the
        collection's member ``wsi_pipeline_result`` (:func:`read_result_key`).

    Notes
    -----
    Use it as a context manager: leaving the block without :meth:`commit` deletes the temporary
    file beside ``path`` (:class:`~wsi_pipeline.core.files.PendingFile`).
    """

    def __init__(
        self,
        path: str | Path,
        class_codes: Sequence[str],
        colors: Mapping[str, RGB],
        *,
        region: Sequence[NDArray[np.floating]] = (),
        threshold: float = 0.0,
        min_agreement: float = 0.0,
        result_key: str = "",
    ):
        missing = set(class_codes) - set(colors)
        if missing:
            raise ValueError(f"no colour for classes {', '.join(sorted(missing))}")
        self.path = Path(path)
        self.class_codes = tuple(class_codes)
        self.colors = dict(colors)
        self.threshold = threshold
        self.min_agreement = min_agreement
        # A foreign member QuPath ignores: which result this file holds (see read_result_key).
        head = (
            f'{{"type": "FeatureCollection", "{RESULT_KEY_MEMBER}": "{result_key}", "features": [\n'
        )
        if len(region):
            head += _region_feature(region)
        self._separator = ",\n" if len(region) else ""
        self._file = PendingFile(self.path)
        self._stream = _open_text(self._file.temp, compress=self.path.suffix == ".gz")
        self._stream.write(head)
        self._committed = False

    def __enter__(self) -> GeoJSONWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

    def write(self, batch: Mapping[str, NDArray]) -> None:
        """Append a batch of the cell table with at least ``contour`` and ``nucleus_contour``
        (n, K, 2, level-0 pixels), ``top_class`` (n,), ``confidence`` (n,) and
        ``probabilities`` (n, C); the other measured fields present become measurements."""
        features = _cell_features(
            batch, self.class_codes, self.colors, self.threshold, self.min_agreement
        )
        for feature in features:
            self._stream.write(self._separator + feature)
            self._separator = ",\n"

    def commit(self) -> Path:
        """Close the collection and rename the file into place; returns ``path``."""
        self._stream.write("\n]}\n")
        self._stream.close()
        self._committed = True
        return self._file.commit()

    def abort(self) -> None:
        """Delete the temporary file (closing it first if need be)."""
        self._stream.close()
        self._file.abort()


def write_geojson(
    path: str | Path,
    batches: Iterable[Mapping[str, NDArray]],
    class_codes: Sequence[str],
    colors: Mapping[str, RGB],
    *,
    region: Sequence[NDArray[np.floating]] = (),
    threshold: float = 0.0,
    min_agreement: float = 0.0,
) -> Path:
    """Write all ``batches`` of cells through a :class:`GeoJSONWriter` (same parameters)."""
    with GeoJSONWriter(
        path,
        class_codes,
        colors,
        region=region,
        threshold=threshold,
        min_agreement=min_agreement,
    ) as out:
        for batch in batches:
            out.write(batch)
        return out.commit()
