"""An expert's corrections of one slide's cells, as QuPath exports them, turned into training data.

``wsi-run`` writes each cell as a QuPath cell whose ``id`` derives from the slide's checksum and
the cell's row in the store (:func:`~wsi_pipeline.results.geojson.cell_uuid`). An expert opens
that GeoJSON in QuPath, changes classes, deletes objects that are not cells and adds missed
cells (points or outlines), then exports the objects (``examples/export_corrections.groovy``).
:func:`collect_corrections` compares that export with the store:

* a store cell whose class the expert set differently is *reclassified* (or *classified*, when
  the run had called it ``Uncertain``);
* a classified object that is not a store cell is an *added* cell at its centre (each point of
  a point object); objects without a class (a region drawn to work in) are ignored;
* what the export leaves out, and the cells left as they were, depend on its *scope*. An export
  of the whole slide (``"slide"``) leaves out the cells the expert deleted: *not a cell*,
  labelled ``ART``; unchanged cells teach nothing new and are left out. An export of only the
  cells the expert reviewed (``"reviewed"``, e.g. the selected objects) leaves out the cells
  not looked at; a reviewed cell left as it was is *confirmed* and kept as training data, so
  that a fine-tuned card learns what the parent got right as well as its errors (to reject a
  cell there, class it ``Artefact (ART)``).

Every corrected, deleted or added cell is cut again from the slide at the card's field of view
and written, in the MLL layout ``FOLDER/<CODE>/<slide-stem>_cell<row>.png``, as training data for
``wsi train --init``; ``changes.csv`` lists each change and ``corrections.json`` records where
it came from (store, slide and export, with checksums), which the trained card's provenance
keeps. The folder appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import shapely
from numpy.typing import NDArray
from PIL import Image

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.core.files import file_sha256
from wsi_pipeline.core.taxonomy import CLASSES, class_of_label
from wsi_pipeline.image.crops import crop_cells
from wsi_pipeline.image.slide import open_slide, slide_checksum, slide_stem
from wsi_pipeline.model.cards import ClassifierCard, resolve_card
from wsi_pipeline.results.counts import certain
from wsi_pipeline.results.geojson import REGION_CLASS, UNCERTAIN_CLASS, cell_uuid, open_geojson
from wsi_pipeline.results.store import read_cells

__all__ = [
    "ACTIONS",
    "MANIFEST",
    "NOT_A_CELL",
    "SCOPES",
    "Correction",
    "collect_corrections",
    "find_corrections",
    "read_features",
]

#: What happened to a cell, as ``changes.csv`` says it.
ACTIONS = ("reclassified", "classified", "deleted", "added", "confirmed")
#: What an export holds: every cell of the slide, or only the cells the expert reviewed.
SCOPES = ("slide", "reviewed")
#: The class a deleted cell is trained as.
NOT_A_CELL = "ART"
#: The provenance file of a corrections folder.
MANIFEST = "corrections.json"
CELL_ID_MEASUREMENT = "Cell id"

Action = Literal["reclassified", "classified", "deleted", "added", "confirmed"]
Scope = Literal["slide", "reviewed"]


@dataclass(frozen=True)
class Correction:
    """One cell an expert corrected.

    Attributes
    ----------
    cell_id : int or None
        Row of the cell in the store; None for an added cell.
    old_class : str
        MLL code the run gave the cell, ``"Uncertain"``, or ``""`` for an added cell.
    new_class : str
        MLL code the expert gave (``ART`` for a deleted cell).
    action : {"reclassified", "classified", "deleted", "added", "confirmed"}
    x, y : float
        Centre of the cell in level-0 pixels.
    """

    cell_id: int | None
    old_class: str
    new_class: str
    action: Action
    x: float
    y: float


def read_features(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The features of a GeoJSON file QuPath exported: a FeatureCollection, a list of
    features or one feature, in a ``.geojson``/``.json`` file or a ``.zip`` holding one.

    Raises
    ------
    InputError
        The file is missing, empty, not JSON, or holds no objects.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    if path.stat().st_size == 0:
        raise InputError(path, "the file is empty")
    try:
        with open_geojson(path) as stream:
            document = json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, ValueError) as error:
        raise InputError(path, f"not a GeoJSON file ({error})") from None
    if isinstance(document, dict) and document.get("type") == "FeatureCollection":
        features = document.get("features") or []
    elif isinstance(document, dict) and document.get("type") == "Feature":
        features = [document]
    elif isinstance(document, list):
        features = document
    else:
        raise InputError(path, "not a GeoJSON FeatureCollection, feature or list of features")
    features = [f for f in features if isinstance(f, dict) and f.get("type") == "Feature"]
    if not features:
        raise InputError(path, "the file holds no objects")
    return features


def _class_name(feature: Mapping[str, Any]) -> str | None:
    """The QuPath class of a feature, or None when it has none."""
    classification = feature.get("properties", {}).get("classification")
    if isinstance(classification, Mapping):
        name = classification.get("name") or ":".join(classification.get("names", []))
        return str(name) if name else None
    return str(classification) if classification else None


def _measurement(feature: Mapping[str, Any], name: str) -> float | None:
    """A measurement of a feature; QuPath writes an object (from 0.4) or a list (before)."""
    measurements = feature.get("properties", {}).get("measurements")
    if isinstance(measurements, Mapping):
        value = measurements.get(name)
    elif isinstance(measurements, list):
        value = next((m.get("value") for m in measurements if m.get("name") == name), None)
    else:
        value = None
    return None if value is None else float(value)


def _centres(geometry: Mapping[str, Any]) -> list[tuple[float, float]]:
    """Where an added object's cells are: each point of a point object, else the centre."""
    shape = shapely.geometry.shape(geometry)
    if isinstance(shape, shapely.MultiPoint):
        return [(p.x, p.y) for p in shape.geoms]
    centre = shape.centroid
    return [(centre.x, centre.y)]


