"""Modules in parallel on the CPU: one Python thread per core, each doing
single-threaded linear algebra.

The modules of a LoRA are independent, and torch releases the GIL inside its
kernels, so a pool of threads over modules uses every core without the
intra-op threads that make small factorisations 5–100× slower here
(core.device). Measured on 2 cores: whole-LoRA merges 1.85–2.0× faster with
2 workers (svd, ties, karcher), results bit-identical (each module is
computed by one thread, whatever the schedule).

Callers run the pool inside ``linalg_threads(1)``: OpenMP and MKL thread
counts are per thread, so each worker also sets its own to 1 when it starts
(core.device.pin_this_thread: threads the host starts meanwhile still take its count).
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from .device import in_new_thread, pin_this_thread
from .errors import LoraError

MAX_WORKERS = 8          # beyond this the GIL-held Python between kernels stops scaling

T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:       # macOS, Windows
        return os.cpu_count() or 1


def worker_count(requested: int | None, device: torch.device, threads: int | None = 1) -> int:
    """Threads over modules: `requested` (at least 1), else GRASSMANN_LORA_WORKERS
    (a host's cap, like GRASSMANN_LORA_DEVICE), else one per CPU up to
    MAX_WORKERS. Always 1 off the CPU (the GPU runs one stream of kernels) and
    when the caller's loop is not pinned to one torch thread (`threads` ≠ 1:
    a pool would reset the thread counts the caller asked for)."""
    if device.type != "cpu" or threads != 1:
        return 1
    if requested is None:
        env = os.environ.get("GRASSMANN_LORA_WORKERS", "").strip()
        if not env:
            return min(cpu_count(), MAX_WORKERS)
        if not env.isdigit() or int(env) < 1:
            raise LoraError(f"GRASSMANN_LORA_WORKERS must be a positive whole number, got '{env}'")
        requested = int(env)
    return max(1, int(requested))


@contextlib.contextmanager
def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[Iterator[R]]:
    """fn over items on `workers` threads; yields an iterator of the results in
    items' order (an item's exception is raised at its place). Leaving the
    block early (the caller stopped, e.g. cancelled from a progress callback)
    drops every item not yet started and waits for the running ones, so
    nothing runs on after the block. With one worker (or one item) fn runs
    in the calling thread."""
    items = list(items)
    if workers <= 1 or len(items) < 2:
        yield map(fn, items)
        return
    # each worker pins itself; threads started later still take the host's count
    pool = ThreadPoolExecutor(min(workers, len(items)), initializer=pin_this_thread,
                              initargs=(1, in_new_thread(torch.get_num_threads)))
    try:
        yield pool.map(fn, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
