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
    parser.add_argument("--overwrite", action="store_true", help="replace output files that exist")


def _load(path: str):
    try:
        from ..formats import load_lora
    except ImportError as exc:
        raise LoraError(f"cannot read LoRA files: the format readers are not available ({exc})", path)
    return load_lora(path)


def _grid_text(grid: np.ndarray) -> str:
    k, l = grid.shape
    shown = grid[:GRID_TEXT_MAX, :GRID_TEXT_MAX]
    head = "i\\j " + " ".join(f"{j:>5}" for j in range(1, shown.shape[1] + 1))
    rows = [f"{i:>3} " + " ".join(f"{x:5.3f}" for x in row) for i, row in enumerate(shown, 1)]
    note = [] if (k, l) == shown.shape else [f"(top-left {shown.shape[0]}×{shown.shape[1]} of "
                                             f"{k}×{l}; use --grid-png for all)"]
    return "\n".join([head, *rows, *note])


def _grid_paths(args) -> dict[str, str]:
    """side -> PNG path for --grid-png (one per side with --side both)."""
    if not args.grid_png:
        return {}
    from ..similarity import SIDES
    sides = SIDES if args.side == "both" else (args.side,)
    if len(sides) == 1:
        return {sides[0]: args.grid_png}
    stem, dot, ext = args.grid_png.rpartition(".")
    return {side: (f"{stem}-{side}.{ext}" if dot else f"{args.grid_png}-{side}") for side in sides}


def run(args) -> int:
    from ..plot import image_to_png
    from ..progress import terminal_progress
    from ..save import check_outputs
    from ..similarity import compare, shared_module

    if args.grid_png and not args.grid:
        raise LoraError("--grid-png needs --grid MODULE")
    grid_paths = _grid_paths(args)
    outputs = {"--json": args.json, "--heatmap": args.heatmap,
               **{f"--grid-png ({side})": p for side, p in grid_paths.items()}}
    check_outputs(outputs, [args.a, args.b], args.overwrite,
                  {"--json": (".json",), "--heatmap": (".png",),
                   **{f"--grid-png ({side})": (".png",) for side in grid_paths}})
    a, b = _load(args.a), _load(args.b)
    name = shared_module(a, b, args.grid) if args.grid else None
    report = compare(a, b, side=args.side, top=args.top, progress=terminal_progress("comparing"))
    print(report.text_summary(groups=args.groups))
    heat = report.heatmap_image() if args.heatmap else None     # refused before any file is written
    if args.json:
        report.to_json(args.json, overwrite=args.overwrite)
        print(f"\nJSON report: {args.json}")
    if heat is not None:
        image_to_png(heat, args.heatmap, args.overwrite)
        print(f"heatmap: {args.heatmap}")
    if name:
        for side in report.sides:
            r = report.module(name, side)
            if not r.live:
                print(f"\n{name} ({side}): dead in {r.dead_in} (ΔW = 0), no φ grid")
                continue
            if grid_paths:
                image_to_png(report.grid_image(name, side), grid_paths[side], args.overwrite)
                print(f"φ(i, j) grid for {name} ({side}): {grid_paths[side]}")
            else:
                print(f"\nφ(i, j) for {name}, {side} side (chance at full rank {r.chance:.4f}):")
                print(_grid_text(report.phi_grid(name, side)))
    return 0
