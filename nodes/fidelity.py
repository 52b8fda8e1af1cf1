"""LoRA Merge Fidelity: does a merge still do what each source did, measured
with the user's own model (core.fidelity does the maths; this is the ComfyUI glue)."""
from __future__ import annotations

import json

from .common import (CATEGORY, LORA_TYPE, Progress, apply_lora, connected_loras, lora_labels,
                     lora_slot_inputs, node_result, parse_weights, pil_to_image, preview_ui, table)

MAX_MERGES = 4
COST = ("Cost: sources × (2 + merges) × seeds × timesteps denoiser evaluations of one latent each "
        "(2 sources, 3 merges, 2 seeds, 3 timesteps: 60), batched seeds × timesteps per call.")


def merge_slot_name(j: int) -> str:
    return f"merged_{j}"


class GrassmannLoRAMergeFidelity:
    DESCRIPTION = ("Does the merged LoRA still do what each source did? For each source k, under its "
                   "prompt and on the same noisy latents, compares the model patched with the merge to "
                   "the model patched with source k alone (at its weight) and to the unpatched model: "
                   "F = ‖ε_merge − ε_k‖ / ‖ε_k − ε_base‖ (0 = the merge does what k does, 1 = it is as "
                   "far from k as the bare model) and the cosine between ε_merge − ε_base and ε_k − ε_base, averaged over "
                   "seeds × timesteps. Patches through ComfyUI's own LoRA loading, so it measures what "
                   "the sampler sees. " + COST)
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True          # its main result is the table it shows
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("heatmap", "json")
    OUTPUT_TOOLTIPS = ("F per source (rows) and merge (columns); grey = the source has no effect.",
                       "Everything measured, per seed × timestep too, as JSON.")

    @classmethod
    def INPUT_TYPES(cls):
        merges = {merge_slot_name(j): (LORA_TYPE, {"tooltip": f"Merged LoRA #{j} to measure (optional)."})
                  for j in range(2, MAX_MERGES + 1)}
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The unpatched diffusion model the LoRAs were made for."}),
                "clip": ("CLIP", {"tooltip": "The unpatched text encoder; each variant encodes the prompts "
                                             "with its own patched copy."}),
                "merged_1": (LORA_TYPE, {"tooltip": "A merged LoRA to measure (e.g. Karcher Merge LoRA's "
                                                    "merged_lora); it is applied at strength 1."}),
                "prompts": ("STRING", {"multiline": True, "default": "",
                                       "tooltip": "One prompt per source, one per line in slot order. An "
                                                  "empty or missing line: the source's trigger words from "
                                                  "its metadata, else a generic prompt."}),
                "weights": ("STRING", {"default": "",
                                       "tooltip": "The weight each source had in the merge (comma-separated, "
                                                  "slot order); source k is applied at this strength. "
                                                  "Empty: the weights recorded in merged_1 when it was made "
                                                  "from these sources, else 1/N each."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "control_after_generate": False,
                                 "tooltip": "First noise seed (the same noise as KSampler's for that seed)."}),
                "seeds": ("INT", {"default": 2, "min": 1, "max": 64,
                                  "tooltip": "How many seeds (seed, seed+1, …). " + COST}),
                "timesteps": ("INT", {"default": 3, "min": 1, "max": 50,
                                      "tooltip": "How many noise levels, spread over the schedule (3: at "
                                                 "1/6, 1/2 and 5/6 of it). " + COST}),
                "width": ("INT", {"default": 512, "min": 16, "max": 4096, "step": 8,
                                  "tooltip": "Image width of the latent (pixels)."}),
                "height": ("INT", {"default": 512, "min": 16, "max": 4096, "step": 8,
                                   "tooltip": "Image height of the latent (pixels)."}),
            },
            "optional": {**merges, **lora_slot_inputs("the merge was made from (a source)")},
        }

    def run(self, model, clip, merged_1, prompts, weights, seed, seeds, timesteps, width, height, **slots):
        from ..core.errors import LoraError
        from ..core.fidelity import forward_passes, measure, timestep_fractions

        sources = [lora for _, lora in connected_loras(slots)]
        if not sources:
            raise LoraError("LoRA Merge Fidelity: connect the sources the merge was made from "
                            "(lora_1, lora_2, …)")
        merges = [merged_1] + [slots[merge_slot_name(j)] for j in range(2, MAX_MERGES + 1)
                               if slots.get(merge_slot_name(j)) is not None]
        w = parse_weights(weights, len(sources)) or recorded_weights(merged_1, sources)
        texts, origins = source_prompts(prompts, sources)
        fractions = timestep_fractions(timesteps)
        denoiser = ComfyDenoiser(model, clip, sources, w, merges, texts)
        progress = Progress(forward_passes(len(sources), len(merges), seeds, timesteps))
        report = measure(denoiser, lora_labels(sources), lora_labels(merges), list(range(seed, seed + seeds)),
                         denoiser.sigmas(fractions), denoiser.latent_shape(width, height), weights=w,
                         prompts=texts, fractions=fractions, progress=progress)
        for name, text, origin in zip(report.sources, texts, origins):
            if origin != "given":
                report.notes.append(f"{name}: prompt from its {origin}: {text!r}")
        image = report.heatmap_image()
        return node_result((pil_to_image(image), report.to_json()), tables=fidelity_tables(report),
                           text=report.text(), images=preview_ui(image, prefix="grassmann_fidelity"))


