"""Work computed ahead of its consumer on a thread pool, handed over in order."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["prefetch"]

T = TypeVar("T")
R = TypeVar("R")


def prefetch(
    fn: Callable[[T], R],
    items: Iterable[T],
    depth: int = 2,
    on_ahead: Callable[[], Any] | None = None,
    workers: int = 1,
) -> Iterator[R]:
    """``map(fn, items)`` computed up to ``depth`` items ahead on ``workers`` threads, in order.

    Each thread takes the next item as soon as its last is done. ``on_ahead`` runs once on a
    pool thread, after the items in progress, the first time all ``depth`` items are ready
    before they are asked for: from then on the consumer, not ``fn``, sets the pace. The
    threads end, and every item in progress with them, before the iterator does (also when it
    is closed early).
    """
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > depth:
                if on_ahead is not None and all(f.done() for f in list(pending)[:-1]):
                    pool.submit(on_ahead)
                    on_ahead = None
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
