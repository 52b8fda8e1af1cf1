"""Principal angles between subspaces, the primitive every measure builds on.

X (d×k) and Y (d×l) are orthonormal bases (batched: ...×d×k). Only
min(k, l) angles exist. Cosines come from the SVD of the small XᵀY; for small
angles arccos is ill-conditioned, so sines come from the SVD of the residual
of the smaller basis projected out by the larger one, and θ = atan2(sin, cos)
pairs them (Knyazev & Argentati 2002; scipy.linalg.subspace_angles).
"""
from __future__ import annotations

import math

import torch


def _order(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(smaller, larger) by column count."""
    return (x, y) if x.shape[-1] <= y.shape[-1] else (y, x)


def principal_cosines(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cos θ, descending, clipped to [0, 1]. Cheap: one min(k,l)-sized SVD."""
    return torch.linalg.svdvals(x.transpose(-1, -2) @ y).clamp(0.0, 1.0)


# Above this angle arccos(cos θ) is accurate (its error ε/sin θ is under
# ~10ε relative), so the sine SVD, as costly as a thin QR, is skipped when
# every angle is at least this large: the usual case for unrelated LoRAs.
ARCCOS_SAFE_ANGLE = 0.3


def principal_angles(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """θ in [0, π/2], ascending, accurate for small and large angles alike."""
    small, large = _order(x, y)
    m = large.transpose(-1, -2) @ small                      # l×k
    cos = torch.linalg.svdvals(m).clamp(0.0, 1.0)            # descending
    if cos.numel() == 0 or bool((cos <= math.cos(ARCCOS_SAFE_ANGLE)).all()):
        return torch.arccos(cos)
    resid = small - large @ m                                 # d×k, singular values = sin θ
    sin = torch.linalg.svdvals(resid).clamp(0.0, 1.0).flip(-1)  # ascending
    return torch.atan2(sin, cos).clamp(0.0, math.pi / 2)


def log_cos_product(cos: torch.Tensor) -> torch.Tensor:
    """log Π cos θ = log|det XᵀY| (equal ranks), without the underflow of the
    plain product (≈1e-48 for two unrelated 64-dim subspaces of R^768)."""
    return torch.log(cos.clamp_min(torch.finfo(cos.dtype).tiny)).sum(-1)