def find_corrections(
    features: Sequence[Mapping[str, Any]],
    cells: Mapping[str, NDArray],
    class_codes: Sequence[str],
    slide_sha256: str,
    *,
    threshold: float,
    min_agreement: float,
    scope: Scope = "slide",
    source: str | os.PathLike[str] = "corrections",
) -> list[Correction]:
    """Compare exported features with a store's cells.

    Parameters
    ----------
    features : sequence of dict
        GeoJSON features (:func:`read_features`).
    cells : mapping of str to ndarray
        The store's ``id``, ``x``, ``y``, ``top_class``, ``confidence`` and ``agreement``.
    class_codes : sequence of str
        The card's classes, in the order of ``top_class``.
    slide_sha256 : str
        The slide's checksum, from which the cells' feature ids derive.
    threshold, min_agreement : float
        The run's uncertain rule, to know which class the expert saw.
    scope : {"slide", "reviewed"}
        What the export holds (see the module's docstring): every cell, so that a missing cell
        was deleted; or only the reviewed cells, so that an unchanged cell is confirmed.
    source : path
        Named in errors.

    Returns
    -------
    list of Correction
        In store order, then the added cells in the file's order.

    Raises
    ------
    InputError
        Features from another slide, an unknown class name (the known ones listed), a cell
        twice, or no store cell at all among the features.
    """
    rows = {cell_uuid(slide_sha256, int(i)): k for k, i in enumerate(cells["id"])}
    sure = certain(
        cells["confidence"], cells["agreement"], threshold, min_agreement, cells.get("novelty")
    )
    shown = np.where(sure, np.asarray(class_codes)[cells["top_class"]], UNCERTAIN_CLASS)
    seen: dict[int, str | None] = {}
    added: list[Correction] = []
    foreign = 0
    unknown: set[str] = set()
    for feature in features:
        name = _class_name(feature)
        if name == REGION_CLASS:
            continue
        row = rows.get(str(feature.get("id")))
        if row is None and _measurement(feature, CELL_ID_MEASUREMENT) is not None:
            foreign += 1  # one of our cells, but not of this slide's store
            continue
        code = None
        if name is not None and name != UNCERTAIN_CLASS:
            try:
                code = class_of_label(name).code
            except KeyError:
                unknown.add(name)
                continue
        if row is not None:
            if row in seen:
                raise InputError(source, f"cell {int(cells['id'][row])} appears twice")
            seen[row] = code
        elif code is not None:
            try:
                centres = _centres(feature["geometry"])
            except (KeyError, TypeError, AttributeError, ValueError, shapely.errors.ShapelyError):
                raise InputError(
                    source, f"an added {name!r} object has no usable geometry"
                ) from None
            added += [Correction(None, "", code, "added", x, y) for x, y in centres]
    if foreign:
        raise InputError(
            source,
            f"{foreign} cells carry ids of another slide or store; expected those of slide "
            f"sha256 {slide_sha256[:12]}..., written by wsi-run for this store",
        )
    if unknown:
        listed = ", ".join(sorted(repr(n) for n in unknown))
        known = ", ".join(f'"{c.label}"' for c in CLASSES)
        raise InputError(source, f"unknown class names {listed}; known classes: {known}")
    if not seen:
        raise InputError(
            source, "none of its objects is a cell of this store: was it exported from this slide?"
        )
    corrections: list[Correction] = []
    for k, cell_id in enumerate(cells["id"].tolist()):
        x, y = float(cells["x"][k]), float(cells["y"][k])
        old = str(shown[k])
        if k not in seen:
            if scope == "slide":
                corrections.append(Correction(cell_id, old, NOT_A_CELL, "deleted", x, y))
            continue
        new = seen[k]
        if new is None:  # left Uncertain: not decided
            continue
        if new == old:
            if scope == "reviewed":
                corrections.append(Correction(cell_id, old, new, "confirmed", x, y))
            continue
        action: Action = "classified" if old == UNCERTAIN_CLASS else "reclassified"
        corrections.append(Correction(cell_id, old, new, action, x, y))
    return corrections + added


