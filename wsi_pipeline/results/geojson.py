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
as ``nucleusGeometry``, its measurements (cell id, confidence, review priority, areas, N:C ratio,
circularity, edge, probabilities) from the cell table's measured fields; the counted region
becomes one ``annotation``. The file is made for an expert to correct and export again
(``wsi corrections``):

* each feature's ``id`` is a UUID derived from the slide's SHA-256 and the cell's row in the
  store (:func:`cell_uuid`), the same on every run, and QuPath keeps it through import and
  export; the ``Cell id`` measurement is that row;
* classes are readable labels that name their MLL code (``"Blast (BLA)"``, see
  :attr:`~wsi_pipeline.core.taxonomy.CellClass.label`) in the taxonomy's fixed colours.

:class:`GeoJSONWriter` writes the file batch by batch as cells are classified, so memory does
not grow with the number of cells, to a hidden temporary name that only
:meth:`GeoJSONWriter.commit` renames into place. A name ending in ``.zip`` is a zip archive
holding one ``.geojson`` entry: QuPath 0.4-0.6 reads objects from ``.geojson``, ``.json`` and
``.zip`` files (``PathIO.readObjects``), not from gzip.
"""

from __future__ import annotations

import io
import json
import re
import uuid
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from wsi_pipeline.core.files import PendingFile
from wsi_pipeline.core.schema import MEASURED_FIELDS
from wsi_pipeline.core.taxonomy import cell_class
from wsi_pipeline.results.counts import certain

__all__ = [
    "CELL_ID_NAMESPACE",
    "UNCERTAIN_CLASS",
    "UNCERTAIN_COLOR",
    "REGION_CLASS",
    "REGION_COLOR",
    "GeoJSONWriter",
    "cell_uuid",
    "hex_to_rgb",
    "open_geojson",
    "read_result_key",
    "write_geojson",
]

UNCERTAIN_CLASS = "Uncertain"
UNCERTAIN_COLOR = (160, 160, 160)
REGION_CLASS = "Counted region"
REGION_COLOR = (0, 160, 255)
RESULT_KEY_MEMBER = "wsi_pipeline_result"
#: Namespace of the cells' UUIDs (:func:`cell_uuid`); never change it, or ids change.
CELL_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "wsi-pipeline/cell")
_DECIMALS = 2  # level-0 pixel coordinates to 1/100 px: far below any contour's accuracy

RGB = tuple[int, int, int]


def hex_to_rgb(colour: str) -> RGB:
    """``"#rrggbb"`` to ``(r, g, b)`` integers."""
    value = colour.lstrip("#")
    if len(value) != 6:
        raise ValueError(f"expected a colour as #rrggbb, got {colour!r}")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def cell_uuid(slide_sha256: str, cell_id: int | str) -> str:
    """The GeoJSON id of a cell: a UUID (version 5) of the slide's SHA-256 and the cell's row
    in the store, or of ``"region"`` for the counted region."""
    return str(uuid.uuid5(CELL_ID_NAMESPACE, f"{slide_sha256}/{cell_id}"))


def _closed_rings(contours: NDArray[np.floating]) -> list[list[list[float]]]:
    """``(n, K, 2)`` contours to rounded, closed rings (first vertex repeated at the end)."""
    rings = np.round(np.asarray(contours, dtype=np.float64), _DECIMALS).tolist()
    return [ring if ring[0] == ring[-1] else ring + ring[:1] for ring in rings]


def _feature(
    feature_id: str, geometry: dict[str, Any], properties: dict[str, Any], **members: Any
) -> str:
    """One GeoJSON feature; ``members`` are foreign members beside the geometry (QuPath
    reads a cell's ``nucleusGeometry`` there)."""
    feature = {"type": "Feature", "id": feature_id, "geometry": geometry, **members}
    return json.dumps(feature | {"properties": properties}, allow_nan=False)


def _measurements(batch: Mapping[str, NDArray], class_codes: Sequence[str]) -> list[dict]:
    """Each cell's QuPath measurements: the schema's measured fields in the batch, rounded."""
    names: list[str] = []
    columns: list[list[float]] = []
    for field in (f for f in MEASURED_FIELDS if f.name in batch):
        assert field.measurement is not None
        values = np.round(np.asarray(batch[field.name], dtype=np.float64), field.decimals)
        if np.isnan(values).all():  # not measured (novelty of a card without a novelty model)
            continue
        if np.dtype(field.dtype).kind == "i":  # a row number reads 12, not 12.0
            values = values.astype(np.int64)
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
    slide_sha256: str,
    threshold: float,
    min_agreement: float,
) -> Iterable[str]:
    sure = certain(
        batch["confidence"], batch.get("agreement"), threshold, min_agreement, batch.get("novelty")
    )
    # One classification per class, not per cell: a slide holds hundreds of thousands.
    labelled = {
        code: {"name": cell_class(code).label, "color": list(hex_to_rgb(cell_class(code).colour))}
        for code in class_codes
    }
    uncertain = {"name": UNCERTAIN_CLASS, "color": list(UNCERTAIN_COLOR)}
    for cell_id, ring, nucleus, top, is_certain, measurements in zip(
        np.asarray(batch["id"]).tolist(),
        _closed_rings(batch["contour"]),
        _closed_rings(batch["nucleus_contour"]),
        np.asarray(batch["top_class"]).tolist(),
        sure.tolist(),
        _measurements(batch, class_codes),
        strict=True,
    ):
        classification = labelled[class_codes[top]] if is_certain else uncertain
        # A QuPath cell: the membrane as the geometry, the nucleus beside it.
        yield _feature(
            cell_uuid(slide_sha256, cell_id),
            {"type": "Polygon", "coordinates": [ring]},
            {
                "objectType": "cell",
                "classification": classification,
                "measurements": measurements,
            },
            nucleusGeometry={"type": "Polygon", "coordinates": [nucleus]},
        )


