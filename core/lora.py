"""The in-memory form of a LoRA: modules with exact low-rank factors.

Every supported format (kohya, diffusers, PEFT, ComfyUI-native, cloneofsimo,
LyCORIS LoHa/LoKr) is read into this one shape, so the geometry code never
cares where a file came from:

    ΔW = scale · up @ down        up: d_out × R,  down: R × d_in

Conv weights are flattened row-major to d_in = c_in·kh·kw (the layout
``weight.reshape(d_out, -1)`` gives), which is how ComfyUI reshapes ΔW back.
LoHa and LoKr are stored in their exact factored form (face-splitting /
Khatri–Rao and Kronecker products), so R may exceed the nominal rank.

A plain LoRA read from a file keeps its factors in the dtype stored (fp16,
bf16, fp32, fp64); LoHa/LoKr/lora_mid/fused factors are built in float32
(float64 when stored so). Code that computes with ``up``/``down`` converts
them to its own dtype first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Base-model families we detect; "unknown" when nothing decides it.
FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "flux2", "qwen_image", "z_image", "wan", "hidream",
            "hunyuan_video", "ltx", "unknown")
FAMILY_LABELS = {
    "sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3/SD3.5",
    "flux": "Flux.1", "flux2": "Flux.2", "qwen_image": "Qwen-Image", "z_image": "Z-Image",
    "wan": "Wan 2.x", "hidream": "HiDream", "hunyuan_video": "HunyuanVideo", "ltx": "LTX-Video",
    "unknown": "unknown",
}


@dataclass
class LoraModule:
    """One adapted layer. ``name`` is canonical: the kohya module name that
    ComfyUI maps for this family (e.g. ``lora_unet_down_blocks_0_attentions_0_
    transformer_blocks_0_attn1_to_q``), whatever naming the file used."""

    name: str
    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0
    rank: int | None = None          # nominal adapter dim as stored in the file
    alpha: float | None = None
    weight_shape: tuple[int, ...] | None = None  # base weight shape; 4-D for convs
    kind: str = "lora"               # lora | loha | lokr
    source_keys: tuple[str, ...] = ()
    dtype: torch.dtype = torch.float32  # dtype the factors were stored in

    def __post_init__(self):
        if self.rank is None:
            self.rank = int(self.down.shape[0])
        if self.weight_shape is None:
            self.weight_shape = (int(self.up.shape[0]), int(self.down.shape[1]))

    @property
    def d_out(self) -> int:
        return int(self.up.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.down.shape[1])

    @property
    def factor_rank(self) -> int:
        """Inner dimension of the stored factors (≥ the true rank of ΔW)."""
        return int(self.down.shape[0])

    @property
    def is_conv(self) -> bool:
        return len(self.weight_shape) == 4

    @property
    def part(self) -> str:
        return module_part(self.name)

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ΔW (d_out × d_in flat). For tests and small layers only."""
        return self.scale * (self.up.to(dtype) @ self.down.to(dtype))


def module_part(name: str) -> str:
    """'unet', 'te', 'te1', 'te2' … from a canonical name."""
    for prefix, part in (("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"),
                         ("lora_te_", "te"), ("lora_unet_", "unet")):
        if name.startswith(prefix):
            return part
    return "other"


@dataclass
class LoraFile:
    path: str
    format: str
    family: str = "unknown"
    modules: dict[str, LoraModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    extras: dict[str, str] = field(default_factory=dict)   # key -> why it is not a LoRA weight
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        import os
        return os.path.basename(self.path)

    @property
    def family_label(self) -> str:
        return FAMILY_LABELS.get(self.family, self.family)

    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    def alphas(self) -> list[float]:
        return sorted({m.alpha for m in self.modules.values() if m.alpha is not None})

    def parts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self.modules.values():
            counts[m.part] = counts.get(m.part, 0) + 1
        return counts


def check_finite(path: str, key: str, t: torch.Tensor) -> tuple[float, float]:
    """Raise a LoraError naming the key when a factor holds NaN or Inf; else
    (min, max). One min/max pass (NaN and ±Inf both reach it), judged in
    Python: ~20× faster than isfinite(t).all(), which materialises a boolean
    tensor."""
    from .errors import LoraError
    if t.numel() == 0:
        return 0.0, 0.0
    lo, hi = (float(x) for x in torch.aminmax(t))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(t)).sum())
        raise LoraError(f"{bad} non-finite value(s) (NaN/Inf) in tensor of shape {tuple(t.shape)}",
                        path, key)
    return lo, hi


def is_all_zero(t: torch.Tensor) -> bool:
    """True when every entry is 0 (one min/max pass; faster than not t.any())."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return float(lo) == 0.0 and float(hi) == 0.0


def scale_from_alpha(alpha: float | None, rank: int) -> float:
    """kohya/ComfyUI semantics: alpha/rank, 1.0 when no alpha is stored."""
    if alpha is None or rank == 0 or math.isnan(alpha):
        return 1.0
    return float(alpha) / float(rank)
