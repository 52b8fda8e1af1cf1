"""One fused module from the split modules another layout uses for it.

diffusers splits weights the original model fuses (Flux ``img_attn.qkv`` =
to_q | to_k | to_v rows). With part i placed at rows P_i of the fused weight,
ΔW_fused[P_i] = s_i·U_i·D_i and every other row is 0, which is exactly

    ΔW_fused = [U_1' … U_n'] · [D_1; …; D_n]     (block-diagonal up, stacked down)

where U_i' holds s_i·U_i in rows P_i and zeros elsewhere: rank Σ r_i, no
dense ΔW. A part placed in several row ranges (a scale/shift swap) fills each
range from its own rows. Parts that are absent stay zero rows.
"""
from __future__ import annotations

import torch


def fuse(d_out: int, parts: list[tuple[torch.Tensor, torch.Tensor, float, tuple]]
         ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, scale) of the fused module from parts (up_i, down_i, scale_i,
    ((row_start, row_end, part_row), …)). A common scale stays a scale;
    different scales are folded into the up blocks."""
    scales = {s for _, _, s, _ in parts}
    common = scales.pop() if len(scales) == 1 else None
    dtype = parts[0][0].dtype
    total = sum(int(down.shape[0]) for _, down, _, _ in parts)
    up = torch.zeros(d_out, total, dtype=dtype)
    col = 0
    for u, _, s, rows in parts:
        r = int(u.shape[1])
        block = u if common is not None else u * s
        for start, end, first in rows:
            up[start:end, col:col + r] = block[first:first + end - start]
        col += r
    down = torch.cat([d.to(dtype) for _, d, _, _ in parts], dim=0)
    return up, down, (common if common is not None else 1.0)
