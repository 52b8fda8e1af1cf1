"""`python -m core similarity A B`: how much two LoRAs share, module by module."""
from __future__ import annotations

import numpy as np

from ..errors import LoraError

HELP = ("Compare two LoRAs: subspace similarity φ against chance, principal angles and "
        "Grassmann distances per module, per block group and overall.")

GRID_TEXT_MAX = 16


def add_arguments(parser) -> None:
    parser.add_argument("a", help="first LoRA file")
    parser.add_argument("b", help="second LoRA file")
    parser.add_argument("--side", choices=("out", "in", "both"), default="out",
                        help="output side (column space of ΔW, default), input side (row space) or both")
    parser.add_argument("--top", type=int, default=None, metavar="K",
                        help="compare only the top-K singular vectors of each module "
                             "(default: each module's effective rank)")
    parser.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    parser.add_argument("--heatmap", metavar="FILE.png",
                        help="PNG heatmap: modules in depth order × φ and distances")
    parser.add_argument("--grid", metavar="MODULE",
                        help="φ(i, j) grid for one module (canonical or short name); "
                             "printed, or drawn with --grid-png")
    parser.add_argument("--grid-png", metavar="FILE.png", help="draw the --grid module's φ(i, j) grid")
    parser.add_argument("--groups", action="store_true", help="also print the per-group table")


def _load(path: str):
    try:
        from ..formats import load_lora
    except ImportError as exc:
        raise LoraError(f"cannot read LoRA files: the format readers are not available ({exc})", path)
    return load_lora(path)


def resolve_module(report, name: str) -> str:
    """Accept the canonical name, the name without 'lora_unet_'/'lora_', or any
    alias the architecture table knows (diffusers/LDM dotted paths)."""
    names = {r.module for r in report.results}
    candidates = [name, "lora_unet_" + name, "lora_" + name]
    try:
        from ..sdarch import arch_for
        alias = arch_for(report.a.family).canonical(name)
        if alias:
            candidates.append(alias)
    except KeyError:
        pass
    for c in candidates:
        if c in names:
            return c
    raise LoraError("module not shared by both LoRAs; see the JSON report for the module names",
                    report.a.path, name)


def _grid_text(grid: np.ndarray) -> str:
    k, l = grid.shape
    shown = grid[:GRID_TEXT_MAX, :GRID_TEXT_MAX]
    head = "i\\j " + " ".join(f"{j:>5}" for j in range(1, shown.shape[1] + 1))
    rows = [f"{i:>3} " + " ".join(f"{x:5.3f}" for x in row) for i, row in enumerate(shown, 1)]
    note = [] if (k, l) == shown.shape else [f"(top-left {shown.shape[0]}×{shown.shape[1]} of "
                                             f"{k}×{l}; use --grid-png for all)"]
    return "\n".join([head, *rows, *note])


def run(args) -> int:
    from ..plot import image_to_png
    from ..similarity import compare

    if args.grid_png and not args.grid:
        raise LoraError("--grid-png needs --grid MODULE")
    a, b = _load(args.a), _load(args.b)
    report = compare(a, b, side=args.side, top=args.top)
    print(report.text_summary(groups=args.groups))
    if args.json:
        report.to_json(args.json)
        print(f"\nJSON report: {args.json}")
    if args.heatmap:
        image_to_png(report.heatmap_image(), args.heatmap)
        print(f"heatmap: {args.heatmap}")
    if args.grid:
        name = resolve_module(report, args.grid)
        for side in report.sides:
            r = report.module(name, side)
            if not r.live:
                print(f"\n{name} ({side}): dead in {r.dead_in} (ΔW = 0), no φ grid")
                continue
            if args.grid_png:
                path = args.grid_png
                if len(report.sides) > 1:
                    stem, dot, ext = path.rpartition(".")
                    path = f"{stem}-{side}.{ext}" if dot else f"{path}-{side}"
                image_to_png(report.grid_image(name, side), path)
                print(f"φ(i, j) grid for {name} ({side}): {path}")
            else:
                print(f"\nφ(i, j) for {name}, {side} side (chance at full rank {r.chance:.4f}):")
                print(_grid_text(report.phi_grid(name, side)))
    return 0
