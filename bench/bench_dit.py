"""DiT LoRAs at full size: memory and time of a Flux.1 merge, and time per family.

1. Four synthetic Flux.1-dev LoRAs at rank 64 in the ai-toolkit / diffusers
   layout (PEFT names, q/k/v and the single-block MLP input as separate
   modules: ~500 modules a file, read as the 314 fused LDM modules plus the
   text encoders) are written to a temporary folder, then merged at rank 64
   (svd and karcher) in a fresh process each, sources loaded lazily (memory-
   mapped, one module at a time) and, as the baseline, eagerly (whole files in
   memory). Peak RSS is printed against the sources' size on disk.
2. Per family (each table in core.arch): two synthetic rank-8 kohya files
   over the whole table, timed to read and to svd-merge.

Generated files are deleted at the end.

    .venv/bin/python bench/bench_dit.py [--rank 64] [--methods svd karcher] [--skip-families]
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


def child(method: str, rank: int, lazy: bool, paths: list[str]) -> None:
    """One merge in this process: prints a JSON line with time and peak RSS."""
    from core.formats import load_lora
    from core.merge import merge

    t0 = time.perf_counter()
    loras = [load_lora(p, lazy=lazy) for p in paths]
    t1 = time.perf_counter()
    result = merge(loras, method=method, rank=rank)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"method": method, "lazy": lazy, "modules": len(result.lora.modules),
                      "open_s": t1 - t0, "merge_s": t2 - t1, "peak_rss": peak}))


def run_child(method, rank, lazy, paths):
    cmd = [sys.executable, __file__, "--child", method, "--rank", str(rank)] + (["--lazy"] if lazy else []) + paths
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def families(tmp: str) -> None:
    from core import arch as dit
    from core.formats import load_lora
    from core.merge import merge
    from core.sdarch import arch_for
    from core.save import save_kohya
    from core.synthetic import random_lora

    print("\nper family: two rank-8 kohya LoRAs over the whole table")
    print(f"{'family':<12} {'variant':<14} {'modules':>7} {'MB/file':>8} {'read s':>7} {'svd merge s':>11}")
    for family in dit.FAMILY_MODULES:
        variant = dit.variants(family)[0]
        names = list(arch_for(family, variant).shapes)
        paths = []
        for seed in (1, 2):
            lora = random_lora(family, rank=8, seed=seed, names=names)
            for m in lora.modules.values():  # the variant's shapes (random_lora uses the union table)
                assert m.weight_shape[0] == m.up.shape[0]
            paths.append(save_kohya(lora, os.path.join(tmp, f"{family}-{seed}.safetensors"),
                                    dtype=torch.bfloat16))
        t0 = time.perf_counter()
        loras = [load_lora(p) for p in paths]
        t1 = time.perf_counter()
        merge(loras, method="svd", rank=8)
        t2 = time.perf_counter()
        mb = sum(os.path.getsize(p) for p in paths) / 2 / 2**20
        print(f"{family:<12} {variant:<14} {len(loras[0].modules):>7} {mb:>8.0f} {t1 - t0:>7.1f} {t2 - t1:>11.1f}")
        for p in paths:
            os.unlink(p)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--methods", nargs="+", default=["svd", "karcher"])
    ap.add_argument("--skip-families", action="store_true")
    ap.add_argument("--eager", nargs="*", default=["svd"], help="methods also run on whole files in memory")
    ap.add_argument("--child")
    ap.add_argument("--lazy", action="store_true")
    ap.add_argument("paths", nargs="*")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.rank, args.lazy, args.paths)
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="bench_dit_", dir="/tmp")
    try:
        paths = []
        t0 = time.perf_counter()
        for seed in range(4):
            path = os.path.join(tmp, f"flux-{seed}.safetensors")
            count = write_flux_diffusers(path, args.rank, seed)
            paths.append(path)
        size = sum(os.path.getsize(p) for p in paths)
        print(f"four Flux.1-dev rank-{args.rank} LoRAs (diffusers layout, {count} modules each, bf16): "
              f"{size / 2**30:.2f} GiB on disk, {size / 4 / 2**20:.0f} MiB each "
              f"(written in {time.perf_counter() - t0:.0f} s)")
        print(f"{'method':<8} {'sources':<7} {'modules':>7} {'open s':>7} {'merge s':>8} {'peak RSS':>9} {'RSS/sources':>11}")
        for method in args.methods:
            for lazy in ((True, False) if method in args.eager else (True,)):
                r = run_child(method, args.rank, lazy, paths)
                print(f"{method:<8} {'lazy' if lazy else 'eager':<7} {r['modules']:>7} {r['open_s']:>7.1f} "
                      f"{r['merge_s']:>8.1f} {r['peak_rss'] / 2**30:>7.2f} G {r['peak_rss'] / size:>10.2f}×",
                      flush=True)
        if not args.skip_families:
            families(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
