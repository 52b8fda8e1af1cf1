"""Synthetic DiT LoRA files in every trainer's format, from the core.arch tables.

A random LoRA over canonical modules (kohya ``lora_unet_<LDM>`` names) is
written the way each trainer spells it: kohya / musubi, ComfyUI-native,
diffusers/PEFT (ai-toolkit), OneTrainer, SimpleTuner LyCORIS (as LoHa and LoKr
that reproduce the same ΔW exactly), DiffSynth (bare diffusers keys). Modules
that diffusers splits are written as their parts (rows of the fused up
factor). Spellings come from the table's alias lists, never from core.formats.
Shared by the tests of every DiT family (tests/test_dit_*.py).
"""
from __future__ import annotations

import math

import torch
from safetensors.torch import save_file

from core.lora import LoraFile, LoraModule
from core.sdarch import arch_for

FORMATS = ("kohya", "comfyui", "peft", "onetrainer", "lycoris_loha", "lycoris_lokr", "diffsynth")

# Text-encoder slots per family as diffusers / ComfyUI spell them: kohya slot ->
# (diffusers component, ComfyUI text-encoder name, OneTrainer slot).
TE_SPELLINGS = {
    "flux": {"te1": ("text_encoder", "clip_l", "te1"), "te3": ("text_encoder_2", "t5xxl", "te2")},
    "sd3": {"te1": ("text_encoder", "clip_l", "te1"), "te2": ("text_encoder_2", "clip_g", "te2"),
            "te3": ("text_encoder_3", "t5xxl", "te3")},
    "hidream": {"te1": ("text_encoder", "clip_l", "te1"), "te2": ("text_encoder_2", "clip_g", "te2"),
                "te3": ("text_encoder_3", "t5xxl", "te3")},
    "qwen_image": {"te": ("text_encoder", "qwen25_7b", "te")},
    "z_image": {"te": ("text_encoder", "qwen3_4b", "te")},
    "wan": {"te": ("text_encoder", "umt5xxl", "te")},
    "flux/chroma": {"te1": ("text_encoder", "t5xxl", "te1")},
    "flux2/klein-4b": {"te": ("text_encoder", "qwen3_4b", "te")},
    "flux2/klein-9b": {"te": ("text_encoder", "qwen3_8b", "te")},
}


def te_spellings(family: str, variant: str | None) -> dict:
    return TE_SPELLINGS.get(f"{family}/{variant}", TE_SPELLINGS.get(family, {}))


def random_dit_lora(family: str, variant: str | None, names: list[str], rank: int = 2, seed: int = 0,
                    alpha: float | None = None) -> LoraFile:
    gen = torch.Generator().manual_seed(seed)
    table = arch_for(family, variant)
    lora = LoraFile(f"{family}-{seed}.safetensors", "kohya", family)
    for name in names:
        shape = table.shapes[name]
        d_out, d_in = shape[0], math.prod(shape[1:])
        up = torch.randn(d_out, rank, generator=gen) * 1e-2
        down = torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)
        a = float(rank) if alpha is None else alpha
        lora.modules[name] = LoraModule(name, up, down, a / rank, rank, a, tuple(shape))
    return lora


def sample_names(family: str, variant: str | None, per_group: int = 100, groups: int = 3) -> list[str]:
    """Every module of the first and last block of each kind, all non-block
    modules and the first layer of each text encoder: every shape the table has."""
    table = arch_for(family, variant)
    by_group: dict[str, list[str]] = {}
    for name in table.shapes:
        by_group.setdefault(table.groups[name], []).append(name)
    kinds: dict[str, list[str]] = {}
    for g in by_group:
        kinds.setdefault(g.rsplit(".", 1)[0] if g[-1:].isdigit() else g, []).append(g)
    out = []
    for kind, gs in kinds.items():
        chosen = gs if len(gs) == 1 else [gs[0], gs[-1]]
        for g in chosen:
            names = by_group[g]
            if kind.startswith("te"):  # one layer of a text encoder
                names = names[:7]
            out += names
    return out


def spellings(family: str, variant: str | None) -> dict[str, list[str]]:
    """canonical -> its dotted aliases in table order (LDM key first, then diffusers)."""
    out: dict[str, list[str]] = {}
    for alias, canon in arch_for(family, variant).aliases.items():
        seen = out.setdefault(canon, [])
        # Arch.add stores each dotted alias, then its underscored twin
        if alias != canon and not (seen and alias == seen[-1].replace(".", "_") != seen[-1]):
            seen.append(alias)
    return out


def _te(canon: str) -> tuple[str, str] | None:
    for slot in ("te1", "te2", "te3", "te"):
        if canon.startswith(f"lora_{slot}_"):
            return slot, canon
    return None


