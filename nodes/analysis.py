"""Analysis nodes: subspace similarity of two LoRAs, Grassmann kernel matrix of many."""
from __future__ import annotations

from .common import (CATEGORY, LORA_TYPE, Progress, connected_loras, lora_slot_inputs, lora_slot_name,
                     node_result, notes_block, pil_to_image, preview_ui, table)

SIDE_CHOICES = ["out", "in", "both"]


def _find_module(report, wanted: str, side: str) -> str:
    """The module for the φ grid: the given name (canonical, or without its
    'lora_unet_' / 'lora_' prefix), or the most similar live one when empty."""
    from ..core.errors import LoraError

    wanted = (wanted or "").strip()
    live = sorted((r for r in report.for_side(side) if r.live), key=lambda r: -r.phi)
    if not wanted:
        if not live:
            raise LoraError("no live module shared by both LoRAs, so there is no φ grid to draw",
                            report.a.path)
        return live[0].module
    names = {r.module for r in report.for_side(side)}
    for candidate in (wanted, "lora_unet_" + wanted, "lora_" + wanted):
        if candidate in names:
            return candidate
    hits = sorted(n for n in names if wanted in n)
    if len(hits) == 1:
        return hits[0]
    hint = f"; {len(hits)} names contain it, e.g. {hits[0]}" if hits else ""
    raise LoraError(f"module {wanted!r} is not shared by both LoRAs{hint}", report.a.path)


def similarity_tables(report, grid_module: str) -> list[dict]:
    """The summary as tables: one row of aggregates per side, then the extremes."""
    s = report.summary()
    rows = []
    for side in report.sides:
        agg = s["sides"][side]
        if not agg.get("n_live"):
            rows.append([side, "0", "", "", "", "", "", ""])
            continue
        rows.append([side, str(agg["n_live"]), f"{agg['phi_mean']:.4f}", f"{agg['phi_median']:.4f}",
                     f"{agg['phi_mean_weighted']:.4f}", f"{agg['chance_mean']:.4f}",
                     f"{agg['phi_over_chance']:.1f}×", f"{agg['geodesic_mean']:.3f}"])
    head = table(f"{report.a.name}  vs  {report.b.name}",
                 ["side", "modules", "φ mean", "φ median", "φ weighted", "chance", "vs chance", "geodesic"],
                 rows,
                 note=f"{s['shared']} shared modules (only in A {s['only_in_a']}, only in B "
                      f"{s['only_in_b']}). φ = 1 same directions, ≈ chance unrelated. "
                      f"φ grid shows {grid_module}.")
    extremes = []
    for side in report.sides:
        agg = s["sides"][side]
        for label, key in (("most similar", "most_similar"), ("least similar", "least_similar")):
            for e in agg.get(key, [])[:3]:
                extremes.append([side, label, e["module"].removeprefix("lora_unet_"),
                                 f"{e['phi']:.4f}", f"{e['chance']:.4f}"])
    tables = [head]
    if extremes:
        tables.append(table("Modules", ["side", "", "module", "φ", "chance"], extremes))
    return tables


