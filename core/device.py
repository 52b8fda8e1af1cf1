"""Device choice and thread settings for the small dense linear algebra we do.

torch's p×p SVDs and thin QRs were 5–100× slower with 2 intra-op threads than
with one on the 2-core machines we measured, so heavy loops run inside
``linalg_threads(1)``; the process-wide setting is always restored, because
inside ComfyUI it belongs to the host.
"""
from __future__ import annotations

import contextlib
import os

import torch


def default_device() -> torch.device:
    """CUDA when present unless GRASSMANN_LORA_DEVICE says otherwise."""
    wanted = os.environ.get("GRASSMANN_LORA_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def linalg_threads(n: int | None = 1):
    """Temporarily set torch's intra-op threads (CPU only); restores on exit."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(before)
