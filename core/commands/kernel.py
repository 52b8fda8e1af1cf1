"""`python -m core kernel FILES_OR_DIR…`: Grassmann kernel matrix of many LoRAs, with clusters."""
from __future__ import annotations

import os
import sys

from ..errors import LoraError
from ..kernels import DEFAULT_KERNEL, KERNELS

HELP = ("Grassmann kernel matrix of many LoRAs (Harandi et al. 2014 kernels over their shared "
        "modules), with spectral / kernel k-means / DBSCAN clustering.")

LORA_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="FILES_OR_DIR",
                        help="LoRA files, or folders whose LoRA files are all taken")
    parser.add_argument("--kernel", default=DEFAULT_KERNEL, choices=list(KERNELS),
                        help=f"kernel (default {DEFAULT_KERNEL}); projection-* on Σcos²θ, bc-* on "
                             "|det XᵀY|, bc2-* on det²; labels: " + ", ".join(
                                 f"{n} {s.status}" for n, s in KERNELS.items()))
    parser.add_argument("--beta", type=float, default=1.0, help="β (default 1.0)")
    parser.add_argument("--alpha", type=float, default=2.0,
                        help="α for the polynomial and binomial kernels (default 2)")
    parser.add_argument("--side", choices=("out", "in", "both"), default="out",
                        help="output side (column space of ΔW, default), input side (row space), or both")
    parser.add_argument("--module-filter", metavar="REGEX",
                        help="only modules whose canonical name matches (re.search), e.g. 'attn2'")
    parser.add_argument("--top", type=int, metavar="K",
                        help="compare each LoRA's leading K singular directions per module "
                             "(default: its effective rank; ranks that differ count as distance)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--clusters", type=int, metavar="K",
                       help="number of clusters (default: chosen by the eigengap)")
    group.add_argument("--dbscan", nargs=2, metavar=("EPS", "MIN"),
                       help="DBSCAN on the induced distance √(k(X,X)+k(Y,Y)−2k(X,Y)) "
                            "(0…√2 for normalised kernels); MIN counts the point itself")
    group.add_argument("--no-cluster", action="store_true", help="only the matrix")
    parser.add_argument("--method", choices=("spectral", "kernel-kmeans"), default="spectral",
                        help="clustering for --clusters / automatic k (default spectral)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the k-means restarts")
    parser.add_argument("--force", action="store_true",
                        help="allow a non-integer polynomial α, and clustering with an indefinite kernel "
                             "(its negative eigenvalues are reported)")
    parser.add_argument("--json", metavar="FILE", help="write names, kernel, matrix, counts, "
                                                       "eigenvalues, labels and order as JSON")
    parser.add_argument("--heatmap", metavar="FILE.png", help="PNG heatmap in cluster order")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that exist")


def expand_paths(paths: list[str]) -> tuple[list[str], list[str]]:
    """Files as given; folders give their LoRA files (sorted, not recursive).
    Returns (files, folder files) so folder entries can be skipped if unreadable."""
    files, from_folders = [], []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p)
                           if f.lower().endswith(LORA_SUFFIXES) and os.path.isfile(os.path.join(p, f)))
            if not found:
                raise LoraError(f"no LoRA files ({', '.join(LORA_SUFFIXES)}) in this folder", p)
            files += found
            from_folders += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise LoraError("no such file or folder", p)
    return files, from_folders


def load_all(paths: list[str]) -> tuple[list, list[str]]:
    from ..formats import load_lora
    files, from_folders = expand_paths(paths)
    loras, skipped = [], []
    for f in files:
        try:
            loras.append(load_lora(f))
        except LoraError as err:
            if f not in from_folders:
                raise
            skipped.append(f"skipped {f}: {err.message}")
    return loras, skipped


def run(args) -> int:
    from ..kernel_matrix import cluster_as_asked, compute_kernel_matrix
    from ..plot import image_to_png
    from ..progress import terminal_progress
    from ..save import check_outputs

    files, _ = expand_paths(args.paths)
    check_outputs({"--json": args.json, "--heatmap": args.heatmap}, files, args.overwrite,
                  {"--json": (".json",), "--heatmap": (".png",)})
    loras, skipped = load_all(args.paths)
    for line in skipped:
        print(f"warning: {line}", file=sys.stderr)
    if len(loras) < 2:
        raise LoraError(f"need at least two LoRAs, got {len(loras)}")
    km = compute_kernel_matrix(loras, args.kernel, args.beta, args.alpha, args.side,
                               args.module_filter, args.top, force=args.force,
                               progress=terminal_progress("kernel matrix"))
    result, note = (None, None) if args.no_cluster else \
        cluster_as_asked(km, args.clusters, args.dbscan, args.method, args.seed, args.force)
    print(km.text_summary(result))
    if note:
        print(f"warning: {note}")
    if args.json:
        km.to_json(args.json, result, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    if args.heatmap:
        image_to_png(km.heatmap_image(result), args.heatmap, args.overwrite)
        print(f"wrote {args.heatmap}")
    return 0