class GrassmannLoRASimilarity:
    DESCRIPTION = ("How much two LoRAs use the same directions, module by module: φ (Hu et al. 2021) "
                   "against its chance level, principal angles and Grassmann distances, with a heatmap "
                   "by module and the φ(i, j) grid of one module.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True          # its main result is what it shows on the node
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("heatmap", "phi_grid", "summary")
    OUTPUT_TOOLTIPS = ("Modules (depth order) × φ and normalised distances.",
                       "φ(i, j) over the top-i / top-j singular vectors of the chosen module.",
                       "Plain-text summary (aggregates, most and least similar modules).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_a": (LORA_TYPE, {"tooltip": "First LoRA."}),
            "lora_b": (LORA_TYPE, {"tooltip": "Second LoRA (same base model family as the first)."}),
            "side": (SIDE_CHOICES, {"default": "out",
                                    "tooltip": "out: column spaces (what ΔW writes, left singular vectors); "
                                               "in: row spaces (what ΔW reads, right singular vectors); "
                                               "both: report each."}),
            "top": ("INT", {"default": 0, "min": 0, "max": 1024,
                            "tooltip": "Compare only the top-k singular directions of each module; 0 uses "
                                       "each module's effective rank."}),
            "module": ("STRING", {"default": "",
                                  "tooltip": "Module for the φ(i, j) grid: its kohya name, with or without "
                                             "the 'lora_unet_' prefix, or a unique part of it. Empty: the "
                                             "most similar module."}),
        }}

    def run(self, lora_a, lora_b, side, top, module):
        from ..core.similarity import compare

        progress = Progress(1)
        # progress per shared module, then the two images (cancel raises in progress)
        report = compare(lora_a, lora_b, side=side, top=top or None,
                         progress=lambda done, total: progress(done, total + 2))
        first_side = report.sides[0]
        grid_module = _find_module(report, module, first_side)
        heat = report.heatmap_image()
        progress(progress.total - 1)
        grid = report.grid_image(grid_module, first_side)
        progress(progress.total)
        summary = report.text_summary()
        return node_result((pil_to_image(heat), pil_to_image(grid), summary),
                           tables=similarity_tables(report, grid_module), text=summary,
                           images=preview_ui(heat, grid, prefix="grassmann_similarity"))


CLUSTER_CHOICES = ["spectral", "kernel-kmeans", "dbscan", "none"]
MATRIX_TABLE_MAX = 12     # show the full matrix on the node up to this many LoRAs


def kernel_tables(km, result, slots: list[str] | None = None) -> list[dict]:
    """The LoRAs (by input name and file) with their clusters, the matrix with
    rows and columns named by input (as on the node), and the warnings."""
    from ..core.kernel_matrix import unshared_pairs

    n = len(km.names)
    slots = list(slots) if slots else [lora_slot_name(i + 1) for i in range(n)]
    order = list(result.order) if result is not None else list(range(n))
    labels = {}
    if result is not None:
        for label, members in result.groups().items():
            for i in members:
                labels[i] = "noise" if label < 0 else f"c{label}"
    rows = [[slots[i], km.names[i], labels.get(i, "-"), str(int(km.live[i])), str(int(km.dead[i]))]
            for i in order]
    note = [km.kernel.describe(), f"{len(km.modules)} module(s), side {km.side}"]
    if km.min_eigenvalue is not None:
        note.append(f"min eigenvalue {km.min_eigenvalue:.3g}")
    if result is not None:
        note.append(result.describe())
    tables = [table("LoRAs", ["input", "LoRA", "cluster", "live", "dead"], rows, note="; ".join(note))]
    if n <= MATRIX_TABLE_MAX:
        apart = set(unshared_pairs(km.shared))

        def cell(i, j):
            if (min(i, j), max(i, j)) in apart:
                return "none shared"
            v = km.matrix[i, j]
            return "n/a" if v != v else f"{v:.3f}"

        tables.append(table("Kernel matrix", [""] + [slots[j] for j in order],
                            [[slots[i]] + [cell(i, j) for j in order] for i in order],
                            note="none shared: the two LoRAs have no module in common, so nothing "
                                 "was compared" if apart else ""))
    warnings = list(km.warnings) + (list(result.warnings) if result is not None else [])
    if warnings:
        tables.append(notes_block("Warnings", warnings))
    return tables


