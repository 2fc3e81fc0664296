"""Files: the data folders shipped with the package, atomic publication, checksums.

Every output of the package (stores aside, which are folders: see
:mod:`wsi_pipeline.results.store`) is written under a hidden, unique temporary name beside its
final path and renamed into place only once it is whole, so a killed run never leaves a file
that looks complete, and two runs never write into each other's temporary files.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DATA_FOLDERS", "PendingFile", "atomic_path", "data_path", "file_sha256"]

DATA_FOLDERS = ("classifiers", "workflows")
#: Permissions of a published file: mkstemp makes files private, these are shared outputs.
_PUBLISHED_MODE = 0o644


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
        Path(__file__).resolve().parents[2] / name,  # source checkout or editable install
        Path(sys.prefix) / "share" / "wsi-pipeline" / name,  # wheel install (data-files)
    )
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"the {name}/ folder of wsi-pipeline is missing; looked in {candidates}"
    )


class PendingFile:
    """A file written under a hidden, unique temporary name and published by :meth:`commit`.

    Parameters
    ----------
    path : path
        The final name; its folder is created if need be.

    Attributes
    ----------
    path : Path
        The final name.
    temp : Path
        The temporary name beside it (``.<name>.<pid>.<random>.partial``), created empty.

    Notes
    -----
    Temporary files of the same final name left by processes that no longer run (a killed run)
    are deleted first; those of live processes are left alone, so concurrent runs never delete
    each other's work.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(self.path)
        fd, name = tempfile.mkstemp(
            prefix=f".{self.path.name}.{os.getpid()}.", suffix=".partial", dir=self.path.parent
        )
        os.close(fd)
        self.temp = Path(name)

    def commit(self) -> Path:
        """Rename the temporary file onto :attr:`path`, replacing what was there."""
        os.chmod(self.temp, _PUBLISHED_MODE)
        os.replace(self.temp, self.path)
        return self.path

    def abort(self) -> None:
        """Delete the temporary file."""
        self.temp.unlink(missing_ok=True)


def _remove_orphans(path: Path) -> None:
    """Delete temporary files of ``path`` whose writing process has ended."""
    for temp in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        pid = temp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            temp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``, renamed onto it only if the block succeeds.

    Examples
    --------
    >>> with atomic_path(folder / "table.csv") as temp:  # doctest: +SKIP
    ...     temp.write_text(text)
    """
    pending = PendingFile(path)
    try:
        yield pending.temp
        pending.commit()
    finally:
        pending.abort()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
