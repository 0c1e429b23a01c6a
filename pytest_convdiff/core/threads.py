"""How many CPU threads one process of a run may use: the cores it may run on, shared among xdist workers.

Under ``pytest -n N`` each worker is a process that runs its own models. llama.cpp's thread pool and torch's
intra-op threads both wait for each other by spinning, so N workers each taking every core run N times as many
threads as there are cores and spend much of their time waiting on a descheduled peer. Each worker therefore
takes its share: ``cores // N`` (at least 1). xdist tells its workers (and the processes they start) how many
there are in ``PYTEST_XDIST_WORKER_COUNT``. A thread count the user sets (the llama.cpp ``n_threads`` option,
``OMP_NUM_THREADS`` for torch) always wins.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["cores", "default_threads", "map_ordered", "numpy_blas_alone", "workers"]

T = TypeVar("T")
R = TypeVar("R")


def cores() -> int:
    """The cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def workers() -> int:
    """How many xdist workers share this machine (1 outside xdist, or for a value that is not a count)."""
    try:
        return max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
    except ValueError:
        return 1


def default_threads() -> int:
    """This process's share of the cores."""
    return max(1, cores() // workers())


@contextlib.contextmanager
def numpy_blas_alone() -> Iterator[None]:
    """numpy's BLAS on one thread within the block. Its sums here are single passes that a second thread barely
    speeds up, while the quantiser's threads use every core; OpenBLAS's threads spin after each call and took
    cores from them (measured: the weights twin 1.09 x llama-quantize at 2 threads with one BLAS thread, 1.44
    with two). Needs ``threadpoolctl``; without it, nothing changes."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}
_POOL_NAME = "convdiff-chunks"


def map_ordered(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]`` on this process's share of the cores, in order. For the numpy work between two
    forward passes (summarising A's outputs chunk by chunk), when the cores the forward used would otherwise
    wait: numpy lets go of the GIL in its loops. Each item's result does not depend on the others, so the
    results are those of the serial loop; one thread (under ``pytest -n`` on two cores, say) runs it serially, and
    so does a call from one of the pool's own threads (which would otherwise wait on a pool it occupies)."""
    n = min(default_threads(), len(items))
    if n <= 1 or threading.current_thread().name.startswith(_POOL_NAME):
        return [fn(x) for x in items]
    with _lock:
        pool = _pools.get(n)
        if pool is None:
            pool = _pools[n] = ThreadPoolExecutor(n, thread_name_prefix=_POOL_NAME)
    return list(pool.map(fn, items))
