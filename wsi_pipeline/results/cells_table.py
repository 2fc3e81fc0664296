"""The cell table as one Parquet file per slide, for pandas, R (arrow) or any dataframe tool.

``<slide-stem>.cells.parquet`` holds one row per cell and one column per field of the cell-table
schema (:data:`~wsi_pipeline.core.schema.CELL_FIELDS`), flattened so that a dataframe reads it
without unpacking: a per-class field becomes one column per class (``probabilities_BLA``, ...),
an outline a list of ``[x, y]`` vertices. Two columns say what the differential made of the cell:
``class`` (the MLL code of its top class) and ``certain`` (assigned to it, not counted as
uncertain, by :func:`~wsi_pipeline.results.counts.certain`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from wsi_pipeline.core.files import PendingFile
from wsi_pipeline.core.schema import CELL_FIELDS
from wsi_pipeline.results.counts import certain

__all__ = ["ROWS_PER_GROUP", "cells_record_batch", "write_cells_parquet"]

#: Cells per Parquet row group: also how many are held in memory at once.
ROWS_PER_GROUP = 65_536


def cells_record_batch(
    columns: Mapping[str, NDArray],
    class_codes: Sequence[str],
    threshold: float,
    min_agreement: float,
) -> pa.RecordBatch:
    """One batch of the cell table (every schema field) as flat Arrow columns."""
    arrays: dict[str, pa.Array] = {}
    for field in CELL_FIELDS:
        values = np.asarray(columns[field.name])
        if field.tail == ("classes",):
            for k, code in enumerate(class_codes):
                arrays[f"{field.name}_{code}"] = pa.array(values[:, k])
        elif values.ndim > 1:  # a box (n, 4) or an outline (n, vertices, 2): nested lists
            nested = pa.array(values.reshape(-1))
            for size in reversed(values.shape[1:]):
                nested = pa.FixedSizeListArray.from_arrays(nested, size)
            arrays[field.name] = nested
        else:
            arrays[field.name] = pa.array(values)
    top = np.asarray(columns["top_class"])
    arrays["class"] = pa.array(np.asarray(class_codes)[top])
    arrays["certain"] = pa.array(
        certain(
            columns["confidence"],
            columns["agreement"],
            threshold,
            min_agreement,
            columns.get("novelty"),
        )
    )
    return pa.RecordBatch.from_pydict(arrays)


def write_cells_parquet(
    path: str | Path,
    read_rows: Callable[[int, int], Mapping[str, NDArray]],
    n_cells: int,
    class_codes: Sequence[str],
    *,
    threshold: float,
    min_agreement: float,
) -> Path:
    """Write ``n_cells`` cells, read ``ROWS_PER_GROUP`` at a time by ``read_rows(start, stop)``,
    to a Parquet file published atomically at ``path``."""
    pending = PendingFile(path)
    try:
        first = cells_record_batch(read_rows(0, min(n_cells, ROWS_PER_GROUP)), class_codes,
                                   threshold, min_agreement)  # fmt: skip
        with pq.ParquetWriter(pending.temp, first.schema, compression="zstd") as out:
            out.write_batch(first)
            for start in range(ROWS_PER_GROUP, n_cells, ROWS_PER_GROUP):
                rows = read_rows(start, min(n_cells, start + ROWS_PER_GROUP))
                out.write_batch(cells_record_batch(rows, class_codes, threshold, min_agreement))
    except BaseException:
        pending.abort()
        raise
    return pending.commit()