def recorded_weights(merged, sources) -> list[float]:
    """The weights a merge made by this pack recorded for these sources (by file
    name, any order); 1/N when it recorded none or other sources."""
    from ..core.merge import RECIPE_KEY

    try:
        recipe = json.loads((getattr(merged, "metadata", None) or {}).get(RECIPE_KEY, "null")) or {}
        by_name = {s["name"]: float(wk) for s, wk in zip(recipe.get("sources", []), recipe.get("weights", []))}
    except (ValueError, TypeError, KeyError, AttributeError):
        by_name = {}
    names = [s.name for s in sources]
    if len(by_name) == len(names) and all(n in by_name for n in names):
        return [by_name[n] for n in names]
    return [1.0 / len(sources)] * len(sources)


def source_prompts(text: str, sources) -> tuple[list[str], list[str]]:
    """One prompt per source from the node's lines (empty → trigger words / generic)."""
    from ..core.prompts import prompt_for

    lines = (text or "").splitlines()
    out = [prompt_for(lines[k] if k < len(lines) else "", lora.metadata) for k, lora in enumerate(sources)]
    return [p for p, _ in out], [o for _, o in out]


def fidelity_tables(report) -> list[dict]:
    cols, rows = report.table()
    prompts = [[name, prompt] for name, prompt in zip(report.sources, report.prompts)]
    return [table("Merge fidelity through the model", cols, rows,
                  note="F = ‖ε_merge − ε_k‖ / ‖ε_k − ε_base‖: 0 = the merge does what source k does, "
                       "1 = as far from k as the bare model. cos: between ε_merge − ε_base and ε_k − ε_base (1 = "
                       "same direction). effect: ‖ε_k − ε_base‖ / ‖ε_base‖. "
                       f"{report.forward_passes} denoiser evaluations ({len(report.seeds)} seed(s) × "
                       f"{len(report.sigmas)} timestep(s), σ = "
                       + ", ".join(f"{s:.3g}" for s in report.sigmas) + ")."),
            table("Prompts", ["", ""], prompts + [["note", n] for n in report.notes])]


class ComfyDenoiser:
    """core.fidelity's ``evaluate`` inside ComfyUI: every variant is the input
    MODEL/CLIP patched by ``apply_lora`` (ComfyUI's own LoRA loading, on clones),
    prompts are encoded by the variant's own CLIP, and the denoiser runs through
    ComfyUI's sampler machinery (CFGGuider: model loading and patching, cond
    processing, model wrappers) with a one-shot "sampler" that evaluates it at
    the requested noise levels instead of stepping."""

    def __init__(self, model, clip, sources, weights, merges, prompts):
        from ..core.fidelity import BASE, merge_variant, source_variant

        self.model, self.clip, self.prompts = model, clip, prompts
        everyone = range(len(prompts))
        # variant -> (how to patch it, the prompts core.fidelity evaluates it under)
        self.variants = {BASE: (lambda: (model, clip), everyone)}
        for k, (lora, wk) in enumerate(zip(sources, weights)):
            self.variants[source_variant(k)] = (lambda l=lora, s=wk: apply_lora(model, clip, l, s, s), [k])
        for j, lora in enumerate(merges):
            self.variants[merge_variant(j)] = (lambda l=lora: apply_lora(model, clip, l, 1.0, 1.0), everyone)
        self._patched: tuple[str, tuple] | None = None

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        from ..core.errors import LoraError
        fmt = self.model.model.latent_format
        if getattr(fmt, "latent_dimensions", 2) != 2:
            raise LoraError("LoRA Merge Fidelity: only image models (2-D latents) are supported")
        ratio = int(getattr(fmt, "spacial_downscale_ratio", 8))
        return int(fmt.latent_channels), max(1, height // ratio), max(1, width // ratio)

    def sigmas(self, fractions: list[float]) -> list[float]:
        sampling = self.model.get_model_object("model_sampling")
        return [float(sampling.percent_to_sigma(f)) for f in fractions]

    def _variant(self, name: str):
        """(MODEL, conds by prompt) of a variant. Evaluation is variant-major, so
        each variant is patched once; its prompts are all encoded before the
        UNet runs, so ComfyUI does not swap CLIP and UNet back and forth."""
        if self._patched is None or self._patched[0] != name:
            patch, ks = self.variants[name]
            model, clip = patch()
            conds = {k: clip.encode_from_tokens_scheduled(clip.tokenize(self.prompts[k])) for k in ks}
            self._patched = (name, (model, conds))
        return self._patched[1]

    def __call__(self, variant: str, k: int, noise, sigmas):
        import comfy.samplers
        import torch

        model, conds = self._variant(variant)
        positive = conds[k]
        found = {}

        def one_shot(model_k, x, schedule, extra_args=None, callback=None, disable=None):
            # model_k: KSamplerX0Inpaint → CFGGuider → BaseModel
            sampling = model_k.inner_model.inner_model.model_sampling
            s = sigmas.to(x.device, torch.float32)
            x_t = sampling.noise_scaling(s, model_k.noise, model_k.latent_image)
            denoised = model_k(x_t, s, **(extra_args or {}))
            found["eps"] = ((x_t - denoised) / s.view(-1, *[1] * (x.ndim - 1))).float().cpu()
            return x

        guider = comfy.samplers.CFGGuider(model)
        guider.inner_set_conds({"positive": positive})
        guider.set_cfg(1.0)                       # the conditional prediction alone
        schedule = torch.tensor(sorted(set(sigmas.tolist()), reverse=True) + [0.0])
        latent = torch.zeros_like(noise)
        guider.sample(noise, latent, comfy.samplers.KSAMPLER(one_shot), schedule, disable_pbar=True,
                      seed=0)
        return found["eps"]
