"""The one exception type the command line turns into a one-line message and exit code 2."""

from __future__ import annotations

import os
from pathlib import Path


class InputError(Exception):
    """Bad input the user can fix; ``str()`` is one line naming the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str):
        self.path = Path(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{path}: {self.problem}")


class SlideError(InputError):
    """A slide that cannot be opened or read; ``str()`` is one line naming the file."""
