"""Karcher Merge LoRA: merge any number of LoRAs into one real LoRA and apply it."""
from __future__ import annotations

import os

from .common import (CATEGORY, DTYPE_CHOICES, LORA_TYPE, Progress, apply_lora, check_families,
                     connected_loras, lora_slot_inputs, lora_slot_name, node_result, notes_block,
                     parse_weights, save_dtype, table)


class GrassmannLoRAKarcherMerge:
    DESCRIPTION = ("Merges the connected LoRAs into one LoRA of the chosen rank (Karcher mean of their "
                   "subspaces on the Grassmann manifold, or a classic method) and applies it to MODEL and "
                   "CLIP exactly as LoraLoader would apply the saved file. Connect LoRAs to lora_1, "
                   "lora_2, …: a new input appears as each one is connected.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL", "CLIP", LORA_TYPE, "STRING")
    RETURN_NAMES = ("model", "clip", "merged_lora", "report")
    OUTPUT_TOOLTIPS = ("The diffusion model patched with the merge (a clone).",
                       "The text encoder patched with the merge (a clone).",
                       "The merged LoRA; connect Save LoRA to write it as a kohya file.",
                       "Fidelity report: how well the merge keeps each source.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..core.karcher import MAX_NEWTON_STEPS
        from ..core.merge import TABLE, describe
        from ..core.merge.blocks import SPEC_HELP

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to patch with the merge."}),
                "clip": ("CLIP", {"tooltip": "The text encoder to patch with the merge."}),
                "method": (list(TABLE), {"default": "karcher", "tooltip": describe()}),
                "rank": ("INT", {"default": 0, "min": 0, "max": 1024,
                                 "tooltip": "Rank p of the merged LoRA (every method but linear and concat). 0: per "
                                            "module, the smallest rank among the sources that have it (a "
                                            "source's effective rank when lower than its nominal one). "
                                            "Modules whose sources allow less get what they allow. Ignored "
                                            "by linear and concat: they are exact, at the summed rank."}),
                "weights": ("STRING", {"default": "",
                                       "tooltip": "One weight per connected LoRA, comma-separated, in slot "
                                                  "order (e.g. '0.7, 0.3'; weight 1 = that LoRA at full "
                                                  "strength). Empty: equal weights 1/N, the average."}),
                "dtype": (DTYPE_CHOICES, {"default": "fp16",
                                          "tooltip": "Precision of the merged factors, as they would be saved; "
                                                     "MODEL/CLIP are patched with exactly these values."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                             "tooltip": "How strongly to apply the merge to the diffusion model."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                            "tooltip": "How strongly to apply the merge to the text encoder."}),
                "ties_density": ("FLOAT", {"default": 0.2, "min": 0.01, "max": 1.0, "step": 0.01,
                                           "tooltip": "ties only: fraction of each LoRA's ΔW entries kept "
                                                      "(largest magnitudes)."}),
                "dare_drop": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 0.99, "step": 0.01,
                                        "tooltip": "dare only: probability of dropping each ΔW entry "
                                                   "(the rest are rescaled by 1/(1−p))."}),
                "dare_seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1,
                                      "control_after_generate": False,
                                      "tooltip": "dare only: seed of the random drops."}),
            },
            "optional": {
                "karcher_max_iter": ("INT", {"default": MAX_NEWTON_STEPS, "min": 1, "max": 10000,
                                             "tooltip": "karcher only: most Newton (trust-region) steps per "
                                                        "module side. Related LoRAs converge in 2–5, unrelated "
                                                        "ones in 20–60; a side stopped short is reported as not "
                                                        "converged. flag-median has its own limit (300 IRLS "
                                                        "steps)."}),
                "space": (["core", "full"], {"default": "core",
                                             "tooltip": "ties/dare only: core = on the LoRAs' intrinsic core "
                                                        "coordinates (exact, from factors, fast); full = on every "
                                                        "entry of the dense ΔW, as TIES/DARE were published."}),
                "tsv_keep": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                       "tooltip": "tsv only: share of each LoRA's singular directions used."}),
                "rank_auto": ("BOOLEAN", {"default": False,
                                          "tooltip": "Per module the smallest rank holding `energy` of the "
                                                     "merged energy (svd and the core-space methods); the "
                                                     "rank input is then ignored."}),
                "energy": ("FLOAT", {"default": 0.99, "min": 0.5, "max": 1.0, "step": 0.005,
                                     "tooltip": "rank_auto: share of the merged energy kept per module."}),
                "block_weights": ("STRING", {"default": "", "multiline": True,
                                             "tooltip": "One line per connected LoRA (slot order; empty line or "
                                                        f"'-': all blocks at 1): {SPEC_HELP}. Take blocks from A, "
                                                        "others from B."}),
                "normalise": ("BOOLEAN", {"default": False,
                                          "tooltip": "linear/concat/svd: stack without burning — directions "
                                                     "several LoRAs share come out at one LoRA's strength, "
                                                     "directions one LoRA uses alone stay untouched."}),
                **lora_slot_inputs("to merge"),
            },
        }

    def run(self, model, clip, method, rank, weights, dtype, strength_model, strength_clip,
            ties_density, dare_drop, dare_seed, karcher_max_iter=None, space="core", tsv_keep=1.0,
            rank_auto=False, energy=0.99, block_weights="", normalise=False, **slots):
        from ..core.errors import LoraError
        from ..core.merge import merge

        connected = connected_loras(slots)
        loras = [lora for _, lora in connected]
        if not loras:
            raise LoraError("Karcher Merge LoRA: connect at least one LoRA (lora_1, lora_2, …)")
        check_families(connected, model)        # before the merge, naming the sources
        progress = Progress(1)
        result = merge(loras, parse_weights(weights, len(loras)), method,
                       "auto" if rank_auto else merge_rank(method, rank),
                       dtype=save_dtype(dtype), seed=dare_seed, ties_density=ties_density,
                       dare_drop=dare_drop, naming="kohya",
                       max_iter=karcher_max_iter if method == "karcher" else None,
                       progress=progress, space=space, keep=tsv_keep, energy=energy, normalise=normalise,
                       block_weights=block_specs(block_weights, len(loras)))   # per module; cancel raises
        # The merged factors are already cast to `dtype`: applying them "as stored"
        # is exactly what LoraLoader does with the file Save LoRA writes from them.
        model_out, clip_out = apply_lora(model, clip, result.lora, strength_model, strength_clip, None)
        progress(progress.total)
        text = result.report.table()
        return node_result((model_out, clip_out, result.lora, text),
                           tables=fidelity_tables(result.report, [slot for slot, _ in connected]), text=text)


