"""Ordered, bounded read-ahead over a thread pool (the converters' reading and dequantising).

Results come back in input order; work runs ahead only while the items in flight stay under
a byte budget, so memory is bounded by the budget plus the largest item. The workers spend
their time in the kernel (reads) and in numpy loops, which release the GIL.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Threads for read + transform: the CPUs this process may use, at least 2 (so reading
    overlaps computing even on one core)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(2, n)


def ordered_map(fn: Callable[[T], R], items: Iterable[tuple[T, int]], *,
                budget_bytes: int, workers: int | None = None) -> Iterator[R]:
    """`fn(item)` for each (item, nbytes) of `items`, yielded in order, computed ahead by
    `workers` threads while the bytes of the items in flight stay <= `budget_bytes` (one item
    always runs, however large). Closing the iterator early cancels what has not started."""
    pool = concurrent.futures.ThreadPoolExecutor(workers or default_workers(),
                                                 thread_name_prefix="mimo-convert")
    pending: collections.deque = collections.deque()
    source = iter(items)
    held = 0
    try:
        nxt = next(source, None)
        while nxt is not None or pending:
            while nxt is not None and (not pending or held + nxt[1] <= budget_bytes):
                pending.append((pool.submit(fn, nxt[0]), nxt[1]))
                held += nxt[1]
                nxt = next(source, None)
            future, nbytes = pending.popleft()
            result = future.result()
            held -= nbytes
            yield result
    finally:
        for future, _ in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
