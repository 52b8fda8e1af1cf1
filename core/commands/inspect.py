"""`python -m core inspect FILE…`: what a LoRA file is, module by module."""
from __future__ import annotations

import json
import sys
from collections import Counter

from ..device import default_device
from ..errors import LoraError
from ..factored import modules_svd
from ..lora import LoraFile
from ..sdarch import TABLE_FAMILIES, arch_for

HELP = ("Show what LoRA files hold: format, base model, modules per part, ranks, alphas, dtypes, "
        "dead modules, extra tensors, metadata, and each module's top singular values and "
        "effective rank (computed from the factors, never forming ΔW).")

# Metadata worth a line in the text report, in this order; --json has all of it.
SUMMARY_KEYS = ("ss_output_name", "modelspec.title", "ss_sd_model_name", "ss_base_model_version",
                "modelspec.architecture", "ss_v2", "ss_network_module", "ss_network_dim",
                "ss_network_alpha", "ss_network_args", "ss_training_comment", "ss_num_epochs",
                "ss_learning_rate", "lora_adapter_metadata", "format", "unet", "text_encoder")
_VALUE_MAX = 80


def add_arguments(parser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="LoRA files (any supported format)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--top", type=int, default=4, metavar="K",
                        help="singular values shown per module (default 4)")
    parser.add_argument("--summary", action="store_true",
                        help="text output without the per-module table")


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape(shape) -> str:
    return "×".join(str(s) for s in shape)


def describe(lora: LoraFile, top: int = 4, family_reason: str = "", device=None) -> dict:
    """Everything `inspect` reports about one file, as plain JSON-ready data."""
    names = list(lora.modules)
    arch = arch_for(lora.family) if lora.family in TABLE_FAMILIES else None
    svds = modules_svd([lora.modules[n] for n in names], device=device or default_device())
    modules = []
    for name, f in zip(names, svds):
        m = lora.modules[name]
        modules.append({
            "name": name, "part": m.part, "kind": m.kind,
            "group": arch.groups.get(name) if arch is not None else None,
            "shape": list(m.weight_shape), "conv": m.is_conv, "rank": m.rank,
            "factor_rank": m.factor_rank, "alpha": m.alpha, "scale": m.scale,
            "dtype": _dtype_name(m.dtype), "effective_rank": f.effective_rank, "dead": f.dead,
            "norm": f.frobenius(), "top_singular_values": [float(s) for s in f.S[:top].cpu()],
        })
    return {
        "path": lora.path, "file": lora.name, "format": lora.format, "family": lora.family,
        "family_label": lora.family_label, "family_evidence": family_reason,
        "modules": len(modules), "parts": lora.parts(),
        "kinds": dict(Counter(m.kind for m in lora.modules.values())),
        "conv_modules": sum(m.is_conv for m in lora.modules.values()),
        "ranks": lora.ranks(), "alphas": lora.alphas(),
        "dtypes": dict(Counter(_dtype_name(m.dtype) for m in lora.modules.values())),
        "dead": [d["name"] for d in modules if d["dead"]],
        "extras": dict(lora.extras), "metadata": dict(lora.metadata),
        "warnings": list(lora.warnings), "module_details": modules,
    }


def _short(value: str) -> str:
    value = " ".join(str(value).split())
    return value if len(value) <= _VALUE_MAX else value[:_VALUE_MAX - 1] + "…"


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"


def format_text(info: dict, summary: bool = False) -> str:
    lines = [f"== {info['path']}",
             f"format    {info['format']}",
             f"family    {info['family_label']}" + (f"  ({info['family_evidence']})"
                                                    if info["family_evidence"] else ""),
             f"modules   {info['modules']}: {_counts(info['parts'])}   kinds: {_counts(info['kinds'])}"
             f"   conv: {info['conv_modules']}",
             f"ranks     {', '.join(map(str, info['ranks']))}   alphas: "
             + (", ".join(f"{a:g}" for a in info["alphas"]) or "none stored (scale 1)"),
             f"dtypes    {_counts(info['dtypes'])}"]
    dead = info["dead"]
    lines.append(f"dead      {len(dead)}" + (": " + ", ".join(dead[:3]) + (f" … (+{len(dead) - 3})" if len(dead) > 3 else "")
                                             if dead else " (no module with ΔW = 0)"))
    extras = info["extras"]
    lines.append(f"extras    {len(extras)}" + "".join(f"\n          {k}: {v}" for k, v in list(extras.items())[:10])
                 + ("\n          …" if len(extras) > 10 else ""))
    meta = info["metadata"]
    shown = [k for k in SUMMARY_KEYS if k in meta]
    lines.append(f"metadata  {len(meta)} key(s)" + "".join(f"\n          {k} = {_short(meta[k])}" for k in shown)
                 + (f"\n          (+{len(meta) - len(shown)} more; --json shows all)" if len(meta) > len(shown) else ""))
    lines += [f"warning   {w}" for w in info["warnings"]]
    if not summary and info["module_details"]:
        width = max(len(d["name"]) for d in info["module_details"])
        lines.append(f"  {'module':<{width}}  {'shape':<14} {'kind':<5} {'rank':>4} {'eff':>4}  top σ")
        for d in info["module_details"]:
            sigma = " ".join(f"{s:.3e}" for s in d["top_singular_values"])
            lines.append(f"  {d['name']:<{width}}  {_shape(d['shape']):<14} {d['kind']:<5} {d['rank']:>4} "
                         f"{d['effective_rank']:>4}  {'dead' if d['dead'] else sigma}")
    return "\n".join(lines)


def run(args) -> int:
    from ..formats import open_lora

    if args.top < 1:
        raise LoraError("--top must be at least 1")
    reports, failed = [], 0
    for path in args.files:
        try:
            with open_lora(path) as reader:
                lora = reader.load()
                info = describe(lora, args.top, reader.family_reason)
        except LoraError as err:
            failed += 1
            if args.json:
                reports.append({"path": path, "error": str(err)})
            else:
                print(f"error: {err}", file=sys.stderr)
            continue
        if args.json:
            reports.append(info)
        else:
            print(format_text(info, args.summary))
            print()
    if args.json:
        json.dump({"files": reports}, sys.stdout, indent=1)
        print()
    return 2 if failed else 0
