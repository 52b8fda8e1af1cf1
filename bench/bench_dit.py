"""DiT LoRAs at full size: memory and time of a Flux.1 merge, and time per family.

1. Four synthetic Flux.1-dev LoRAs at rank 64 in the ai-toolkit / diffusers
   layout (PEFT names, q/k/v and the single-block MLP input as separate
   modules: ~500 modules a file, read as the 314 fused LDM modules plus the
   text encoders) are written to a temporary folder, then merged at rank 64
   in a fresh process each: svd over every module, karcher over an evenly
   spaced sample of modules (its time for all modules extrapolated, and
   printed as such), sources loaded lazily (memory-mapped, one module at a
   time); as the memory baseline, the same sample merged from whole files
   loaded eagerly. Peak RSS is printed against the sources' size on disk,
   with its anonymous part (RSS less the mapped file pages, sampled every
   10 ms): at its peak that is the interpreter and torch (measured before the
   sources are opened), the merged LoRA being built (its factors' size is
   printed) and the working memory of the module being merged.
2. Per family (first variant of each table in core.arch): two synthetic
   rank-8 kohya files over the whole table, timed to read, to compare (both
   sides, one worker) and to svd-merge. Printed first (it is the quick part).

Generated files are deleted at the end.

    .venv/bin/python bench/bench_dit.py [--rank 64] [--sample 24] [--skip-flux] [--skip-families]
                                        [--families FAMILY ...]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def _spellings(table):
    out = {}
    for alias, canon in table.aliases.items():
        seen = out.setdefault(canon, [])
        if alias != canon and not (seen and alias == seen[-1].replace(".", "_") != seen[-1]):
            seen.append(alias)
    return out


def write_flux_diffusers(path: str, rank: int, seed: int) -> int:
    """A Flux.1-dev LoRA as ai-toolkit writes it (transformer.<diffusers>.lora_A/B, bf16,
    every linear of the transformer plus CLIP-L). Returns the module count."""
    from core.sdarch import arch_for

    table = arch_for("flux", "dev")
    names = _spellings(table)
    gen = torch.Generator().manual_seed(seed)
    tensors, count = {}, 0

    def add(key, d_out, d_in):
        nonlocal count
        tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)).bfloat16()
        tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, rank, generator=gen) * 1e-2).bfloat16()
        count += 1

    for name, shape in table.shapes.items():
        if name.startswith("lora_te3_"):
            continue  # kohya and ai-toolkit train CLIP-L at most
        d_in = math.prod(shape[1:])
        if name in table.split_parts:
            parts = {}
            for alias, start, end, first in table.split_parts[name]:
                parts[alias] = max(parts.get(alias, 0), first + end - start)
            for alias, rows in parts.items():
                if not alias.endswith("linear1_qkv"):
                    add(f"transformer.{alias}", rows, d_in)
        elif name.startswith("lora_te1_"):
            body = next(a for a in names[name] if ".transformer." in a).split(".transformer.", 1)[1]
            add(f"text_encoder.{body}", shape[0], d_in)
        else:
            add(f"transformer.{names[name][-1]}", shape[0], d_in)
    save_file(tensors, path)
    return count


class MemorySampler(threading.Thread):
    """Peak anonymous RSS (not file-backed: mmap'd sources excluded) of this
    process, sampled from /proc/self/status."""

    def __init__(self, period: float = 0.01):
        super().__init__(daemon=True)
        self.period, self.peak_anon, self.stop = period, 0, threading.Event()

    @staticmethod
    def anon() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def run(self):
        while not self.stop.is_set():
            self.peak_anon = max(self.peak_anon, self.anon())
            time.sleep(self.period)

    def finish(self) -> int:
        self.stop.set()
        self.join()
        return max(self.peak_anon, self.anon())


def sample_names(names: list[str], count: int) -> list[str]:
    """``count`` modules evenly spaced over the table order (every kind of
    block and shape is represented in proportion)."""
    step = len(names) / count
    return [names[int(k * step)] for k in range(count)]


def restrict(lora, names: list[str]):
    """The LoRA with only these modules (a lazy one stays lazy)."""
    from core.formats.lazy import LazyModules

    keep = set(names)
    if isinstance(lora.modules, LazyModules):
        lora.modules._names = [n for n in lora.modules._names if n in keep]
        lora.modules._known = set(lora.modules._names)
    else:
        lora.modules = {n: m for n, m in lora.modules.items() if n in keep}
    return lora


def child(method: str, rank: int, lazy: bool, sample: int, paths: list[str]) -> None:
    """One merge in this process: prints a JSON line with times and memory."""
    from core.formats import load_lora
    from core.merge import merge

    sampler = MemorySampler()
    base_anon = sampler.anon()
    sampler.start()
    t0 = time.perf_counter()
    loras = [load_lora(p, lazy=lazy) for p in paths]
    total = len(loras[0].modules)
    if sample:
        names = sample_names(list(loras[0].modules), sample)
        loras = [restrict(lora, names) for lora in loras]
    t1 = time.perf_counter()
    result = merge(loras, method=method, rank=rank)
    t2 = time.perf_counter()
    peak_anon = sampler.finish()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = sum(t.numel() * t.element_size() for m in result.lora.modules.values() for t in (m.up, m.down))
    print(json.dumps({"method": method, "lazy": lazy, "modules": len(result.lora.modules), "total": total,
                      "open_s": t1 - t0, "merge_s": t2 - t1, "peak_rss": peak, "peak_anon": peak_anon,
                      "base_anon": base_anon, "result_bytes": out}))


def run_child(method, rank, lazy, sample, paths):
    cmd = ([sys.executable, __file__, "--child", method, "--rank", str(rank), "--sample", str(sample)]
           + (["--lazy"] if lazy else []) + paths)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def flux(tmp: str, rank: int, sample: int) -> None:
    paths = []
    t0 = time.perf_counter()
    for seed in range(4):
        path = os.path.join(tmp, f"flux-{seed}.safetensors")
        count = write_flux_diffusers(path, rank, seed)
        paths.append(path)
    size = sum(os.path.getsize(p) for p in paths)
    print(f"\nfour Flux.1-dev rank-{rank} LoRAs (diffusers layout, {count} modules each, bf16): "
          f"{size / 2**30:.2f} GiB on disk, {size / 4 / 2**20:.0f} MiB each "
          f"(written in {time.perf_counter() - t0:.0f} s)")
    print(f"{'method':<8} {'sources':<7} {'modules':>9} {'open s':>7} {'merge s':>8} {'all modules s':>13} "
          f"{'peak RSS':>9} {'/sources':>8} {'peak anon':>9} {'at start':>8} {'result':>8} {'rest':>8}")
    gib, mib = 2**30, 2**20
    for method, lazy, n in (("karcher", True, sample), ("svd", False, sample), ("svd", True, 0)):
        r = run_child(method, rank, lazy, n, paths)
        whole = r["merge_s"] * r["total"] / r["modules"]
        rest = r["peak_anon"] - r["base_anon"] - r["result_bytes"]
        print(f"{method:<8} {'lazy' if lazy else 'eager':<7} {r['modules']:>4}/{r['total']:<4} "
              f"{r['open_s']:>7.1f} {r['merge_s']:>8.1f} {whole:>11.0f}{' *' if n else '  '} "
              f"{r['peak_rss'] / gib:>7.2f} G {r['peak_rss'] / size:>7.2f}× {r['peak_anon'] / gib:>7.2f} G "
              f"{r['base_anon'] / mib:>6.0f} M {r['result_bytes'] / mib:>6.0f} M {rest / mib:>6.0f} M", flush=True)
    print("* extrapolated from the sample: merge s × all modules / sampled modules. peak anon = RSS less mapped "
          "file pages; at start = before the sources are opened; result = the merged factors held; "
          "rest = peak anon − at start − result (working memory, and for eager the whole sources)")


def families(tmp: str, only: list[str] | None = None) -> None:
    from core import arch as dit
    from core.formats import load_lora
    from core.merge import merge
    from core.save import save_kohya
    from core.sdarch import arch_for
    from core.similarity import compare
    from core.synthetic import random_lora

    print("per family: two rank-8 kohya LoRAs over the whole table (first variant), bf16")
    print(f"{'family':<12} {'variant':<10} {'modules':>7} {'MB/file':>8} {'read s':>7} {'compare s':>9} "
          f"{'svd merge s':>11}")
    for family in only or dit.FAMILY_MODULES:
        variant = dit.variants(family)[0]
        names = list(arch_for(family, variant).shapes)
        paths = []
        for seed in (1, 2):
            lora = random_lora(family, rank=8, seed=seed, names=names)
            for m in lora.modules.values():  # the variant's shapes (random_lora uses the union table)
                assert m.weight_shape[0] == m.up.shape[0]
            paths.append(save_kohya(lora, os.path.join(tmp, f"pair-{family}-{seed}.safetensors"),
                                    dtype=torch.bfloat16))
        t0 = time.perf_counter()
        loras = [load_lora(p) for p in paths]
        t1 = time.perf_counter()
        compare(loras[0], loras[1], side="both", workers=1)
        t2 = time.perf_counter()
        merge(loras, method="svd")  # per module the sources' rank (HiDream's 4-row router caps it)
        t3 = time.perf_counter()
        mb = sum(os.path.getsize(p) for p in paths) / 2 / 2**20
        print(f"{family:<12} {variant:<10} {len(loras[0].modules):>7} {mb:>8.0f} {t1 - t0:>7.1f} "
              f"{t2 - t1:>9.1f} {t3 - t2:>11.1f}", flush=True)
        for p in paths:
            os.unlink(p)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--sample", type=int, default=24, help="modules of the karcher and eager runs")
    ap.add_argument("--skip-flux", action="store_true")
    ap.add_argument("--skip-families", action="store_true")
    ap.add_argument("--families", nargs="+", help="only these families (default: every table)")
    ap.add_argument("--child")
    ap.add_argument("--lazy", action="store_true")
    ap.add_argument("paths", nargs="*")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.rank, args.lazy, args.sample, args.paths)
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    tmp = tempfile.mkdtemp(prefix="bench_dit_", dir="/tmp")
    try:
        # the quick parts first: each row is printed as soon as it is measured
        if not args.skip_families:
            families(tmp, args.families)
        if not args.skip_flux:
            flux(tmp, args.rank, args.sample)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
