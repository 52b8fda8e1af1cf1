"""Factored SVD (QR of the factors + small core SVD) against dense SVD of ΔW.

All modules of a synthetic SDXL rank-64 kohya LoRA (real module names and
shapes, UNet attention + both text encoders), written to disk and read back
with core.formats.load_lora. The factored SVD runs on every module, with 1 and
with 2 torch threads (on every 5th module). The dense SVD runs on a few modules of each distinct
shape and is extrapolated by module count (printed as such), unless --full-dense.

    python bench/bench_factored_svd.py [--rank 64] [--dense-per-shape 1] [--full-dense] [--thread-stride 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from core.device import linalg_threads  # noqa: E402
from core.factored import dense_svd, modules_svd, svd_from_factors  # noqa: E402
from core.formats import load_lora  # noqa: E402
from core.save import save_kohya  # noqa: E402
from core.synthetic import random_lora  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def factored_all(modules, threads):
    with linalg_threads(threads):
        return [svd_from_factors(m.up, m.down, m.scale) for m in modules]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dense-per-shape", type=int, default=1,
                        help="dense SVDs measured per distinct shape (default 1)")
    parser.add_argument("--full-dense", action="store_true", help="dense SVD of every module (slow)")
    parser.add_argument("--thread-stride", type=int, default=5,
                        help="1- vs 2-thread timing on every Nth module (default 5)")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    lora = random_lora("sdxl", rank=args.rank, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sdxl_rank64.safetensors")
        t_save, _ = timed(lambda: save_kohya(lora, path))
        size = os.path.getsize(path)
        t_load, lora = timed(lambda: load_lora(path))
    modules = list(lora.modules.values())
    print(f"synthetic SDXL kohya LoRA: {len(modules)} modules ({lora.parts()}), rank {args.rank}, "
          f"{size / 2**20:.0f} MiB; save {t_save:.2f} s, load_lora {t_load:.2f} s")

    t_f1, fact = timed(lambda: modules_svd(modules, device="cpu"))   # module_svd: 1 thread on CPU
    print(f"factored SVD, all {len(modules)} modules: {t_f1:.2f} s (modules_svd, 1 thread)")
    subset = modules[::args.thread_stride]
    t_s1, _ = timed(lambda: factored_all(subset, 1))
    t_s2, _ = timed(lambda: factored_all(subset, 2))
    t_s1b, _ = timed(lambda: factored_all(subset, 1))
    print(f"threads, factored SVD of every {args.thread_stride}th module ({len(subset)}): "
          f"1 thread {t_s1:.2f} s / {t_s1b:.2f} s (before/after), 2 threads {t_s2:.2f} s")

    by_shape = defaultdict(list)
    for i, m in enumerate(modules):
        by_shape[(m.d_out, m.d_in)].append(i)
    print(f"\n{'shape':>12} {'count':>5} {'factored/module':>16} {'dense/module':>13} {'ratio':>7} {'max σ rel.err':>14}")
    dense_total = factored_total = 0.0
    measured = 0
    for shape, idx in sorted(by_shape.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
        take = idx if args.full_dense else idx[:args.dense_per_shape]
        with linalg_threads(1):
            t_fact = min(timed(lambda: svd_from_factors(modules[i].up, modules[i].down, modules[i].scale))[0]
                         for i in take)
            dense_times, err = [], 0.0
            for i in take:
                t, ref = timed(lambda: dense_svd(modules[i]))
                dense_times.append(t)
                k = ref.S.numel()
                err = max(err, float(((fact[i].S[:k] - ref.S) / ref.S[0]).abs().max()))
        per_dense = sum(dense_times) / len(dense_times)
        measured += len(take)
        dense_total += per_dense * len(idx)
        factored_total += t_fact * len(idx)
        print(f"{shape[0]:>5}×{shape[1]:<6} {len(idx):>5} {t_fact * 1e3:>13.2f} ms {per_dense:>11.3f} s "
              f"{per_dense / t_fact:>6.0f}× {err:>14.1e}")
    label = "measured" if args.full_dense else (f"EXTRAPOLATED from {measured} measured modules "
                                                f"({args.dense_per_shape} per shape) × module count")
    print(f"\ndense SVD, all {len(modules)} modules: {dense_total:.1f} s ({label}, 1 thread)")
    print(f"factored SVD, all {len(modules)} modules: {t_f1:.2f} s (measured, 1 thread)")
    print(f"ratio dense / factored: {dense_total / t_f1:.0f}×")
    print(f"threads ({len(subset)} modules): 2 threads took {t_s2 / min(t_s1, t_s1b):.1f}× the 1-thread time")
    if torch.cuda.is_available():
        modules_svd(modules[:8], device="cuda")  # warm-up
        torch.cuda.synchronize()
        t_gpu, _ = timed(lambda: (modules_svd(modules, device="cuda"), torch.cuda.synchronize()))
        print(f"factored SVD on CUDA (batched by shape): {t_gpu:.2f} s")


if __name__ == "__main__":
    main()