class GrassmannLoRAKernelMatrix:
    DESCRIPTION = ("Grassmann kernel matrix of any number of LoRAs over the modules they share (Harandi "
                   "et al. 2014 projection and Binet–Cauchy kernels), with clustering: a map of a LoRA "
                   "library. Connect LoRAs to lora_1, lora_2, …: a new input appears as each one is "
                   "connected.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("heatmap", "clusters", "matrix_json")
    OUTPUT_TOOLTIPS = ("The kernel matrix as a heatmap, rows and columns in cluster order.",
                       "The clusters, one line per cluster.",
                       "Names, matrix, kernel, eigenvalues and clusters as JSON.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..core.kernels import DEFAULT_KERNEL, KERNELS

        return {
            "required": {
                "kernel": (list(KERNELS), {
                    "default": DEFAULT_KERNEL,
                    "tooltip": "projection-*: kernels of ‖XᵀY‖²_F (defined across ranks, all positive "
                               "definite but log); bc-*: of |det XᵀY|; bc2-*: of det². Forms: poly "
                               "(β+s)^α, rbf, laplace, binomial, log (Harandi et al. 2014)."}),
                "beta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0e4, "step": 0.01,
                                   "tooltip": "β of the kernel (rbf/laplace width, poly/binomial offset)."}),
                "alpha": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 64.0, "step": 1.0,
                                    "tooltip": "α of the poly and binomial kernels (a positive integer keeps "
                                               "poly positive definite)."}),
                "side": (SIDE_CHOICES, {"default": "out",
                                        "tooltip": "out: column spaces; in: row spaces; both: the two as "
                                                   "separate terms."}),
                "top": ("INT", {"default": 0, "min": 0, "max": 1024,
                                "tooltip": "Keep each LoRA's top-k directions per module; 0 uses the "
                                           "effective rank."}),
                "module_filter": ("STRING", {"default": "",
                                             "tooltip": "Regular expression on kohya module names (e.g. "
                                                        "'attn2' or '^lora_unet_up'); empty uses every "
                                                        "module."}),
                "cluster_method": (CLUSTER_CHOICES, {"default": "spectral",
                                                     "tooltip": "spectral / kernel k-means (k clusters, or by "
                                                                "eigengap), DBSCAN on the induced distance, "
                                                                "or none."}),
                "clusters": ("INT", {"default": 0, "min": 0, "max": 64,
                                     "tooltip": "Number of clusters for spectral / kernel k-means; 0 picks it "
                                                "by the eigengap."}),
                "dbscan_eps": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "DBSCAN neighbourhood radius on the induced kernel "
                                                    "distance."}),
                "dbscan_min_samples": ("INT", {"default": 2, "min": 1, "max": 64,
                                               "tooltip": "DBSCAN: LoRAs within eps needed to form a cluster."}),
                "allow_indefinite": ("BOOLEAN", {"default": False,
                                                 "tooltip": "Allow kernels that are not positive definite "
                                                            "(their negative eigenvalues are reported)."}),
                "kmeans_seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1,
                                        "control_after_generate": False,
                                        "tooltip": "Seed of the k-means restarts (spectral and kernel k-means)."}),
            },
            "optional": lora_slot_inputs("to include in the matrix"),
        }

    def run(self, kernel, beta, alpha, side, top, module_filter, cluster_method, clusters, dbscan_eps,
            dbscan_min_samples, allow_indefinite, kmeans_seed, **slots):
        from ..core.errors import LoraError
        from ..core.kernel_matrix import cluster_kernel_matrix, compute_kernel_matrix

        connected = connected_loras(slots)
        loras = [lora for _, lora in connected]
        if not loras:
            raise LoraError("Grassmann Kernel Matrix: connect at least one LoRA (lora_1, lora_2, …)")
        progress = Progress(1)
        km = compute_kernel_matrix(loras, kernel, beta, alpha, side, module_filter.strip() or None,
                                   top or None, force=allow_indefinite, progress=progress)
        result = None
        if cluster_method != "none" and len(loras) > 1:
            result = cluster_kernel_matrix(km, cluster_method, clusters or None,
                                           dbscan_eps if cluster_method == "dbscan" else None,
                                           dbscan_min_samples if cluster_method == "dbscan" else None,
                                           seed=kmeans_seed, force=allow_indefinite)
        heat = km.heatmap_image(result)
        clusters_text = km.clusters_text(result) if result is not None else "no clustering"
        return node_result((pil_to_image(heat), clusters_text, km.to_json(result=result)),
                           tables=kernel_tables(km, result, [slot for slot, _ in connected]),
                           text=km.text_summary(result),
                           images=preview_ui(heat, prefix="grassmann_kernel"))
