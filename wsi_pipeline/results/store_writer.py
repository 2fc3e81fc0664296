"""Writing the result store of one slide (:mod:`wsi_pipeline.results.store`), atomically.

:class:`ResultWriter` streams cells and crops into a hidden temporary store beside the final one
(``<out>/.<slide-stem>.zarr.partial``) whose ``status`` attribute reads ``"incomplete"``. Only
:meth:`ResultWriter.commit` sets ``status`` to ``"complete"`` and renames the store into place
(an older store of the same name is moved aside first and deleted after), so a run killed at any
moment never leaves a store that looks complete; the store's readers refuse anything else.
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
import zarr.codecs
from numpy.typing import NDArray

from wsi_pipeline import __version__
from wsi_pipeline.core.schema import CELL_FIELDS, check_columns, field_names
from wsi_pipeline.results.counts import Differential
from wsi_pipeline.results.ngff import write_multiscale
from wsi_pipeline.results.store import FORMAT, FORMAT_VERSION, array_at, store_path

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams

__all__ = ["ResultWriter", "software_versions"]

CELL_CHUNK = 65_536
CROP_CHUNK = 64
#: Cells held in memory between writes (a whole number of crop chunks, about 28 MB of 96-px
#: crops): each Zarr append rewrites the chunks it touches, so appending every small batch
#: would rewrite the growing cell-table chunks again and again.
FLUSH_CELLS = 16 * CROP_CHUNK
SALIENCY_METHODS = ("gradcam", "smoothgrad")
#: Crops are photographs: Zstandard shrinks them by about a sixth at any level, and level 1
#: costs a quarter of the CPU of the default level 3 (0.04 against 0.15 ms a crop).
CROP_COMPRESSOR = zarr.codecs.ZstdCodec(level=1)
_ALWAYS_WRITTEN: ArrayConfigParams = {"write_empty_chunks": True}
_PARTIAL_SUFFIX = ".partial"
_OLD_SUFFIX = ".old"


def software_versions() -> dict[str, str]:
    """Versions of wsi-pipeline, Python and the libraries that shape the results."""
    versions = {"wsi_pipeline": __version__, "python": platform.python_version()}
    for package in ("numpy", "torch", "timm", "zarr", "openslide-python"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


class ResultWriter:
    """Write one slide's result store in batches; publish it atomically with :meth:`commit`.

    Parameters
    ----------
    out_dir : path
        Output folder (created if needed).
    slide_stem : str
        The slide's file name without suffix; names the store.
    class_codes : sequence of str
        The card's classes, in the order of ``probabilities`` and ``top_class``.
    crop_size : int
        Height and width of the crops and saliency maps, in pixels.
    attrs : mapping
        Initial attributes, JSON-serialisable: at least ``slide``, ``classifier`` and
        ``parameters`` (see docs/outputs.md).

    Notes
    -----
    Use it as a context manager: leaving the block by an exception deletes the temporary store.
    """

    def __init__(
        self,
        out_dir: str | Path,
        slide_stem: str,
        class_codes: Sequence[str],
        crop_size: int,
        attrs: Mapping[str, Any],
    ):
        missing = {"slide", "classifier", "parameters"} - set(attrs)
        if missing:
            raise ValueError(f"store attrs lack {', '.join(sorted(missing))}")
        self.final_path = store_path(out_dir, slide_stem)
        self.path = self.final_path.with_name(f".{self.final_path.name}{_PARTIAL_SUFFIX}")
        self.class_codes = tuple(class_codes)
        self.crop_size = int(crop_size)
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)  # left by a killed run
        self._root = zarr.open_group(self.path, mode="w", zarr_format=3)
        self._root.attrs.update(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "status": "incomplete",
                "class_codes": list(self.class_codes),
                "software": software_versions(),
                "timings": {},
                **attrs,
            }
        )
        self._create_arrays()
        self._pending: list[tuple[dict[str, NDArray], NDArray[np.uint8] | None]] = []
        self._pending_cells = 0
        self._written_cells = 0
        self._without_crops = False
        self._committed = False

    def _create_arrays(self) -> None:
        size = self.crop_size
        # Handles kept for appending: looking an array up reads its metadata from disk. No chunk
        # of cells or crops is empty, so zarr need not compare each with the fill value.
        n_classes = len(self.class_codes)
        self._cell_arrays = {
            field.name: self._root.create_array(
                f"cells/{field.name}",
                shape=(0, *field.shape_tail(n_classes)),
                chunks=(
                    CELL_CHUNK // max(1, int(np.prod(field.shape_tail(n_classes)))),
                    *field.shape_tail(n_classes),
                ),
                dtype=field.dtype,
                config=_ALWAYS_WRITTEN,
            )
            for field in CELL_FIELDS
        }
        self._crops = self._root.create_array(
            "crops",
            shape=(0, size, size, 3),
            chunks=(CROP_CHUNK, size, size, 3),
            dtype="uint8",
            compressors=CROP_COMPRESSOR,
            config=_ALWAYS_WRITTEN,
        )
        self._root.create_array(
            "saliency/cell_index", shape=(0,), chunks=(CELL_CHUNK,), dtype="int64"
        )
        for method in SALIENCY_METHODS:
            self._root.create_array(
                f"saliency/{method}",
                shape=(0, size, size),
                chunks=(CROP_CHUNK, size, size),
                dtype="float32",
            )
        self._root.create_group("mosaics")

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

    @property
    def n_cells(self) -> int:
        """Cells appended so far (some may still wait in memory for the next write)."""
        return self._written_cells + self._pending_cells

    def append_cells(
        self, cells: Mapping[str, NDArray], crops: NDArray[np.uint8] | None = None
    ) -> None:
        """Append a batch of classified cells and their crops.

        The batch holds every field of the cell table, with the dtypes and shapes declared in
        :mod:`wsi_pipeline.core.schema` (anything else raises :class:`SchemaError`).

        Parameters
        ----------
        cells : mapping of str to ndarray
            One batch of the cell table; all columns have the same length.
        crops : (n, H, W, 3) uint8, optional
            The batch's crops, in the same order; omit it for a store without crops (every batch
            must then omit it).
        """
        columns = {name: np.asarray(values) for name, values in cells.items()}
        n = check_columns(columns, len(self.class_codes), required=field_names())
        if crops is not None and crops.shape != (n, self.crop_size, self.crop_size, 3):
            raise ValueError(f"crops have shape {crops.shape} for {n} cells")
        if self.n_cells and (crops is None) != self._without_crops:
            raise ValueError("either every batch of cells has crops or none has")
        self._without_crops = crops is None
        self._pending.append((columns, None if crops is None else np.asarray(crops, np.uint8)))
        self._pending_cells += n
        if self._pending_cells >= FLUSH_CELLS:
            self._flush(whole_chunks=True)

    def _flush(self, whole_chunks: bool = False) -> None:
        """Write the cells held in memory; with ``whole_chunks``, only whole crop chunks."""
        total = self._pending_cells
        n = total - (total % CROP_CHUNK if whole_chunks else 0)
        if n == 0:
            return
        columns = {
            name: np.concatenate([part[name] for part, _ in self._pending])
            for name in self._cell_arrays
        }
        crops = None if self._without_crops else np.concatenate([c for _, c in self._pending])
        for name, values in columns.items():
            self._cell_arrays[name].append(values[:n])
        if crops is not None:
            self._crops.append(crops[:n])
        rest = (
            {name: values[n:] for name, values in columns.items()},
            None if crops is None else crops[n:],
        )
        self._pending = [rest] if n < total else []
        self._pending_cells = total - n
        self._written_cells += n

    def read_rows(self, start: int, stop: int) -> dict[str, NDArray]:
        """Every ``cells/*`` column of the cells ``start`` to ``stop`` appended so far."""
        self._flush()
        return {
            field.name: np.asarray(array_at(self._root, f"cells/{field.name}")[start:stop])
            for field in CELL_FIELDS
        }

    def read_columns(self, *names: str) -> tuple[NDArray, ...]:
        """Whole ``cells/*`` columns appended so far (small ones: class, confidence, ...)."""
        self._flush()
        return tuple(np.asarray(array_at(self._root, f"cells/{name}")[:]) for name in names)

    def append_saliency(self, cell_index: NDArray[np.integer], maps: Mapping[str, NDArray]) -> None:
        """Append raw saliency maps of the cells ``cell_index`` (rows of ``cells/*``).

        Parameters
        ----------
        cell_index : (m,) int
        maps : mapping of method name to (m, H, W) float
            ``gradcam`` and/or ``smoothgrad``; a method computed at all must be given every time.
        """
        index = np.asarray(cell_index, dtype=np.int64)
        expected = (len(index), self.crop_size, self.crop_size)
        for method, values in maps.items():
            if method not in SALIENCY_METHODS:
                raise ValueError(f"unknown saliency method {method!r}; expected {SALIENCY_METHODS}")
            if np.shape(values) != expected:
                raise ValueError(
                    f"saliency/{method} has shape {np.shape(values)}, expected {expected}"
                )
        array_at(self._root, "saliency/cell_index").append(index)
        for method, values in maps.items():
            array_at(self._root, f"saliency/{method}").append(np.asarray(values, dtype=np.float32))

    def write_mosaic(self, class_code: str, image: NDArray[np.uint8]) -> None:
        """Store the saliency mosaic of one class as ``mosaics/<class_code>`` (h, w, 3) uint8."""
        self._root.create_array(
            f"mosaics/{class_code}", data=np.asarray(image, dtype=np.uint8), overwrite=True
        )

    def write_image(self, name: str, image: NDArray[np.uint8], pixel_um: float) -> None:
        """Store an RGB image as the OME-Zarr (NGFF 0.5) multiscale group ``images/<name>``,
        for napari and other NGFF viewers (:mod:`wsi_pipeline.results.ngff`)."""
        write_multiscale(self._root, f"images/{name}", image, pixel_um)

    def write_counts(self, result: Differential) -> None:
        """Store the differential: group ``counts`` and the root attribute ``counts``.

        ``counts/count`` (int64, -1 = not assessable) and ``counts/percent`` (float64, NaN = not
        assessable or undefined) follow the order of the group attribute ``codes``.
        """
        document = result.as_dict()
        rows = result.classes + result.not_counted
        count = np.array([-1 if r.count is None else r.count for r in rows], dtype=np.int64)
        percent = np.array([np.nan if r.percent is None else r.percent for r in rows])
        group = self._root.require_group("counts")
        group.attrs.update({"codes": [r.key for r in rows], "differential": document})
        group.create_array("count", data=count, overwrite=True)
        group.create_array("percent", data=percent, overwrite=True)
        self._root.attrs["counts"] = document

    def update_attrs(self, **attrs: Any) -> None:
        """Add or replace root attributes (JSON-serialisable values)."""
        self._root.attrs.update(attrs)

    def _check_complete(self) -> None:
        self._flush()
        n = self.n_cells
        crops = array_at(self._root, "crops").shape[0]
        if crops not in (0, n):
            raise ValueError(f"{crops} crops for {n} cells")
        m = array_at(self._root, "saliency/cell_index").shape[0]
        for method in SALIENCY_METHODS:
            rows = array_at(self._root, f"saliency/{method}").shape[0]
            if rows not in (0, m):
                raise ValueError(f"saliency/{method} has {rows} maps for {m} cell indices")
        if "counts" not in self._root.attrs:
            raise ValueError("the differential was not written (write_counts)")

    def commit(self, timings: Mapping[str, float] | None = None) -> Path:
        """Mark the store complete and move it to its final name, replacing an older store.

        Parameters
        ----------
        timings : mapping of stage name to seconds, optional

        Returns
        -------
        Path
            ``<out>/<slide-stem>.zarr``.
        """
        self._check_complete()
        self._root.attrs.update(
            {"timings": dict(timings or {}), "n_cells": self.n_cells, "status": "complete"}
        )
        old = self.final_path.with_name(f".{self.final_path.name}{_OLD_SUFFIX}")
        shutil.rmtree(old, ignore_errors=True)
        if self.final_path.exists():
            self.final_path.rename(old)
        self.path.rename(self.final_path)
        shutil.rmtree(old, ignore_errors=True)
        self._committed = True
        return self.final_path

    def abort(self) -> None:
        """Delete the temporary store."""
        shutil.rmtree(self.path, ignore_errors=True)
