"""Process tuning for a run: malloc reuse, thread priority and OpenCV's threads (Linux-first;
elsewhere each is a no-op)."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import cv2

__all__ = [
    "keep_opencv_on_this_thread",
    "lower_own_priority",
    "restoring_opencv_threads",
    "tune_malloc",
]

#: Niceness added to the writing thread, which compresses and encodes in the time the
#: classifier leaves.
BACKGROUND_NICENESS = 10
#: Free memory a malloc heap keeps for reuse rather than giving it back (see :func:`tune_malloc`).
MALLOC_KEEP_MB = 512
#: glibc's ``mallopt`` parameters: the free memory kept at a heap's top, the most blocks mapped
#: on their own, the most arenas.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def lower_own_priority(step: int = BACKGROUND_NICENESS) -> None:
    """Add ``step`` to the calling thread's niceness, up to 19 (Linux only; elsewhere, or if
    refused, nothing changes)."""
    if sys.platform.startswith("linux"):
        thread_id = threading.get_native_id()
        with suppress(OSError):
            now = os.getpriority(os.PRIO_PROCESS, thread_id)
            os.setpriority(os.PRIO_PROCESS, thread_id, min(19, now + step))


def tune_malloc(arenas: int | None = None) -> None:
    """Make glibc's malloc reuse memory from batch to batch (Linux with glibc only; elsewhere
    nothing changes).

    * Large blocks come from the malloc heaps. By default glibc maps each block above a
      threshold (128 KB, rising to at most 32 MB) on its own and unmaps it when it is freed, so
      every batch's activations are faulted in and zeroed by the kernel again. On 2 cores the
      classifier spent about as long in the kernel as in its own code (6.4 s against 7.3 s for
      2,048 crops); with the memory kept, 0.1-0.8 s, and it classifies 1.7 times as many cells
      a second. Detection's arrays were reused already: its CPU time is the same either way.
    * Up to :data:`MALLOC_KEEP_MB` of free memory stays at the top of a heap for the next batch
      instead of going back to the system.
    * Threads started from now on share at most ``arenas`` arenas (default: one per core).
      glibc gives threads that allocate at the same time arenas of their own, up to eight per
      core, and an arena keeps the free memory of its busiest moment. The pipeline's reading,
      classifying and writing threads then hold several such peaks at once, and the free memory
      grows as the run goes on (60000² slide: 880 MB free inside the arenas at the end of a run,
      390 MB with one arena per core, at the same speed).
    """
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            mallopt = ctypes.CDLL("libc.so.6").mallopt
            mallopt(_M_MMAP_MAX, 0)
            mallopt(_M_TRIM_THRESHOLD, MALLOC_KEEP_MB << 20)
            mallopt(_M_ARENA_MAX, arenas or os.cpu_count() or 1)


def keep_opencv_on_this_thread() -> None:
    """Run OpenCV on the calling thread alone (a process-wide setting), once detection is ahead
    of the classifier: OpenCV's own worker threads wait actively between calls, so they would
    take CPU from the classifier for little gain."""
    cv2.setNumThreads(1)


@contextmanager
def restoring_opencv_threads() -> Iterator[None]:
    """Restore OpenCV's thread count (process-wide) when the block ends."""
    threads = cv2.getNumThreads()
    try:
        yield
    finally:
        cv2.setNumThreads(threads)
