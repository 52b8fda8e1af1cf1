"""Similarity of two synthetic SDXL rank-64 LoRAs, every module, both sides.

Prints, all measured in this run:
  * the time to read both files from disk (safetensors tensors only, and the
    full reader core.formats.load_lora when it is available); the files were
    just written, so this is a warm page cache: the cheapest reading can be;
  * our time (core.similarity.compare, factored SVDs, single-threaded linear
    algebra; one worker thread, then the default one per core up to 8);
  * the dense approach (form ΔW, full SVD, top-r singular vectors, product,
    angles) on one module per distinct shape, extrapolated by module count
    (a full dense run would take tens of minutes), with --dense-threads
    threads (default 1, as ours; on a loaded 2-core machine 2 threads made
    dense SVDs far slower, not faster);
  * ratios: dense / ours, ours / reading;
  * 1 vs 2 torch threads for the per-module factored work.

    python bench/bench_similarity.py [--rank 64] [--attention-only] [--keep DIR]
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from core.device import linalg_threads  # noqa: E402
from core.factored import module_svd  # noqa: E402
from core.grassmann import principal_angles  # noqa: E402
from core.save import save_kohya  # noqa: E402
from core.similarity import compare  # noqa: E402
from core.synthetic import random_lora  # noqa: E402


def timed(fn, repeat=1):
    best = math.inf
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def dense_module(ma, mb, r):
    """The approach we replace: dense ΔW, full SVD, top-r vectors, UᵀU products, angles (fp32)."""
    out = []
    bases = []
    for m in (ma, mb):
        dw = m.delta(torch.float32)
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        bases.append((u[:, :r], vh[:r].T))
    for side in (0, 1):
        x, y = bases[0][side], bases[1][side]
        prod = x.T @ y
        phi = float((prod * prod).sum()) / r
        out.append((phi, torch.linalg.svdvals(prod)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--attention-only", action="store_true",
                    help="kohya 'LoRA' modules only (default: every table module, LoCon-style)")
    ap.add_argument("--keep", help="write the files here instead of a temporary folder")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baseline (slow on 2 cores)")
    ap.add_argument("--dense-threads", type=int, default=1,
                    help="torch threads for the dense baseline (default 1, the same as ours)")
    args = ap.parse_args()
    conv = not args.attention_only
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available, "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")

    t0 = time.perf_counter()
    a = random_lora("sdxl", args.rank, 0, conv=conv, path="a.safetensors")
    b = random_lora("sdxl", args.rank, 1, conv=conv, path="b.safetensors")
    print(f"built 2 synthetic SDXL rank-{args.rank} LoRAs, {len(a.modules)} modules each "
          f"({'all table modules incl. convs' if conv else 'attention + text encoders'}) "
          f"in {time.perf_counter() - t0:.1f} s")

    folder = args.keep or tempfile.mkdtemp(prefix="bench-sim-")
    try:
        pa = save_kohya(a, os.path.join(folder, "a.safetensors"), torch.float16, overwrite=True)
        pb = save_kohya(b, os.path.join(folder, "b.safetensors"), torch.float16, overwrite=True)
        size = (os.path.getsize(pa) + os.path.getsize(pb)) / 2 ** 20
        print(f"saved both as fp16 kohya files: {size:.0f} MiB together")

        from safetensors.torch import load_file
        t_raw, _ = timed(lambda: (load_file(pa), load_file(pb)), repeat=2)
        print(f"\nread both files, safetensors tensors only (warm cache):  {t_raw:7.2f} s")
        t_read = t_raw
        try:
            from core.formats import load_lora
            t_load, (la, lb) = timed(lambda: (load_lora(pa), load_lora(pb)), repeat=2)
            print(f"read both files with core.formats.load_lora:             {t_load:7.2f} s")
            t_read = t_load
        except ImportError:
            la, lb = a, b
            print("core.formats not available: comparing the in-memory LoRAs")

        t_one, rep = timed(lambda: compare(la, lb, side="both", workers=1))
        n_pairs = len(rep.results)
        print(f"ours: compare(side='both', workers=1), {n_pairs} module-sides: {t_one:7.2f} s"
              f"  ({1000 * t_one / len(la.modules):.1f} ms a module)")
        from core.workers import worker_count
        workers = worker_count(None, torch.device("cpu"))
        t_ours, rep_par = timed(lambda: compare(la, lb, side="both"))
        assert max(abs(x.phi - y.phi) for x, y in zip(rep.results, rep_par.results)) < 1e-12
        print(f"ours: compare(side='both'), default {workers} worker threads:  {t_ours:7.2f} s"
              f"  ({t_one / t_ours:.1f}× faster than 1 worker)")
        s = rep.summary()["sides"]
        print(f"  (mean φ out {s['out']['phi_mean']:.4f} vs chance {s['out']['chance_mean']:.4f}; "
              f"in {s['in']['phi_mean']:.4f} vs {s['in']['chance_mean']:.4f})")

        if torch.cuda.is_available():
            compare(la, lb, side="both", modules=list(la.modules)[:5], device="cuda")   # warm-up
            t_gpu, rep_gpu = timed(lambda: compare(la, lb, side="both", device="cuda"))
            worst = max(abs(x.phi - y.phi) for x, y in zip(rep.results, rep_gpu.results))
            print(f"ours on CUDA ({torch.cuda.get_device_name()}), module loop:   {t_gpu:7.2f} s"
                  f"  (max |Δφ| vs CPU {worst:.1e})")

        # Where our time goes, and 1 vs 2 threads, on a sample of modules.
        names = list(la.modules)[:: max(1, len(la.modules) // 60)]

        def factored_work():
            for n in names:
                sa, sb = module_svd(la.modules[n]), module_svd(lb.modules[n])
                principal_angles(sa.U, sb.U)
                principal_angles(sa.V, sb.V)
        for threads in sorted({1, 2, torch.get_num_threads()}):
            with linalg_threads(threads):
                t, _ = timed(factored_work)
            print(f"  factored work on {len(names)} sample modules with {threads} thread(s): {t:6.2f} s")

        if args.no_dense:
            print(f"\nsummary: read both files {t_read:.2f} s; ours {t_one:.2f} s with 1 worker = "
                  f"{t_one / t_read:.1f}× reading, {t_ours:.2f} s with {workers} = "
                  f"{t_ours / t_read:.1f}× reading (dense skipped)")
            return
        # Dense: one module per distinct flat shape, extrapolated by count.
        shapes = Counter((m.d_out, m.d_in) for m in la.modules.values())
        example = {}
        for n, m in la.modules.items():
            example.setdefault((m.d_out, m.d_in), n)
        print(f"\ndense approach on one module per distinct shape ({len(shapes)} shapes), fp32, "
              f"{args.dense_threads} thread(s); ours 1 thread, float64:")
        t_dense = 0.0
        t_ours_sample = 0.0
        for shape, count in sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
            n = example[shape]
            with linalg_threads(args.dense_threads):
                td, _ = timed(lambda: dense_module(la.modules[n], lb.modules[n], args.rank))
            one = compare(la, lb, side="both", modules=[n])
            to, _ = timed(lambda: compare(la, lb, side="both", modules=[n], workers=1), repeat=3)
            t_dense += td * count
            t_ours_sample += to * count
            assert abs(one.results[0].phi - dense_module(la.modules[n], lb.modules[n], args.rank)[0][0]) < 1e-3
            print(f"  {shape[0]:>6}×{shape[1]:<6} ×{count:<4} dense {td:7.3f} s   ours {1000 * to:6.1f} ms"
                  f"   ratio {td / to:6.0f}×")
        print(f"dense, EXTRAPOLATED from one module per shape × module count: {t_dense:8.1f} s")
        print(f"ours, same extrapolation (1 worker; check of the full run):   {t_ours_sample:8.1f} s")

        print("\nsummary")
        print(f"  read both files:   {t_read:8.2f} s")
        print(f"  ours, 1 worker:    {t_one:8.2f} s   = {t_one / t_read:5.1f}× reading")
        print(f"  ours, {workers} workers:   {t_ours:8.2f} s   = {t_ours / t_read:5.1f}× reading")
        print(f"  dense (extrap., {args.dense_threads} thread(s)): {t_dense:8.1f} s   = "
              f"{t_dense / t_one:5.0f}× ours with 1 worker (equal resources)")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
