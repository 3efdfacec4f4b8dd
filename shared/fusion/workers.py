"""The fusion's worker threads: a concept's sites checked and summed, and a stage's sites solved, side by side
(driver.Fusion)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

# Sites are independent sums, so a concept's sites are taken in (and a stage's sites solved) by up to this many
# threads at once: the block products, copies, file writes and Cholesky factorisations release the GIL. Each site's
# sum still takes its concepts one at a time, in order: the sums are the same bits as with one worker.
WORKERS = 2


def default_workers() -> int:
    """The cores torch's own intra-op threads leave idle, up to WORKERS: 2 on the 2-core machine the intake was
    sized on with one torch thread (docs/figures.md, "Fusion at scale"); 1 where torch already spreads each op over
    every core (threads beyond the cores only compete for them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(WORKERS, cores // max(1, torch.get_num_threads())))


T = TypeVar("T")
U = TypeVar("U")


def in_parallel(fn: Callable[[T], U], items: Iterable[T], workers: int | None = None) -> list[U]:
    """[fn(x) for x in items] on `workers` threads (None: default_workers()), results in order; every call finishes
    before the first error (if any) is raised, so the caller knows nothing is still running."""
    items = list(items)
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="mos-fusion") as pool:
        futures = [pool.submit(fn, x) for x in items]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]
    return [f.result() for f in futures]
