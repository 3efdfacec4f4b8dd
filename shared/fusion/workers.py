"""The fusion's worker threads: sites summed and solved side by side (driver.py), a statistics file written by
several threads (tensor_file.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

# Sites are independent sums, so a concept's sites are taken in (and a stage's sites solved) by this many threads at
# once: the block products, copies and Cholesky factorisations are torch ops that release the GIL, and each runs on
# one intra-op thread (torch's own setting), so two workers use the two cores of the machine the intake was sized on
# (docs/figures.md, "Fusion at scale"). Each site's sum still takes its concepts one at a time, in order: the sums
# are the same bits as with one worker.
WORKERS = 2

T = TypeVar("T")
U = TypeVar("U")


def in_parallel(fn: Callable[[T], U], items: Iterable[T], workers: int = WORKERS) -> list[U]:
    """[fn(x) for x in items] on `workers` threads, results in order; every call finishes before the first error
    (if any) is raised, so the caller knows nothing is still running."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="mos-fusion") as pool:
        futures = [pool.submit(fn, x) for x in items]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]
    return [f.result() for f in futures]
