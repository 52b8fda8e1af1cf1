"""`python -m core merge A B [C …] -o OUT`: merge LoRAs into one loadable LoRA."""
from __future__ import annotations

import argparse
import json

from ..errors import LoraError
from ..save import DTYPES, check_outputs, write_text

HELP = ("Merge LoRAs of one base model into one kohya LoRA by any method of the method table (--method); "
        "prints a fidelity table.")


def add_arguments(parser) -> None:
    from ..karcher import DISTANCES
    from ..merge import METHODS, NAMINGS, TABLE
    from ..merge.blocks import SPEC_HELP

    parser.add_argument("sources", nargs="+", metavar="LORA", help="two or more LoRA files (any format)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.safetensors",
                        help="file to write (.safetensors; its folder must exist)")
    parser.add_argument("--method", choices=METHODS, default="karcher",
                        help="; ".join(f"{m.name}: {m.description}" for m in TABLE.values()).replace("%", "%%")
                             + " (default karcher)")
    parser.add_argument("--weights", nargs="+", type=float, metavar="W",
                        help="one weight per LoRA (1 = full strength; default 1/N each)")
    parser.add_argument("--rank", type=_rank, default=None,
                        help="merge rank, or 'auto': per module the smallest rank holding --energy of the "
                             "merged energy (karcher, chordal, flag-median: the directions a weighted "
                             "majority of the sources share, consensus eigenvalue > ½) (default: the "
                             "smallest source rank per module; not for linear)")
    parser.add_argument("--energy", type=float, default=0.99, help="rank auto: share of the energy kept")
    parser.add_argument("--space", choices=("core", "full"), default=None,
                        help="ties/dare: on the sources' core coordinates (default, exact from factors) or "
                             "on the dense ΔW (full, as published)")
    parser.add_argument("--block-weights", nargs="+", metavar="SPEC",
                        help=f"one spec per LoRA ('-' for none): {SPEC_HELP}".replace("%", "%%"))
    parser.add_argument("--normalise", action="store_true",
                        help="linear/concat/svd: stack without burning — directions several LoRAs share at one "
                             "LoRA's strength, directions one LoRA uses alone untouched (see README)")
    parser.add_argument("--keep", type=float, default=None, help="tsv: share of each source's singular "
                                                                   "triplets used (default all)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="factor dtype written")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT (and the report) if present")
    parser.add_argument("--report", metavar="FILE.json", help="write the full fidelity report as JSON")
    parser.add_argument("--naming", choices=NAMINGS, default="first",
                        help="key spelling: the first source's (SD kohya/LyCORIS files; DiT merges write LDM kohya names) or kohya")
    parser.add_argument("--distance", choices=DISTANCES, default="geodesic",
                        help="karcher only: geodesic (Karcher mean) or chordal (extrinsic mean)")
    parser.add_argument("--max-iter", type=int, default=None,
                        help="karcher: most Newton steps a side (default 200); flag-median: most IRLS steps (default 300)")
    parser.add_argument("--ties-density", type=float, default=0.2, help="ties: fraction of entries kept")
    parser.add_argument("--dare-drop", type=float, default=0.5, help="dare: drop probability")
    parser.add_argument("--seed", type=int, default=0, help="dare: random seed")
    parser.add_argument("--device", default=None, help="torch device (default: CUDA when present)")
    parser.add_argument("--workers", type=_workers, default=None, metavar="N",
                        help="CPU: modules merged at once, one thread each (default: one per CPU, at most 8)")


def _rank(text: str):
    return "auto" if text == "auto" else int(text)


def _workers(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--workers must be at least 1, got {n}")
    return n


def run(args) -> int:
    from ..formats import load_lora
    from ..merge import merge
    from ..progress import terminal_progress

    if len(args.sources) < 2:
        raise LoraError("merge needs at least two LoRAs")
    check_outputs({"-o": args.output, "--report": args.report}, args.sources, args.overwrite,
                  {"-o": (".safetensors",), "--report": (".json",)})
    loras = [load_lora(path) for path in args.sources]
    result = merge(loras, args.weights, method=args.method, rank=args.rank, dtype=DTYPES[args.dtype],
                   seed=args.seed, ties_density=args.ties_density, dare_drop=args.dare_drop,
                   naming=args.naming, distance=args.distance, device=args.device, max_iter=args.max_iter,
                   space=args.space, keep=args.keep, energy=args.energy, normalise=args.normalise,
                   block_weights=None if not args.block_weights else
                   [None if x == "-" else x for x in args.block_weights],
                   workers=args.workers, progress=terminal_progress("merging"))
    print(result.report.table())
    path = result.save(args.output, overwrite=args.overwrite)
    print(f"\nwrote {path}: {len(result.lora.modules)} modules, {result.lora.family_label}, {args.dtype}")
    if args.report:
        write_text(args.report, json.dumps(result.report.to_dict(), indent=1), args.overwrite)
        print(f"report: {args.report}")
    return 0
