"""cloneofsimo/lora: modules identified by position only.

Positions follow ``model.modules()`` order of the diffusers UNet and CLIP
text encoder at the time (see shared/fixtures/real_loras/README.md): UNet
transformer blocks down 0–2 (two each), up 1–3 (three each), mid last; in a
block attn1 q,k,v,out, then ``ff.net.0.proj`` when GEGLU was a target, then
attn2. Text encoder per layer: k, v, q, out (CLIPAttention registration
order), then fc1, fc2 when CLIPMLP was a target. ΔW = up·down (scale 1).
"""
from __future__ import annotations

import json

from ..errors import LoraError

_UNET_BLOCKS = ([f"down_blocks.{b}.attentions.{j}" for b in range(3) for j in range(2)]
                + [f"up_blocks.{b}.attentions.{j}" for b in (1, 2, 3) for j in range(3)]
                + ["mid_block.attentions.0"])
_ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def unet_paths(geglu: bool) -> list[str]:
    paths = []
    for block in _UNET_BLOCKS:
        tb = f"{block}.transformer_blocks.0"
        paths += [f"{tb}.attn1.{p}" for p in _ATTN]
        if geglu:
            paths.append(f"{tb}.ff.net.0.proj")
        paths += [f"{tb}.attn2.{p}" for p in _ATTN]
    return paths


def text_encoder_paths(count: int, mlp: bool) -> list[str] | None:
    per_layer = ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj"]
    if mlp:
        per_layer += ["mlp.fc1", "mlp.fc2"]
    if count % len(per_layer):
        return None
    return [f"text_model.encoder.layers.{i}.{p}" for i in range(count // len(per_layer))
            for p in per_layer]


def _targets(metadata: dict[str, str], part: str) -> list[str] | None:
    try:
        value = json.loads(metadata.get(part, "null"))
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def module_paths(part: str, count: int, metadata: dict[str, str], path: str) -> list[str]:
    """Dotted module keys ('unet.…' / 'text_encoder.…') for the ``count``
    positions of one part, from the target classes in the metadata or, when
    absent, from the count."""
    targets = _targets(metadata, part)
    if part == "unet":
        geglu = ("GEGLU" in targets) if targets is not None else count == 144
        paths = unet_paths(geglu)
        if len(paths) != count:
            raise LoraError(f"cloneofsimo UNet LoRA with {count} modules matches no known module "
                            f"order (expected {len(paths)} for targets {targets or 'unknown'})", path)
        return [f"unet.{p}" for p in paths]
    mlp = ("CLIPMLP" in targets) if targets is not None else count % 4 != 0
    paths = text_encoder_paths(count, mlp)
    if paths is None:
        raise LoraError(f"cloneofsimo text-encoder LoRA with {count} modules matches no known module "
                        "order", path)
    return [f"text_encoder.{p}" for p in paths]


def list_layout(shapes: list[tuple[int, ...]], path: str) -> dict[str, dict[str, int]]:
    """Module key -> {'up': index, 'down': index} for a pickled [up0, down0, up1, …] list.
    UNet or text encoder is told by the first module's output width (320 for
    the UNet's first attention block, 768/1024 for CLIP)."""
    if len(shapes) % 2:
        raise LoraError(f"cloneofsimo list has an odd number of tensors ({len(shapes)}); "
                        "expected [up0, down0, up1, down1, …]", path, f"[{len(shapes) - 1}]")
    for i in range(0, len(shapes), 2):
        up, down = shapes[i], shapes[i + 1]
        if len(up) != 2 or len(down) != 2:
            raise LoraError(f"cloneofsimo list item is not a 2-D factor (up {up}, down {down})",
                            path, f"[{i}]")
        if up[1] != down[0]:
            raise LoraError(f"rank mismatch: up {up} has rank {up[1]} but down {down} has rank "
                            f"{down[0]}", path, f"[{i}]")
    count = len(shapes) // 2
    part = "unet" if shapes and shapes[0][0] == 320 else "text_encoder"
    keys = module_paths(part, count, {}, path)
    return {key: {"up": 2 * i, "down": 2 * i + 1} for i, key in enumerate(keys)}