def _region_feature(region: Sequence[NDArray[np.floating]], slide_sha256: str) -> str:
    polygons = [_closed_rings(np.asarray(ring)[None]) for ring in region]
    geometry = (
        {"type": "Polygon", "coordinates": polygons[0]}
        if len(polygons) == 1
        else {"type": "MultiPolygon", "coordinates": polygons}
    )
    return _feature(
        cell_uuid(slide_sha256, "region"),
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
    try:
        with open_geojson(path) as stream:
            head = stream.read(256)
    except (OSError, EOFError, UnicodeDecodeError, zipfile.BadZipFile):
        return None
    found = re.search(rf'"{RESULT_KEY_MEMBER}": "([0-9a-f]*)"', head)
    return found.group(1) if found else None


def open_geojson(path: str | Path) -> IO[str]:
    """Open a ``.geojson``/``.json`` file, or the first ``.geojson``/``.json`` entry of a
    ``.zip`` (as QuPath reads them), as text."""
    path = Path(path)
    if path.suffix.lower() != ".zip":
        return open(path, encoding="utf-8")
    archive = zipfile.ZipFile(path)
    entries = [n for n in archive.namelist() if n.lower().endswith((".geojson", ".json"))]
    if not entries:
        archive.close()
        raise zipfile.BadZipFile(f"{path.name} holds no .geojson or .json entry")
    return io.TextIOWrapper(archive.open(entries[0]), encoding="utf-8")


def _open_text(path: Path, entry: str | None) -> IO[str]:
    """Text stream writing ``path``, or (``entry`` given) a deflated zip entry of that name."""
    if entry is None:
        return open(path, "w", encoding="utf-8")
    # level 6: nearly the size of level 9 at a fraction of the time
    archive = zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=6)
    stream = archive.open(entry, "w", force_zip64=True)
    return _ZipEntryText(stream, archive)


class _ZipEntryText(io.TextIOWrapper):
    """A text stream into one zip entry that closes its archive when closed."""

    def __init__(self, stream: IO[bytes], archive: zipfile.ZipFile):
        super().__init__(stream, encoding="utf-8")
        self._archive = archive

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._archive.close()


class GeoJSONWriter:
    """Write cells (and the counted region) as a QuPath-importable FeatureCollection, batch by
    batch; publish the file with :meth:`commit`.

    Parameters
    ----------
    path : path
        Output file; a name ending in ``.zip`` (``.geojson.zip``) is a zip archive holding
        ``<stem>.geojson``.
    class_codes : sequence of str
        The card's classes in probability order.
    slide_sha256 : str
        The slide's checksum, from which every feature's id is derived (:func:`cell_uuid`).
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
        slide_sha256: str,
        *,
        region: Sequence[NDArray[np.floating]] = (),
        threshold: float = 0.0,
        min_agreement: float = 0.0,
        result_key: str = "",
    ):
        self.path = Path(path)
        self.class_codes = tuple(class_codes)
        self.slide_sha256 = slide_sha256
        self.threshold = threshold
        self.min_agreement = min_agreement
        # A foreign member QuPath ignores: which result this file holds (see read_result_key).
        head = (
            f'{{"type": "FeatureCollection", "{RESULT_KEY_MEMBER}": "{result_key}", "features": [\n'
        )
        if len(region):
            head += _region_feature(region, slide_sha256)
        self._separator = ",\n" if len(region) else ""
        self._file = PendingFile(self.path)
        entry = self.path.stem if self.path.suffix.lower() == ".zip" else None
        self._stream = _open_text(self._file.temp, entry)
        self._stream.write(head)
        self._committed = False

    def __enter__(self) -> GeoJSONWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

    def write(self, batch: Mapping[str, NDArray]) -> None:
        """Append a batch of the cell table with at least ``id`` (n,), ``contour`` and
        ``nucleus_contour`` (n, K, 2, level-0 pixels), ``top_class`` (n,), ``confidence`` (n,)
        and ``probabilities`` (n, C); the other measured fields present become measurements."""
        features = _cell_features(
            batch, self.class_codes, self.slide_sha256, self.threshold, self.min_agreement
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
    slide_sha256: str,
    *,
    region: Sequence[NDArray[np.floating]] = (),
    threshold: float = 0.0,
    min_agreement: float = 0.0,
) -> Path:
    """Write all ``batches`` of cells through a :class:`GeoJSONWriter` (same parameters)."""
    with GeoJSONWriter(
        path,
        class_codes,
        slide_sha256,
        region=region,
        threshold=threshold,
        min_agreement=min_agreement,
    ) as out:
        for batch in batches:
            out.write(batch)
        return out.commit()
