"""Device choice and thread settings for the small dense linear algebra we do.

torch's p×p SVDs and thin QRs were 5–100× slower with 2 intra-op threads than
with one on the 2-core machines we measured, so heavy loops run inside
``linalg_threads(1)``; the process-wide setting is always restored, because
inside ComfyUI it belongs to the host.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

from .errors import LoraError


def default_device() -> torch.device:
    """CUDA when present unless GRASSMANN_LORA_DEVICE says otherwise."""
    wanted = os.environ.get("GRASSMANN_LORA_DEVICE")
    if wanted:
        return check_device(wanted, "GRASSMANN_LORA_DEVICE")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(wanted, origin: str = "device") -> torch.device:
    """The torch device asked for, or a one-line LoraError when this torch
    cannot use it (a typo, CUDA absent or a GPU index beyond the count, a kind
    the float64 linear algebra does not run on) instead of torch's traceback."""
    try:
        dev = torch.device(wanted)
    except (RuntimeError, TypeError, ValueError):
        raise LoraError(f"unknown torch device '{wanted}' ({origin}; use cpu or cuda)") from None
    if dev.type not in ("cpu", "cuda"):
        raise LoraError(f"device '{wanted}' ({origin}) is not supported: use cpu or cuda")
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA"
        raise LoraError(f"device '{wanted}' ({origin}) is not available: this torch sees {found}")
    return dev


@contextlib.contextmanager
def linalg_threads(n: int | None = 1):
    """Temporarily set torch's intra-op threads (CPU only); restores on exit."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    if before == n:                  # already pinned (nested, or a worker): nothing to do
        yield
        return
    default = pin_this_thread(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if before != default:
            in_new_thread(torch.set_num_threads, default)


def pin_this_thread(n: int, default: int | None = None) -> int:
    """torch.set_num_threads(n) for the calling thread only; returns the count
    threads started from now on take (`default` when the caller knows it).
    torch's call also sets that count, process-wide: a host thread started while
    we run pinned (A1111 serves a request on a new worker thread) would keep n
    for good. So a throw-away thread reads it first and sets it back after (the
    call changes that thread's own count too, which dies with it)."""
    torch.get_num_threads()          # a thread takes the default at its first torch call: now, not later
    if default is None:
        default = in_new_thread(torch.get_num_threads)
    torch.set_num_threads(n)
    in_new_thread(torch.set_num_threads, default)
    return default


def in_new_thread(fn, *args):
    """fn(*args) in a thread of its own (torch's per-thread state stays there)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    t.join()
    return out[0]
