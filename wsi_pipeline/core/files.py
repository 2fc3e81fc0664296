"""Files: the data folders shipped with the package, atomic publication, checksums.

Every output of the package (stores aside, which are folders: see
:mod:`wsi_pipeline.results.store`) is written under a hidden, unique temporary name beside its
final path and renamed into place only once it is whole, so a killed run never leaves a file
that looks complete, and two runs never write into each other's temporary files.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from wsi_pipeline.core.errors import InputError

__all__ = [
    "DATA_FOLDERS",
    "PendingFile",
    "atomic_path",
    "data_path",
    "exclusive_folder",
    "file_sha256",
]

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


#: Output folders this process holds, and how many times over.
_held: dict[Path, int] = {}
_held_lock = threading.Lock()


@contextlib.contextmanager
def exclusive_folder(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the output folder ``folder`` for this process alone while the block runs.

    Two runs writing into one folder would mix their outputs; the second is refused at once.
    The lock is an advisory ``flock`` on the folder itself (no file is written), released by
    the kernel when the process ends, however it ends. Within one process it is re-entrant:
    the command line takes it before loading anything, the runner it calls takes it again.
    Whoever takes it first deletes what killed runs left in the folder (hidden ``.partial``
    files and folders, stores moved aside): while the lock is held, nobody else is writing
    there.

    Raises
    ------
    InputError
        Another live process holds the folder.
    """
    folder = Path(folder).resolve()
    with _held_lock:
        reentered = folder in _held
        if reentered:
            _held[folder] += 1
    if reentered:
        try:
            yield folder
        finally:
            with _held_lock:
                _held[folder] -= 1
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise InputError(folder, f"cannot write into the output folder: {error.strerror}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                folder,
                "another wsi run is writing into this folder; wait for it or choose another --out",
            ) from None
        _remove_leftovers(folder)
        with _held_lock:
            _held[folder] = 1
        try:
            yield folder
        finally:
            with _held_lock:
                del _held[folder]
    finally:
        os.close(handle)  # releases the lock


def _remove_leftovers(folder: Path) -> None:
    for leftover in [*folder.glob(".*.partial"), *folder.glob(".*.old")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