def block_specs(text: str, n: int) -> list[str | None] | None:
    """The block_weights input as core.merge takes it: one line per LoRA; blank: none."""
    from ..core.merge.blocks import spec_lines

    return spec_lines(text, n)


def merge_rank(method: str, rank: int) -> int | None:
    """The node's rank input as core.merge takes it: 0 (and any value for the
    exact linear/concat merges, which have no rank) is None = core's default."""
    from ..core.merge import get

    return None if not get(method).ranked or rank == 0 else rank


def fidelity_tables(report, slots: list[str] | None = None) -> list[dict]:
    """Per source (named by its input, lora_1 …): share of its energy the merge
    keeps and φ to its column spaces; the whole-LoRA figures; the per-group table;
    the warnings as wrapped lines."""
    s = report.summary()
    slots = list(slots) if slots else [lora_slot_name(k + 1) for k in range(len(report.sources))]
    rows = []
    for k, name in enumerate(report.sources):
        kept, phi = s["kept"].get(name), s["phi"].get(name)
        rows.append([slots[k], os.path.splitext(name)[0], f"{report.weights[k]:g}",
                     "-" if kept is None else f"{kept:.3f}", "-" if phi is None else f"{phi:.3f}"])
    facts = [["modules", f"{s['modules']} ("
              + ", ".join(f"{v} {k}" for k, v in s["status"].items() if v) + ")"],
             ["relative error", "-" if s["rel_error"] is None else f"{s['rel_error']:.3e}"]]
    if s.get("rel_error_max") is not None:
        facts.append(["worst module", f"{s['rel_error_max']:.3e} "
                                      f"{s['rel_error_max_module'].removeprefix('lora_unet_')}"])
    if "karcher" in s:
        kk = s["karcher"]
        facts.append(["Karcher iterations", f"{kk['iterations_mean']:.1f} mean, {kk['iterations_max']} max"])
        facts.append(["not unique / not converged", f"{kk['not_unique']} / {kk['not_converged']}"])
    for reason, n in s["skipped"].items():
        facts.append([f"skipped ({reason})", str(n)])
    tables = [table(f"{report.method} merge of {len(report.sources)} LoRAs",
                    ["input", "source", "weight", "energy kept", "φ to merge"], rows,
                    note="energy kept: share of ‖ΔW_k‖² inside the merge's column and row spaces; "
                         "φ: overlap of the column spaces (1 = same)."),
              table("Fidelity", ["", ""], facts)]
    head, groups = report.group_rows(slots)
    if groups:
        tables.append(table("By block group", head, groups,
                            note="rel.err: ‖merge − Σ w_k ΔW_k‖ / ‖Σ w_k ΔW_k‖; kept / φ: as above, per "
                                 "group" + ("; iters: Karcher steps per module side, mean/max; non-uniq: "
                                            "modules whose mean is not unique" if "iters" in head else "")))
    if report.warnings:
        tables.append(notes_block("Warnings", list(report.warnings)))
    return tables
