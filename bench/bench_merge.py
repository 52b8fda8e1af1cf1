"""Karcher and svd merges (ours, from factors) against dense-SVD svd merges.

Four synthetic SDXL rank-64 LoRAs (real module names and shapes: UNet
attention + both text encoders, 986 modules), merged at rank 64. Two dense
baselines, both float32 like kohya's svd_merge_lora: form Σ w_k ΔW_k, then
  - kohya: torch.linalg.svd(mat) exactly as svd_merge_lora calls it (default
    full_matrices=True: square U or V of the long side), keep the top 64;
  - thin:  torch.linalg.svd(mat, full_matrices=False), the strongest dense
    baseline (same result, no square factor).
Ours work in float64 from the factors and include the fidelity report.

By default every method runs on a sample of --per-shape modules of each
distinct shape and the whole-LoRA time is EXTRAPOLATED by module count (printed
as such); --full [svd] [karcher] runs our merges on every module in one call each
(the dense baselines stay sampled unless --full-dense, thin only). Everything runs with the same torch
thread count (1 by default, --threads N), printed, and merges one module at a
time (--workers 1); the "workers" section then runs whole-sample merges with
one worker and with one per CPU (core.workers: modules in parallel, each on
one thread) in the same run and prints the ratio (--workers-only: just that).

Floor per shape (measured, printed): an exact factored svd merge must at least
read the stacked factors into two Σr×Σr Grams (d_out·Σr² and d_in·Σr²
products, Σr = 256 here) and decompose the Σr×Σr core (one eigh); the column
"floor" times just those three operations, and dense/floor bounds the speed-up
any method of this kind can reach on that shape on this machine.

Every method of the method table (core.merge.methods) is then timed per
module on the same sample, against our svd merge and against the floor, in
the same run ("every method" table; --methods to choose, --modules N to cap
the sample for a quick run, --skip-dense to skip the dense baselines).

    python bench/bench_merge.py [--per-shape 2] [--related EPS] [--full [svd] [karcher]] [--full-dense]
                                [--device cuda] [--max-iter N] [--skip-kohya] [--skip-means]
                                [--batch-modules 16] [--methods M ...] [--modules N] [--skip-dense] [--repeat N]
                                [--workers N] [--workers-only] [--skip-workers]
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
from core.merge import TABLE, merge  # noqa: E402
from core.synthetic import perturbed_lora, random_lora  # noqa: E402
from core.workers import cpu_count, worker_count  # noqa: E402

RANK = 64
WEIGHTS = [0.25, 0.25, 0.25, 0.25]
MEANS = ("karcher", "chordal", "flag-median")    # the geometric means, timed against our svd merge
WORKER_METHODS = ("svd", "ties", "karcher", "chordal", "flag-median")   # the workers comparison
WORKERS = 1                                      # modules at once in our merges (--workers)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def subset(loras: list[LoraFile], names: list[str]) -> list[LoraFile]:
    return [LoraFile(l.path, l.format, l.family, {n: l.modules[n] for n in names}) for l in loras]


def dense_svd_merge(loras: list[LoraFile], names: list[str], device, full_matrices: bool = False
                    ) -> dict[str, float]:
    """Per-module seconds of the dense baseline (float32). full_matrices=True is
    kohya's svd_merge_lora call, torch.linalg.svd(mat) with its default; False
    (thin U, V) is the strongest dense baseline."""
    times = {}
    for name in names:
        def one():
            total = sum(w * l.modules[name].scale * (l.modules[name].up.to(device) @ l.modules[name].down.to(device))
                        for l, w in zip(loras, WEIGHTS))
            u, s, vh = torch.linalg.svd(total, full_matrices=full_matrices)
            out = (u[:, :RANK] * s[:RANK], vh[:RANK])
            sync(device)
            return out
        times[name] = timed(one)[0]
    return times


def our_merge(loras, names, method, device, **kw):
    sync(device)
    kw.setdefault("workers", WORKERS)
    rank = RANK if TABLE[method].ranked else None
    t, res = timed(lambda: (merge(subset(loras, names), WEIGHTS, method=method, rank=rank,
                                  device=device, **kw), sync(device))[0])
    return t, res


def every_method(loras, by_shape, sample, floor, methods, dev, args) -> None:
    """Per-module seconds of every method on the sample (one merge call per module,
    fidelity report included), against our svd merge and the floor, per shape and
    extrapolated to the whole LoRA by module count."""
    per = {m: {} for m in ["svd"] + [m for m in methods if m != "svd"]}
    for n in sample:
        for _ in range(args.repeat):     # rounds interleave the methods and the floor: a load spike hits one round
            for method in per:
                t = our_merge(loras, [n], method, dev, max_iter=args.max_iter, threads=args.threads)[0]
                per[method][n] = min(per[method].get(n, t), t)
            if args.repeat > 1:
                with linalg_threads(args.threads if torch.device(dev).type == "cpu" else None):
                    floor[n] = min(floor[n], floor_time(loras, n, dev))
    cols = [m for m in per if m != "svd"]
    runs = f"best of {args.repeat} interleaved rounds, floor too" if args.repeat > 1 else "one merge call each"
    print(f"\nevery method, seconds per module ({runs}, report included; {args.threads} thread(s)); "
          f"ratio = method / svd; svd/floor")
    print(f"{'shape':>12} {'count':>5} {'floor':>7} {'svd':>7} {'svd/floor':>9} " +
          " ".join(f"{m:>10}" for m in cols))
    totals = {m: 0.0 for m in per}
    floor_total = 0.0
    for shape, group in sorted(by_shape.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
        take = [n for n in group if n in sample]
        if not take:
            continue
        mean = {m: sum(per[m][n] for n in take) / len(take) for m in per}
        f = sum(floor[n] for n in take) / len(take)
        floor_total += f * len(group)
        for m in per:
            totals[m] += mean[m] * len(group)
        print(f"{shape[0]:>5}×{shape[1]:<6} {len(group):>5} {f:>7.3f} {mean['svd']:>7.3f} "
              f"{mean['svd'] / f:>8.2f}× " + " ".join(f"{mean[m] / mean['svd']:>9.2f}×" for m in cols))
    print(f"{'whole LoRA':>18} {floor_total:>7.1f} {totals['svd']:>7.1f} {totals['svd'] / floor_total:>8.2f}× " +
          " ".join(f"{totals[m] / totals['svd']:>9.2f}×" for m in cols) +
          f"   (seconds EXTRAPOLATED from {len(sample)} modules × count)")


def workers_comparison(loras, sample, dev, args) -> None:
    """Merges in one call each with one worker and with one per CPU, same run,
    interleaved, on the sample (and the whole LoRA for the methods --full
    names); results must be bit-identical (each module is computed by one
    thread whatever the schedule)."""
    many = worker_count(None, dev)
    print(f"\nworkers: one merge call, 1 worker vs {many} ({cpu_count()} CPUs; best of {args.repeat}; "
          "each worker on one torch thread)")
    runs = [(m, sample, f"{len(sample)}-module sample") for m in WORKER_METHODS]
    if args.full is not None:
        whole = list(loras[0].modules)
        runs += [(m, whole, "whole LoRA") for m in (args.full or ("svd", "karcher"))]
    for method, names, label in runs:
        best = {}
        for _ in range(args.repeat):
            for n in (1, many):
                t, res = our_merge(loras, names, method, dev, max_iter=args.max_iter, workers=n)
                if n not in best or t < best[n][0]:
                    best[n] = (t, res)
        (t1, r1), (tn, rn) = best[1], best[many]
        same = all(torch.equal(r1.lora.modules[k].up, rn.lora.modules[k].up) and
                   torch.equal(r1.lora.modules[k].down, rn.lora.modules[k].down) for k in r1.lora.modules)
        print(f"  {method:<11} {label:<20} 1 worker {t1:8.2f} s   {many} workers {tn:8.2f} s   {t1 / tn:.2f}× "
              f"({'bit-identical' if same else 'RESULTS DIFFER'})", flush=True)


def floor_time(loras: list[LoraFile], name: str, device) -> float:
    """Seconds for the unavoidable part of an exact factored svd merge of one
    module: the Grams of the stacked up and down factors (float64) and one eigh
    of the Σr×Σr core."""
    ups = torch.cat([l.modules[name].up for l in loras], 1).to(device, torch.float64)
    downs = torch.cat([l.modules[name].down for l in loras], 0).to(device, torch.float64)

    def run():
        g_up, g_down = ups.T @ ups, downs @ downs.T
        out = g_down, torch.linalg.eigh(g_up)     # a symmetric Σr×Σr stand-in for the core: same cost
        sync(device)
        return out
    run()
    return timed(run)[0]


def iteration_stats(res) -> str:
    its = [s["iterations"] for m in res.report.modules if m.karcher for s in m.karcher.values()]
    k = res.report.summary()["karcher"]
    return (f"Karcher gradient evaluations per module side: mean {sum(its) / len(its):.1f}, max {max(its)}; "
            f"not converged {k['not_converged']}, not unique {k['not_unique']} of {len(res.report.modules)} "
            f"modules; largest source-to-mean angle {k['max_angle_deg']:.0f}°")


def means_summary(per: dict, sides: dict, extrapolate) -> None:
    """Each geometric mean against our svd merge on the sample, with its convergence figures
    (per module side: steps, gradient norm, Hessian-vector products, Hessian check, consensus)."""
    svd_total = extrapolate(per["svd"])
    print("\ngeometric means (whole LoRA extrapolated from the sample; ratio to our svd merge):")
    for method in MEANS:
        if method not in per:
            continue
        total, ss = extrapolate(per[method]), sides[method]
        steps = [s["iterations"] for s in ss]
        text = (f"  {method:<12} {total:8.1f} s  {total / svd_total:5.2f}× svd;  steps mean {sum(steps) / len(steps):.1f} "
                f"max {max(steps)}, not converged {sum(not s['converged'] for s in ss)}/{len(ss)} sides, "
                f"not unique {sum(not s['unique'] for s in ss)}")
        if method == "karcher":
            hv = [s["hess_products"] for s in ss]
            text += (f", grad max {max(s['grad_norm'] for s in ss):.1e}, Hessian products mean "
                     f"{sum(hv) / len(hv):.0f} max {max(hv)}, local minimum {sum(s['local_min'] for s in ss)}/"
                     f"{len(ss)} (certified by the Weyl bound {sum(s['hessian_lower'] > 0 for s in ss)})")
        cons = [s["consensus_rank"] for s in ss]
        print(text + f", consensus rank mean {sum(cons) / len(cons):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-shape", type=int, default=2, help="sampled modules per distinct shape")
    parser.add_argument("--related", type=float, default=None, metavar="EPS",
                        help="sources = one LoRA plus relative noise EPS (default: 4 independent LoRAs)")
    parser.add_argument("--full", nargs="*", choices=("svd", "karcher"), default=None,
                        help="run these of our merges on every module, one call each (no names: both)")
    parser.add_argument("--full-dense", action="store_true", help="dense baseline on every module (slow)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-iter", type=int, default=None,
                        help="karcher Newton / flag-median IRLS step limit (default: each method's own)")
    parser.add_argument("--skip-threads", action="store_true", help="skip the 1 vs 2 threads comparison")
    parser.add_argument("--skip-kohya", action="store_true", help="skip the full_matrices=True baseline (slow)")
    parser.add_argument("--skip-means", action="store_true", help="skip chordal and flag-median")
    parser.add_argument("--batch-modules", type=int, default=16,
                        help="modules of one shape for the karcher loop-vs-batched comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the dense baseline "
                        "and for our merges alike (default 1)")
    parser.add_argument("--methods", nargs="+", choices=tuple(TABLE), default=list(TABLE),
                        help="methods of the every-method table (default all)")
    parser.add_argument("--modules", type=int, default=None, metavar="N",
                        help="cap the sample at N modules (a quick run)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="every-method table: each time the best of N interleaved rounds (floor included), "
                             "for a loaded machine")
    parser.add_argument("--skip-dense", action="store_true",
                        help="only the every-method table (no dense baselines, no karcher extras)")
    parser.add_argument("--workers", type=int, default=1,
                        help="modules at once in our merges outside the workers section (default 1)")
    parser.add_argument("--workers-only", action="store_true", help="only the workers comparison")
    parser.add_argument("--skip-workers", action="store_true", help="skip the workers comparison")
    args = parser.parse_args()
    dev = torch.device(args.device)
    global WORKERS
    WORKERS = args.workers

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
    if args.modules is not None:     # round-robin over shapes so a small cap still spans them
        rounds = [[g[i] for g in by_shape.values() if i < min(len(g), args.per_shape)] for i in range(args.per_shape)]
        sample = [n for r in rounds for n in r][:args.modules]
        by_shape = {k: [n for n in g if n in sample] + [n for n in g if n not in sample]
                    for k, g in by_shape.items()}
    print(f"{kind} synthetic SDXL rank-{RANK} LoRAs, {len(names)} modules, {len(by_shape)} shapes; "
          f"merged at rank {RANK}, weights {WEIGHTS}")

    def extrapolate(per_module: dict[str, float]) -> float:
        # shapes left out by --modules are left out of every total alike (ratios stay fair)
        total = 0.0
        for group in by_shape.values():
            seen = [per_module[n] for n in group[:args.per_shape] if n in per_module]
            total += len(group) * sum(seen) / len(seen) if seen else 0.0
        return total

    if args.workers_only:
        workers_comparison(loras, sample, dev, args)
        return
    if args.skip_dense:
        with linalg_threads(args.threads if dev.type == "cpu" else None):
            floor = {n: floor_time(loras, n, dev) for n in sample}
        every_method(loras, by_shape, sample, floor, args.methods, dev, args)
        return

    # dense baselines with the same thread count as ours
    dense_names = names if args.full_dense else sample
    if dev.type == "cuda":      # warm-up: cuSOLVER/cuBLAS initialisation is not merge time
        dense_svd_merge(loras, sample[:1], dev)
        our_merge(loras, sample[:2], "karcher", dev, max_iter=2)
    with linalg_threads(args.threads if dev.type == "cpu" else None):
        thin = dense_svd_merge(loras, dense_names, dev)
        kohya = {} if args.skip_kohya else dense_svd_merge(loras, sample, dev, full_matrices=True)
        floor = {n: floor_time(loras, n, dev) for n in sample}
    thin_total = sum(thin.values()) if args.full_dense else extrapolate(thin)
    kohya_total = extrapolate(kohya) if kohya else None
    floor_total = extrapolate(floor)

    # ours, per module on the sample (one merge call per module, for the per-shape table)
    per = {"svd": {}, "karcher": {}, **{m: {} for m in MEANS[1:] if not args.skip_means}}
    iters, sides = {}, defaultdict(list)
    for n in sample:
        for method in per:
            t, res = our_merge(loras, [n], method, dev, max_iter=args.max_iter, threads=args.threads)
            per[method][n] = t
            if method == "karcher":
                iters[n] = [s["iterations"] for s in res.report.modules[0].karcher.values()]
            if method in MEANS:
                sides[method] += list(res.report.modules[0].karcher.values())
    print(f"\nseconds per module (mean over the sample), ratios against the thin dense baseline")
    print(f"{'shape':>12} {'count':>5} {'kohya':>7} {'thin':>7} {'svd':>7} {'karcher':>7} {'floor':>7} "
          f"{'thin/svd':>8} {'thin/karcher':>12} {'thin/floor':>10} {'karcher iters U/V':>18}")

    def mean(times: dict, take: list) -> float:
        return sum(times[n] for n in take) / len(take) if times else float("nan")

    for shape, group in sorted(by_shape.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
        take = [n for n in group[:args.per_shape] if n in sample]
        if not take:        # a shape --modules left out
            continue
        d, s, k, f = mean(thin, take), mean(per["svd"], take), mean(per["karcher"], take), mean(floor, take)
        its = " ".join(f"{u}/{v}" for u, v in (iters[n] for n in take))
        print(f"{shape[0]:>5}×{shape[1]:<6} {len(group):>5} {mean(kohya, take):>7.3f} {d:>7.3f} {s:>7.3f} "
              f"{k:>7.3f} {f:>7.3f} {d / s:>7.1f}× {d / k:>11.1f}× {d / f:>9.1f}× {its:>18}")

    sampled = f"EXTRAPOLATED from {len(sample)} modules × count"
    threads_label = f"{args.threads} thread(s) for every method" if dev.type == "cpu" else str(dev)
    print(f"\nwhole LoRA ({threads_label}):")
    if kohya_total is not None:
        print(f"  dense svd merge, kohya's call: {kohya_total:8.1f} s ({sampled}; float32, full_matrices=True)")
    print(f"  dense svd merge, thin SVD:     {thin_total:8.1f} s "
          f"({'measured' if args.full_dense else sampled}; float32)")
    print(f"  floor (2 Grams + Σr eigh):     {floor_total:8.1f} s ({sampled})")
    totals, full_iters = {}, None
    for method in ("svd", "karcher"):
        if args.full is not None and (not args.full or method in args.full):
            t, res = our_merge(loras, names, method, dev, max_iter=args.max_iter, threads=args.threads)
            totals[method] = (t, "measured, one merge call")
            if method == "karcher":
                full_iters = iteration_stats(res)
        else:
            totals[method] = (extrapolate(per[method]), sampled)
        print(f"  {method + ' (ours)':<29} {totals[method][0]:8.1f} s ({totals[method][1]}; "
              f"float64, with fidelity report)")
    for method, (t, _) in totals.items():
        against = f"kohya {kohya_total / t:.1f}×, " if kohya_total is not None else ""
        print(f"ratio dense / {method}: {against}thin {thin_total / t:.1f}×")
    against = f"kohya {kohya_total / floor_total:.1f}×, " if kohya_total is not None else ""
    print(f"ratio dense / floor: {against}thin {thin_total / floor_total:.1f}× "
          "(no exact factored svd merge can beat these on this machine)")
    means_summary(per, sides, extrapolate)
    if full_iters is not None:
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
    same = max(by_shape.values(), key=len)[:args.batch_modules]
    shape = loras[0].modules[same[0]]
    t_loop, r_loop = our_merge(loras, same, "karcher", dev, max_iter=args.max_iter, batched=False)
    t_batch, r_batch = our_merge(loras, same, "karcher", dev, max_iter=args.max_iter, batched=True)
    diff = max(float((r_loop.lora.modules[n].delta() - r_batch.lora.modules[n].delta()).norm() /
                     r_loop.lora.modules[n].delta().norm()) for n in same)
    print(f"karcher on {len(same)} modules of one shape ({shape.d_out}×{shape.d_in}): loop {t_loop:.2f} s, "
          f"batched {t_batch:.2f} s (results differ by {diff:.1e} relative)")
    if dev.type == "cpu" and not args.skip_workers:
        workers_comparison(loras, sample, dev, args)
    every_method(loras, by_shape, sample, floor, args.methods, dev, args)


if __name__ == "__main__":
    main()
