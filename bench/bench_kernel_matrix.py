"""Kernel matrix of N synthetic SD1.5 LoRAs: our way against the naive way, in one run.

Ours (core.kernel_matrix): one factored SVD per LoRA per module, one Gram
matrix of the stacked bases per module, all pairs at once.
Naive: for every pair and every module, form both ΔW, take dense SVDs, keep the
top-r vectors, principal cosines, kernel. Running it for all pairs would take
days, so it is timed on one pair for every distinct module shape and
extrapolated (clearly labelled) to all pairs × modules.

    python bench/bench_kernel_matrix.py [--n 50] [--rank 32] [--modules 0] [--device cpu]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.device import linalg_threads  # noqa: E402
from core.factored import dense_svd  # noqa: E402
from core.grassmann import principal_cosines  # noqa: E402
from core.kernel_matrix import kernel_matrix_from_statistics, pair_statistics  # noqa: E402
from core.kernels import make_kernel  # noqa: E402
from core.sdarch import arch_for  # noqa: E402
from core.synthetic import module_names, random_lora  # noqa: E402


def library(n: int, rank: int, names: list[str]):
    """fp16 factors like most published LoRAs (and half the memory)."""
    return [random_lora("sd1", rank, seed=i, names=names, dtype=torch.float16,
                        path=f"lora{i:03d}.safetensors") for i in range(n)]


def ours(loras, device, threads, kernel):
    t0 = time.perf_counter()
    stats = pair_statistics(loras, "out", device=device, threads=threads)
    t1 = time.perf_counter()
    km = kernel_matrix_from_statistics(stats, kernel)
    t2 = time.perf_counter()
    return km, t1 - t0, t2 - t1


def naive_pair_module(a, b, kernel):
    """Dense ΔW and full SVDs of both, top-r left singular vectors, cosines, kernel."""
    fa, fb = dense_svd(a), dense_svd(b)
    return float(kernel.from_cosines(principal_cosines(fa.U, fb.U)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--modules", type=int, default=0, help="first K attention modules (0: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--thread-probe", type=int, default=24,
                    help="modules used to compare 1 and 2 torch threads (0: skip)")
    args = ap.parse_args()

    names = module_names("sd1", limit=args.modules or None)
    shapes = Counter((s[0], math.prod(s[1:])) for s in (arch_for("sd1").shapes[n] for n in names))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available, device {args.device}")
    print(f"N = {args.n} synthetic SD1.5 LoRAs, rank {args.rank}, {len(names)} attention/TE modules "
          f"({len(shapes)} distinct shapes), output side, kernel projection-rbf β=1")
    t = time.perf_counter()
    loras = library(args.n, args.rank, names)
    print(f"generated in {time.perf_counter() - t:.1f} s")
    kernel = make_kernel("projection-rbf", beta=1.0)

    if args.thread_probe and args.device == "cpu":
        probe = names[:args.thread_probe]
        sub = [type(lo)(lo.path, lo.format, lo.family, {k: lo.modules[k] for k in probe}) for lo in loras]
        for threads in (1, 2):
            _, t_stats, _ = ours(sub, args.device, threads, kernel)
            print(f"thread probe ({len(probe)} modules): torch threads={threads}: {t_stats:.2f} s")

    km, t_stats, t_kernel = ours(loras, args.device, 1, kernel)
    pairs = args.n * (args.n - 1) // 2
    total = t_stats + t_kernel
    print(f"ours: full {args.n}×{args.n} matrix in {total:.2f} s "
          f"(factored SVDs + Gram statistics {t_stats:.2f} s, kernel + aggregation {t_kernel:.3f} s; "
          f"{1e3 * total / pairs:.1f} ms per pair); min eigenvalue {km.min_eigenvalue:.3g}")
    if args.skip_naive:
        return

    # naive: one pair, one module of every distinct shape, then extrapolate
    per_shape = {}
    a, b = loras[0], loras[1]
    with linalg_threads(1):
        for name in names:
            m = a.modules[name]
            key = (m.d_out, m.d_in)
            if key in per_shape:
                continue
            t = time.perf_counter()
            value = naive_pair_module(m, b.modules[name], kernel)
            per_shape[key] = time.perf_counter() - t
            members, values = km.module_kernel(name, "out")
            assert abs(values[0, 1] - value) < 1e-6 * max(1.0, abs(value)), (name, value, values[0, 1])
            print(f"  naive, one pair, {key[0]}×{key[1]} ({shapes[key]} module(s)): {per_shape[key]:.3f} s")
    per_pair = sum(per_shape[s] * c for s, c in shapes.items())
    naive_total = per_pair * pairs
    print(f"naive (EXTRAPOLATED from one pair per distinct shape): {per_pair:.1f} s per pair × "
          f"{pairs} pairs = {naive_total:.0f} s ({naive_total / 3600:.1f} h)")
    print(f"ratio naive / ours: {naive_total / total:.0f}×")


if __name__ == "__main__":
    main()
