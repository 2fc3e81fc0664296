"""Locate the data folders shipped with the package: ``classifiers/`` and ``workflows/``."""

from __future__ import annotations

import sys
from pathlib import Path

DATA_FOLDERS = ("classifiers", "workflows")


def data_path(name: str) -> Path:
    """Folder ``name`` from the source checkout, or where a wheel installed it.

    Parameters
    ----------
    name : {"classifiers", "workflows"}

    Returns
    -------
    Path
    """
    if name not in DATA_FOLDERS:
        raise ValueError(f"unknown data folder {name!r}; expected one of {DATA_FOLDERS}")
    candidates = (
        Path(__file__).resolve().parents[1] / name,  # source checkout or editable install
        Path(sys.prefix) / "share" / "wsi-pipeline" / name,  # wheel install (data-files)
    )
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"the {name}/ folder of wsi-pipeline is missing; looked in {candidates}"
    )
