"""Karcher and svd merges (ours, from factors) against a dense-SVD svd merge.

Four synthetic SDXL rank-64 LoRAs (real module names and shapes: UNet
attention + both text encoders, 986 modules), merged at rank 64. The dense
baseline is what kohya's svd_merge_lora does: form Σ w_k ΔW_k in float32,
full SVD, keep the top 64. Ours work in float64 from the factors and include
the fidelity report.

By default every method runs on a sample of --per-shape modules of each
distinct shape and the whole-LoRA time is EXTRAPOLATED by module count (printed
as such); --full runs our merges on every module (the dense baseline stays
sampled unless --full-dense). The dense baseline runs with the same torch
thread count as ours (1 by default, --threads N for both), printed. Also
measured on a sample: 1 vs 2 torch threads, and the Karcher means looped vs
batched by shape.

Flop bound per shape (printed): a dense thin SVD of an m×n ΔW (m ≥ n) costs at
most ≈ 6mn² + 20n³ (Golub & Van Loan, R-SVD with U and V); ours must at least
triangularise the stacked factors, Householder QR of an m×R and an n×R matrix
(R = Σ r_k = 256 here): ≥ 2(m+n)R² − (4/3)R³. Their quotient bounds the speed-up
any factored svd merge can reach on that shape; where it is below 50×, 50× is
impossible there by flop count alone.

    python bench/bench_merge.py [--per-shape 2] [--related EPS] [--full] [--full-dense]
                                [--device cuda] [--max-iter 50]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from core.device import linalg_threads  # noqa: E402
from core.lora import LoraFile  # noqa: E402
from core.merge import merge  # noqa: E402
from core.synthetic import perturbed_lora, random_lora  # noqa: E402

RANK = 64
WEIGHTS = [0.25, 0.25, 0.25, 0.25]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def subset(loras: list[LoraFile], names: list[str]) -> list[LoraFile]:
    return [LoraFile(l.path, l.format, l.family, {n: l.modules[n] for n in names}) for l in loras]


def dense_svd_merge(loras: list[LoraFile], names: list[str], device) -> dict[str, float]:
    """Per-module seconds of the dense baseline (float32, like svd_merge_lora)."""
    times = {}
    for name in names:
        def one():
            total = sum(w * l.modules[name].scale * (l.modules[name].up.to(device) @ l.modules[name].down.to(device))
                        for l, w in zip(loras, WEIGHTS))
            u, s, vh = torch.linalg.svd(total, full_matrices=False)
            out = (u[:, :RANK] * s[:RANK], vh[:RANK])
            sync(device)
            return out
        times[name] = timed(one)[0]
    return times


def our_merge(loras, names, method, device, **kw):
    sync(device)
    t, res = timed(lambda: (merge(subset(loras, names), WEIGHTS, method=method, rank=RANK,
                                  device=device, **kw), sync(device))[0])
    return t, res


def iteration_stats(res) -> str:
    its = [s["iterations"] for m in res.report.modules if m.karcher for s in m.karcher.values()]
    k = res.report.summary()["karcher"]
    return (f"Karcher gradient evaluations per module side: mean {sum(its) / len(its):.1f}, max {max(its)}; "
            f"not converged {k['not_converged']}, not unique {k['not_unique']} of {len(res.report.modules)} "
            f"modules; largest source-to-mean angle {k['max_angle_deg']:.0f}°")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-shape", type=int, default=2, help="sampled modules per distinct shape")
    parser.add_argument("--related", type=float, default=None, metavar="EPS",
                        help="sources = one LoRA plus relative noise EPS (default: 4 independent LoRAs)")
    parser.add_argument("--full", action="store_true", help="our merges on every module")
    parser.add_argument("--full-dense", action="store_true", help="dense baseline on every module (slow)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-iter", type=int, default=50)
    parser.add_argument("--skip-threads", action="store_true", help="skip the 1 vs 2 threads comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the dense baseline "
                        "and for our merges alike (default 1)")
    args = parser.parse_args()
    dev = torch.device(args.device)

    print(f"torch {torch.__version__}, device {dev}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.related is None:
        loras = [random_lora("sdxl", rank=RANK, seed=s, path=f"independent{s}.safetensors") for s in range(4)]
        kind = "4 independent"
    else:
        base = random_lora("sdxl", rank=RANK, seed=0, path="base.safetensors")
        loras = [base] + [perturbed_lora(base, args.related, seed=s) for s in (1, 2, 3)]
        kind = f"4 related (relative noise {args.related})"
    names = list(loras[0].modules)
    by_shape = defaultdict(list)
    for n in names:
        m = loras[0].modules[n]
        by_shape[(m.d_out, m.d_in)].append(n)
    sample = [n for group in by_shape.values() for n in group[:args.per_shape]]
    print(f"{kind} synthetic SDXL rank-{RANK} LoRAs, {len(names)} modules, {len(by_shape)} shapes; "
          f"merged at rank {RANK}, weights {WEIGHTS}")

    def extrapolate(per_module: dict[str, float]) -> float:
        return sum(len(group) * sum(per_module[n] for n in group[:args.per_shape]) /
                   len(group[:args.per_shape]) for group in by_shape.values())

    # dense baseline with the same thread count as ours
    dense_names = names if args.full_dense else sample
    if dev.type == "cuda":      # warm-up: cuSOLVER/cuBLAS initialisation is not merge time
        dense_svd_merge(loras, sample[:1], dev)
        our_merge(loras, sample[:2], "karcher", dev, max_iter=2)
    best = args.threads
    dense = {}
    with linalg_threads(best if dev.type == "cpu" else None):
        dense[best] = dense_svd_merge(loras, dense_names, dev)
    dense_total = sum(dense[best].values()) if args.full_dense else extrapolate(dense[best])
    stacked = RANK * len(loras)

    def flop_bound(m: int, n: int) -> float:
        """Upper bound on the speed-up by flop count (see the module docstring)."""
        big, small = max(m, n), min(m, n)
        return (6 * big * small ** 2 + 20 * small ** 3) / (2 * (m + n) * stacked ** 2 - 4 / 3 * stacked ** 3)

    # ours, per module on the sample (one merge call per module, for the per-shape table)
    per = {"svd": {}, "karcher": {}}
    iters = {}
    for n in sample:
        for method in per:
            t, res = our_merge(loras, [n], method, dev, max_iter=args.max_iter, threads=args.threads)
            per[method][n] = t
            if method == "karcher":
                iters[n] = [s["iterations"] for s in res.report.modules[0].karcher.values()]
    print(f"\n{'shape':>12} {'count':>5} {'dense svd':>10} {'svd (ours)':>11} {'karcher':>9} "
          f"{'dense/svd':>9} {'flop bound':>10} {'dense/karcher':>13} {'karcher iters U/V':>18}")
    for shape, group in sorted(by_shape.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
        take = group[:args.per_shape]
        d = sum(dense[best][n] for n in take) / len(take)
        s = sum(per["svd"][n] for n in take) / len(take)
        k = sum(per["karcher"][n] for n in take) / len(take)
        its = " ".join(f"{u}/{v}" for u, v in (iters[n] for n in take))
        print(f"{shape[0]:>5}×{shape[1]:<6} {len(group):>5} {d:>9.3f}s {s:>10.3f}s {k:>8.3f}s "
              f"{d / s:>8.1f}× {flop_bound(*shape):>9.0f}× {d / k:>12.1f}× {its:>18}")

    dense_label = "measured" if args.full_dense else f"EXTRAPOLATED from {len(sample)} modules × count"
    threads_label = f"{best} thread(s), as ours" if dev.type == "cpu" else str(dev)
    print(f"\ndense-SVD svd merge, whole LoRA: {dense_total:8.1f} s ({dense_label}; float32, {threads_label})")
    totals = {}
    for method in ("svd", "karcher"):
        if args.full:
            t, res = our_merge(loras, names, method, dev, max_iter=args.max_iter, threads=args.threads)
            totals[method] = (t, "measured, one merge call")
            if method == "karcher":
                full_iters = iteration_stats(res)
        else:
            totals[method] = (extrapolate(per[method]), f"EXTRAPOLATED from {len(sample)} modules × count")
        print(f"{method + ' (ours)':>14}, whole LoRA: {totals[method][0]:8.1f} s ({totals[method][1]}; "
              f"float64, with fidelity report, {args.threads} thread(s))")
    for method, (t, _) in totals.items():
        print(f"ratio dense / {method}: {dense_total / t:.1f}×")
    if args.full:
        print(full_iters)
    else:
        flat = [i for pair in iters.values() for i in pair]
        print(f"Karcher gradient evaluations per module side (sample): mean {sum(flat) / len(flat):.1f}, "
              f"max {max(flat)}")

    if dev.type == "cpu" and not args.skip_threads:
        t1 = our_merge(loras, sample, "karcher", dev, max_iter=args.max_iter, threads=1)[0]
        t2 = our_merge(loras, sample, "karcher", dev, max_iter=args.max_iter, threads=2)[0]
        s1 = our_merge(loras, sample, "svd", dev, threads=1)[0]
        s2 = our_merge(loras, sample, "svd", dev, threads=2)[0]
        print(f"\nthreads, {len(sample)}-module sample: karcher 1 thread {t1:.2f} s, 2 threads {t2:.2f} s; "
              f"svd 1 thread {s1:.2f} s, 2 threads {s2:.2f} s")
    same = max(by_shape.values(), key=len)[:16]
    shape = loras[0].modules[same[0]]
    t_loop, r_loop = our_merge(loras, same, "karcher", dev, max_iter=args.max_iter, batched=False)
    t_batch, r_batch = our_merge(loras, same, "karcher", dev, max_iter=args.max_iter, batched=True)
    diff = max(float((r_loop.lora.modules[n].delta() - r_batch.lora.modules[n].delta()).norm() /
                     r_loop.lora.modules[n].delta().norm()) for n in same)
    print(f"karcher on {len(same)} modules of one shape ({shape.d_out}×{shape.d_in}): loop {t_loop:.2f} s, "
          f"batched {t_batch:.2f} s (results differ by {diff:.1e} relative)")


if __name__ == "__main__":
    main()