def _diffusers_modules(lora: LoraFile, family: str, variant: str | None):
    """(dotted diffusers path, up, down, scale) per stored module: split modules become parts."""
    table = arch_for(family, variant)
    alias = spellings(family, variant)
    for name, m in lora.modules.items():
        te = _te(name)
        if te:
            comp = te_spellings(family, variant)[te[0]][0]
            # the path inside the encoder, from ComfyUI's '<encoder>.transformer.<path>' (bare
            # paths are ambiguous where two encoders share them, e.g. SD3's CLIP-L and CLIP-G)
            body = next(a for a in alias[name] if ".transformer." in a).split(".transformer.", 1)[1]
            yield "te", f"{comp}.{body}", m.up, m.down, m.scale
            continue
        # ComfyUI's own partial key linear1_qkv is no diffusers spelling
        parts = [p for p in table.split_parts.get(name, ()) if not p[0].endswith("linear1_qkv")]
        if parts:
            by_alias: dict[str, list] = {}
            for part, start, end, first in parts:
                by_alias.setdefault(part, []).append((start, end, first))
            for part, rows in by_alias.items():
                n_rows = max(f + e - s for s, e, f in rows)
                up = torch.zeros(n_rows, m.up.shape[1])
                for s, e, f in rows:
                    up[f:f + e - s] = m.up[s:e]
                keep = up.abs().sum(0) > 0  # a block-diagonal up: the other parts' columns are zero here
                yield "unet", part, up[:, keep], m.down[keep], m.scale
            continue
        names = alias[name]
        yield "unet", names[1] if len(names) > 1 else names[0], m.up, m.down, m.scale


def format_tensors(lora: LoraFile, family: str, variant: str | None, fmt: str) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    alias = spellings(family, variant)
    if fmt in ("kohya", "comfyui"):
        for name, m in lora.modules.items():
            if fmt == "kohya":
                key = name
            elif _te(name):
                key = "text_encoders." + next(a for a in alias[name] if ".transformer." in a)
            else:
                key = "diffusion_model." + alias[name][0]
            t[f"{key}.lora_down.weight"] = m.down.contiguous()
            t[f"{key}.lora_up.weight"] = m.up.contiguous()
            t[f"{key}.alpha"] = torch.tensor(m.scale * m.down.shape[0])
        return t
    for part, path, up, down, scale in _diffusers_modules(lora, family, variant):
        r = down.shape[0]
        flat = path.replace(".", "_")
        if fmt == "peft":
            key = path if part == "te" else f"transformer.{path}"
            t[f"{key}.lora_A.weight"], t[f"{key}.lora_B.weight"] = down.contiguous(), (scale * up).contiguous()
        elif fmt == "diffsynth":
            if part == "te":
                continue  # DiffSynth trains the DiT only
            t[f"{path}.lora_A.default.weight"] = down.contiguous()
            t[f"{path}.lora_B.default.weight"] = (scale * up).contiguous()
        elif fmt == "onetrainer":
            if part == "te":
                slot = next(v[2] for v in te_spellings(family, variant).values() if path.startswith(v[0] + "."))
                key = f"lora_{slot}_" + path.split(".", 1)[1].replace(".", "_")
            else:
                key = f"lora_transformer_{flat}"
            t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"] = down.contiguous(), up.contiguous()
            t[f"{key}.alpha"] = torch.tensor(scale * r)
        elif fmt.startswith("lycoris"):
            if part == "te":
                continue
            key = f"lycoris_{flat}"
            if fmt == "lycoris_loha":  # (B1 A1) ⊙ (1 1ᵀ) = B1 A1
                t[f"{key}.hada_w1_a"], t[f"{key}.hada_w1_b"] = up.contiguous(), down.contiguous()
                t[f"{key}.hada_w2_a"] = torch.ones(up.shape[0], 1)
                t[f"{key}.hada_w2_b"] = torch.ones(1, down.shape[1])
            else:  # kron([[1]], B2 A2) = B2 A2
                t[f"{key}.lokr_w1"] = torch.ones(1, 1)
                t[f"{key}.lokr_w2_a"], t[f"{key}.lokr_w2_b"] = up.contiguous(), down.contiguous()
            t[f"{key}.alpha"] = torch.tensor(scale * r)
        else:
            raise ValueError(fmt)
    return t


def expected_modules(lora: LoraFile, fmt: str) -> set[str]:
    """Formats that carry no text encoder drop those modules."""
    if fmt in ("diffsynth", "lycoris_loha", "lycoris_lokr"):
        return {n for n in lora.modules if not _te(n)}
    return set(lora.modules)


def write(lora: LoraFile, family: str, variant: str | None, fmt: str, path) -> str:
    save_file({k: v.clone() for k, v in format_tensors(lora, family, variant, fmt).items()}, str(path))
    return str(path)
