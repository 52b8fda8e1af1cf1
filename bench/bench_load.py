"""load_lora against the raw read of the same file, in one run.

A synthetic SDXL kohya LoRA (real module names and shapes, fp16, UNet + both
text encoders) is written once; then, page cache warm, each is timed best of
--repeat: the raw read (every byte into memory), safetensors' own load_file
(tensors as stored), and core.formats.load_lora (checked, planned,
factors kept as stored). Prints seconds and the ratios to the raw read.

    python bench/bench_load.py [--rank 64] [--repeat 3] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from core.formats import load_lora  # noqa: E402
from core.save import save_kohya  # noqa: E402
from core.synthetic import random_lora  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def raw_read(path: str) -> None:
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = save_kohya(random_lora("sdxl", rank=args.rank, seed=0), os.path.join(folder, "sdxl.safetensors"),
                          dtype=torch.float16)
        size = os.path.getsize(path)
        raw_read(path)                                   # warm the page cache
        t_raw = best(lambda: raw_read(path), args.repeat)
        t_st = best(lambda: load_file(path), args.repeat)
        t_load = best(lambda: load_lora(path), args.repeat)
        lora = load_lora(path)
        print(f"SDXL rank {args.rank} fp16: {size / 1e9:.3f} GB, {len(lora.modules)} modules, "
              f"torch threads {torch.get_num_threads()}")
        print(f"  raw read          {t_raw:7.3f} s   1.0×")
        print(f"  safetensors load  {t_st:7.3f} s   {t_st / t_raw:5.1f}× the raw read")
        print(f"  load_lora         {t_load:7.3f} s   {t_load / t_raw:5.1f}× the raw read, "
              f"{t_load / t_st:4.1f}× safetensors")


if __name__ == "__main__":
    main()