def _image_name(stem: str, correction: Correction, added_index: int) -> str:
    if correction.cell_id is None:
        return f"{stem}_added{added_index:05d}.png"
    return f"{stem}_cell{correction.cell_id:07d}.png"


def write_corrections_folder(
    out: Path,
    corrections: Sequence[Correction],
    crops: NDArray[np.uint8],
    stem: str,
    manifest: Mapping[str, Any],
) -> Path:
    """Write crops in the MLL layout, ``changes.csv`` and ``corrections.json`` into a hidden
    folder beside ``out`` and rename it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        rows = []
        added = 0
        for correction, crop in zip(corrections, crops, strict=True):
            name = _image_name(stem, correction, added)
            added += correction.cell_id is None
            relative = Path(correction.new_class) / name
            (temp / correction.new_class).mkdir(exist_ok=True)
            Image.fromarray(crop).save(temp / relative)
            rows.append(
                (
                    "" if correction.cell_id is None else correction.cell_id,
                    correction.old_class,
                    correction.new_class,
                    correction.action,
                    round(correction.x, 2),
                    round(correction.y, 2),
                    relative.as_posix(),
                )
            )
        with open(temp / "changes.csv", "w", newline="", encoding="utf-8") as stream:
            table = csv.writer(stream)
            table.writerow(("cell_id", "old_class", "new_class", "action", "x", "y", "image"))
            table.writerows(rows)
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.rename(temp, out)  # fails if out appeared meanwhile: nothing is overwritten
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out


def collect_corrections(
    store: str | os.PathLike[str],
    edited: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    slide: str | os.PathLike[str] | None = None,
    card: ClassifierCard | str | os.PathLike[str] | None = None,
    scope: Scope = "slide",
) -> tuple[Path, list[Correction]]:
    """Turn an expert's edited export of a slide's cells into a labelled folder.

    Parameters
    ----------
    store : path
        The slide's complete result store (``<slide-stem>.zarr``).
    edited : path
        GeoJSON QuPath exported after the expert's edits (``.geojson``, ``.json`` or ``.zip``).
    out : path
        The folder to write; it must not exist.
    slide : path, optional
        The slide file, when it has moved since the run (default: the path the store records).
    card : ClassifierCard, name or path, optional
        Whose field of view and input size the crops take (default: the run's card).
    scope : {"slide", "reviewed"}
        See :func:`find_corrections`.

    Returns
    -------
    (Path, list of Correction)

    Raises
    ------
    InputError
        Any bad input (see :func:`read_features`, :func:`find_corrections`), a slide whose
        checksum is not the one the store records, or an existing ``out``.
    """
    out, edited = Path(out), Path(edited)
    if out.exists():
        raise InputError(out, "already exists; corrections are written to a new folder")
    features = read_features(edited)
    names = ("id", "x", "y", "top_class", "confidence", "agreement")
    attrs, cells = read_cells(store, *names)
    with contextlib.suppress(InputError):  # stores written before the novelty model lack it
        cells.update(read_cells(store, "novelty")[1])
    recorded = attrs["slide"]
    slide_path = Path(slide) if slide is not None else Path(recorded["path"])
    card = resolve_card(card if card is not None else _run_card(attrs))
    parameters = attrs.get("parameters", {})
    corrections = find_corrections(
        features,
        cells,
        attrs["class_codes"],
        recorded["sha256"],
        threshold=float(parameters.get("min_confidence", 0.0)),
        min_agreement=float(parameters.get("min_agreement", 0.0)),
        scope=scope,
        source=edited,
    )
    if not corrections:
        raise InputError(edited, "no cell was changed, deleted, added or confirmed")
    if not slide_path.exists():
        raise InputError(slide_path, "no such file: the slide moved since the run (give --slide)")
    if slide_checksum(slide_path) != recorded["sha256"]:
        said = "the slide changed since the run: its SHA-256 differs from the store's"
        raise InputError(slide_path, said)
    centres = np.array([(c.x, c.y) for c in corrections], dtype=float)
    with open_slide(slide_path, mpp=recorded.get("mpp")) as opened:
        crops = crop_cells(opened, centres, card.model.fov_um, card.model.input_size)
    manifest = _manifest(store, edited, slide_path, recorded, attrs, card, corrections, scope)
    stem = slide_stem(slide_path)
    return write_corrections_folder(out, corrections, crops, stem, manifest), corrections


def _run_card(attrs: Mapping[str, Any]) -> str:
    """The card the run used: its file when it still exists, else its name."""
    classifier = attrs.get("classifier", {})
    path = classifier.get("path")
    return path if path and Path(path).is_file() else classifier["name"]


def _manifest(
    store: str | os.PathLike[str],
    edited: Path,
    slide: Path,
    recorded: Mapping[str, Any],
    attrs: Mapping[str, Any],
    card: ClassifierCard,
    corrections: Iterable[Correction],
    scope: Scope,
) -> dict[str, Any]:
    counts = dict.fromkeys(ACTIONS, 0)
    for correction in corrections:
        counts[correction.action] += 1
    return {
        "format": "wsi-pipeline-corrections",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "store": {"path": str(store), "result_key": attrs.get("result_key")},
        "slide": {"path": str(slide), "sha256": recorded["sha256"], "mpp": recorded.get("mpp")},
        "scope": scope,
        "edited": {"path": str(edited), "sha256": file_sha256(edited)},
        "card": {"name": card.name, "path": str(card.path)},
        "crop": {"fov_um": card.model.fov_um, "size_px": card.model.input_size},
        "counts": counts,
        "classes": sorted({c.new_class for c in corrections}),
    }
