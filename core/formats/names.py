"""Tensor keys → (module, role) and module paths → canonical kohya names.

Canonical names are what kohya sd-scripts writes and ComfyUI maps
(``comfy/lora.py`` ``model_lora_keys_unet/clip``):

* UNet, families with a table (sd1, sd2, sdxl): the table's canonical name,
  found through ``arch_for(family).aliases`` from any spelling (diffusers or
  LDM path, dotted or underscored).
* Text encoders: ``lora_te_`` (SD1/SD2), ``lora_te1_``/``lora_te2_`` (SDXL:
  CLIP-L / CLIP-G) + the transformers path with dots → underscores.
* DiT families (tables in ``core.arch``): ``lora_unet_<LDM key>``, found
  from the LDM or diffusers spelling; a diffusers module that is a slice of a
  fused LDM weight (Flux ``to_q`` of ``img_attn.qkv``) resolves to the fused
  module plus its rows (``resolve_module``).
* Families without a table and modules missing from a table: ``lora_unet_`` /
  ``lora_te*_`` + the path with dots → underscores.
"""
from __future__ import annotations

import re

from ..sdarch import DIT_FAMILIES, TABLE_FAMILIES, arch_for

# Key suffix -> (role, naming scheme it belongs to; None: the module's other keys decide).
ROLE_SUFFIXES: tuple[tuple[str, str, str | None], ...] = (
    (".lora_up.weight", "up", "kohya"),
    (".lora_down.weight", "down", "kohya"),
    (".lora_mid.weight", "mid", "kohya"),
    ("_lora.up.weight", "up", "diffusers-processor"),
    ("_lora.down.weight", "down", "diffusers-processor"),
    (".lora.up.weight", "up", "diffusers"),
    (".lora.down.weight", "down", "diffusers"),
    (".lora_linear_layer.up.weight", "up", "diffusers"),
    (".lora_linear_layer.down.weight", "down", "diffusers"),
    (".lora_B.default.weight", "up", "peft"),
    (".lora_A.default.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B", "up", "peft"),
    (".lora_A", "down", "peft"),
    (".alpha", "alpha", None),
    (".dora_scale", "dora_scale", None),
    (".lora_magnitude_vector", "dora_scale", None),
    *((f".hada_{r}", f"hada_{r}", "kohya") for r in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")),
    *((f".lokr_{r}", f"lokr_{r}", "kohya")
      for r in ("w1_a", "w1_b", "w2_a", "w2_b", "w1", "w2", "t2")),
)

# Adapters that are not low-rank products: never read as modules (extras, or an
# error when a file holds nothing else).
UNSUPPORTED_SUFFIXES: dict[str, str] = {
    ".oft_blocks": "LyCORIS OFT/BOFT block (orthogonal, not low-rank)",
    ".oft_diag": "LyCORIS OFT block (orthogonal, not low-rank)",
    ".rescale": "LyCORIS OFT/BOFT rescale",
    ".a1.weight": "LyCORIS GLoRA factor", ".a2.weight": "LyCORIS GLoRA factor",
    ".b1.weight": "LyCORIS GLoRA factor", ".b2.weight": "LyCORIS GLoRA factor",
    ".diff": "full weight difference (not low-rank)",
    ".set_weight": "weight replacement (not low-rank)",
}
# Non-LoRA tensors that may ride along with LoRA modules.
OTHER_SUFFIXES: dict[str, str] = {
    ".diff_b": "bias difference (not a LoRA weight)",
    ".w_norm": "norm weight difference (not a LoRA weight)",
    ".b_norm": "norm bias difference (not a LoRA weight)",
    ".reshape_weight": "reshape hint (not a LoRA weight)",
    ".bias": "bias (not a LoRA weight)",
}

CLONEOFSIMO_KEY = re.compile(r"^(unet|text_encoder):(\d+):(up|down)$")
LORA_ROLES = ("up", "down", "mid")
LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def parse_key(key: str) -> tuple[str, str, str | None] | None:
    """(module key, role, naming) for a LoRA tensor key, None for anything else."""
    m = CLONEOFSIMO_KEY.match(key)
    if m:
        return f"{m.group(1)}:{m.group(2)}", m.group(3), "cloneofsimo"
    for suffix, role, naming in ROLE_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role, naming
    return None


def classify_extra(key: str) -> tuple[str, bool]:
    """(reason, is an unsupported adapter) for a key that is no LoRA factor."""
    for suffix, reason in UNSUPPORTED_SUFFIXES.items():
        if key.endswith(suffix):
            return reason, True
    for suffix, reason in OTHER_SUFFIXES.items():
        if key.endswith(suffix):
            return reason, False
    if key.startswith("bundle_emb.") or "string_to_param" in key or key in ("emb_params",):
        return "Textual-Inversion embedding (not a LoRA weight)", False
    if key.endswith(".weight"):
        return "plain weight tensor (not a LoRA factor)", False
    return "not a recognised LoRA tensor", False


# Module-key prefixes -> part. Parts: unet, te, te1, te2, te3, or a ComfyUI text
# encoder name (clip_l, clip_g, clip_h, t5xxl) resolved once the family is known.
_PREFIXES: tuple[tuple[str, str | None], ...] = (
    ("lora_unet__", "unet"),  # VideoX-Fun's Wan LoRAs (ComfyUI's lora_convert strips the extra '_')
    ("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"),
    ("lora_te_", "te"), ("lora_transformer_", "unet"), ("lycoris_", "unet"),
    ("unet.base_model.model.", "unet"), ("text_encoder_2.base_model.model.", "te2"),
    ("text_encoder.base_model.model.", "te"), ("base_model.model.", None),
    ("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder_3.", "te3"), ("text_encoder.", "te"),
    ("transformer.", "unet"), ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"),
    ("text_encoders.", None),
)
_COMFY_TE = re.compile(r"^(clip_[lgh]|t5xxl|t5xl|llama|umt5xxl)\.(?:transformer\.)?(.*)$")
_TE_BODY = re.compile(r"^(text_model|encoder|shared)[._]")


def split_prefix(module_key: str) -> tuple[str, str]:
    """(part, body path) of a module key, e.g. ('te2', 'text_model.encoder.layers.0.mlp.fc1')."""
    for prefix, part in _PREFIXES:
        if module_key.startswith(prefix):
            body = module_key[len(prefix):]
            if part is None:
                m = _COMFY_TE.match(body)
                if m:
                    return m.group(1), m.group(2)
                part = "te" if _TE_BODY.match(body) else "unet"
            return part, body
    m = _COMFY_TE.match(module_key)
    if m:
        return m.group(1), m.group(2)
    return ("te" if _TE_BODY.match(module_key) else "unet"), module_key


def resolve_part(part: str, family: str) -> str:
    """The kohya text-encoder slot (te, te1, te2, te3) or 'unet' for this family."""
    if part == "unet":
        return part
    if family in ("sd1", "sd2"):
        return "te" if part in ("te", "te1", "clip_l", "clip_h") else {"clip_g": "te2"}.get(part, part)
    if family == "sdxl":
        return {"te": "te1", "clip_l": "te1", "clip_g": "te2"}.get(part, part)
    if family == "flux":  # CLIP-L and T5 only; OneTrainer and diffusers put T5 second
        return {"te": "te1", "clip_l": "te1", "te2": "te3", "t5xxl": "te3"}.get(part, part)
    if family in ("sd3", "hidream"):  # diffusers' text_encoder is CLIP-L
        return {"te": "te1", "clip_l": "te1", "clip_g": "te2", "t5xxl": "te3"}.get(part, part)
    # single-encoder families (Wan's UMT5; Qwen-Image's and Z-Image's Qwen LLMs spell theirs in the table)
    return {"clip_l": "te1", "clip_g": "te2", "clip_h": "te", "t5xxl": "te3", "umt5xxl": "te"}.get(part, part)


_TE_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def normalise_body(body: str, te: bool) -> str:
    """Undo the diffusers attention-processor spelling: 'attn1.processor.to_out'
    is 'attn1.to_out.0' (UNet) and 'self_attn.processor.to_q' is 'self_attn.q_proj'."""
    if ".processor." not in body:
        return body
    head, _, leaf = body.rpartition(".processor.")
    if te:
        return f"{head}.{_TE_PROCESSOR.get(leaf, leaf)}"
    return f"{head}.{leaf}.0" if leaf == "to_out" else f"{head}.{leaf}"


def kohya_name(part: str, body: str) -> str:
    return f"lora_{part}_{body.replace('.', '_')}"


Rows = tuple[tuple[int, int, int], ...]


def resolve_module(module_key: str, family: str, variant: str | None = None
                   ) -> tuple[str, bool, Rows | None]:
    """(canonical kohya name, whether the family's table knows it, rows): rows
    is None for a whole module, else the placements ((row_start, row_end,
    part_row), …) of a split part inside the fused module it names."""
    raw_part, body = split_prefix(module_key)
    part = resolve_part(raw_part, family)
    body = normalise_body(body, part != "unet")
    if family in TABLE_FAMILIES:
        arch = arch_for(family, variant)
        if part == "unet":
            hit = arch.canonical(body)
            if hit:
                return hit, True, None
            split = arch.split_of(body)
            if split:
                return split[0], True, split[1]
        else:
            # DiT families: a text encoder's slot varies with the variant (Chroma's
            # T5 is te1, Flux's te3), its body path does not
            slots = (part, "te1", "te2", "te3", "te") if family in DIT_FAMILIES else (part,)
            for slot in slots:
                name = kohya_name(slot, body)
                if name in arch.shapes:
                    return name, True, None
            hit = arch.canonical(body)  # a table spelling of the encoder path (Qwen's model.layers.N…)
            if hit and not hit.startswith("lora_unet_"):
                return hit, True, None
    return kohya_name(part, body), False, None


def canonical_name(module_key: str, family: str) -> tuple[str, bool]:
    """(canonical kohya name, whether the family's table knows it); a split
    part (diffusers to_q of Flux) gives the fused module it belongs to."""
    name, known, _ = resolve_module(module_key, family)
    return name, known
