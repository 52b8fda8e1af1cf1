"""`python -m core demo`: the whole pack on built-in example LoRAs.

Makes six synthetic SD1.5 LoRAs with the real module names and shapes (two
"styles" with variants, an unrelated character LoRA and a LoCon with conv
layers), then: inspects one, compares related and unrelated pairs, builds the
kernel matrix and clusters it, merges two related LoRAs every way, saves the
Karcher merge as a kohya .safetensors and reloads it. Outputs go to --out.
"""
from __future__ import annotations

import os
import time

HELP = "run the whole pack on built-in example LoRAs and write reports, heatmaps and a merged LoRA"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--rank", type=int, default=8, help="rank of the example LoRAs (default 8)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files a previous demo run left in --out")


def _examples(rank: int) -> dict:
    from ..synthetic import perturbed_lora, random_lora
    style_a = random_lora("sd1", rank=rank, seed=1, path="style_a.safetensors")
    style_b = random_lora("sd1", rank=rank, seed=2, path="style_b.safetensors")
    return {
        "style_a": style_a,
        "style_a_v2": perturbed_lora(style_a, 0.3, seed=11, path="style_a_v2.safetensors"),
        "style_a_v3": perturbed_lora(style_a, 0.3, seed=12, path="style_a_v3.safetensors"),
        "style_b": style_b,
        "style_b_v2": perturbed_lora(style_b, 0.3, seed=21, path="style_b_v2.safetensors"),
        "character_locon": random_lora("sd1", rank=rank, seed=3, conv=True,
                                       path="character_locon.safetensors"),
    }


def _step(title: str) -> float:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))
    return time.perf_counter()


def run(args) -> int:
    import torch

    from ..commands.inspect import describe, format_text
    from ..formats import load_lora
    from ..kernel_matrix import cluster_kernel_matrix, compute_kernel_matrix
    from ..merge import METHODS, get, merge
    from ..plot import image_to_png
    from ..save import safe_output_path, save_kohya
    from ..similarity import compare

    out = os.path.abspath(args.out)
    lora_dir = os.path.join(out, "loras")
    os.makedirs(lora_dir, exist_ok=True)

    def target(name: str) -> str:
        return safe_output_path(out, name)

    t = _step(f"1. example LoRAs (SD1.5 module names and shapes, rank {args.rank}) -> {lora_dir}")
    paths = {}
    for name, lora in _examples(args.rank).items():
        paths[name] = save_kohya(lora, os.path.join(lora_dir, f"{name}.safetensors"),
                                 dtype=torch.float16, overwrite=args.overwrite)
        print(f"  {name}.safetensors: {len(lora.modules)} modules")
    loras = {name: load_lora(p) for name, p in paths.items()}
    print(f"  ({time.perf_counter() - t:.1f} s)")

    t = _step("2. inspect character_locon")
    print(format_text(describe(loras["character_locon"]), summary=True))
    print(f"  ({time.perf_counter() - t:.1f} s)")

    for a, b in (("style_a", "style_a_v2"), ("style_a", "style_b")):
        t = _step(f"3. subspace similarity: {a} vs {b}")
        report = compare(loras[a], loras[b], side="out")
        print(report.text_summary())
        stem = f"similarity_{a}_vs_{b}"
        report.to_json(target(stem + ".json"), overwrite=args.overwrite)
        image_to_png(report.heatmap_image(), target(stem + ".png"), args.overwrite)
        first = report.for_side("out")[0].module
        image_to_png(report.grid_image(first), target(stem + "_phi_grid.png"), args.overwrite)
        print(f"  wrote {stem}.json, {stem}.png, {stem}_phi_grid.png ({time.perf_counter() - t:.1f} s)")

    t = _step("4. Grassmann kernel matrix (projection-rbf) and clusters over all six")
    names = list(loras)
    km = compute_kernel_matrix([loras[n] for n in names], "projection-rbf", beta=1.0)
    clusters = cluster_kernel_matrix(km, method="spectral")
    print(km.text_summary(clusters))
    km.to_json(target("kernel_matrix.json"), clusters, overwrite=args.overwrite)
    image_to_png(km.heatmap_image(clusters), target("kernel_matrix.png"), args.overwrite)
    print(f"  wrote kernel_matrix.json, kernel_matrix.png ({time.perf_counter() - t:.1f} s)")

    sources = [loras["style_a"], loras["style_a_v2"]]
    results = {}
    for method in METHODS:
        exact = not get(method).ranked          # exact at rank Σ r_k, no rank to choose
        t = _step(f"5. {method} merge of style_a + style_a_v2 (weights 0.5 0.5, "
                  f"rank {'Σ r_k' if exact else args.rank})")
        results[method] = merge(sources, [0.5, 0.5], method=method, rank=None if exact else args.rank)
        print(results[method].report.table())
        print(f"  ({time.perf_counter() - t:.1f} s)")

    t = _step("6. save the Karcher merge and reload it")
    merged_path = results["karcher"].save(target("style_a_karcher_merge.safetensors"),
                                          dtype=torch.float16, overwrite=args.overwrite)
    reloaded = load_lora(merged_path)
    merged = results["karcher"].lora
    worst = max(float((reloaded.modules[n].delta() - m.delta()).norm() / m.delta().norm())
                for n, m in merged.modules.items())
    print(f"  wrote {merged_path}: {len(reloaded.modules)} modules, format {reloaded.format}, "
          f"family {reloaded.family_label}; worst relative ΔW change after fp16 save {worst:.1e}")
    print("\nsummary (whole-LoRA relative error against the weighted sum, energy kept per source):")
    for method, res in results.items():
        s = res.report.summary()
        kept = ", ".join(f"{v:.3f}" for v in s["kept"].values())
        print(f"  {method:8s} rel.error {s['rel_error']:.3e}  kept [{kept}]")
    print(f"\nall outputs in {out} ({time.perf_counter() - t:.1f} s for the last step)")
    return 0
