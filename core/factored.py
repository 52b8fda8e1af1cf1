"""SVD of ΔW = s·up·down from the factors alone, never forming ΔW.

Thin QR of up (d_out×R) and of downᵀ (d_in×R), then an SVD of the small
core s·R_up·R_downᵀ: U = Q_up·P, V = Q_down·Q. Cost O((d_out+d_in)·R²)
against O(d_out·d_in·min(d)) for a dense SVD.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .device import linalg_threads
from .lora import LoraModule

# Singular values below this fraction of the largest count as numerically zero.
RANK_RTOL = 1e-6
# A module whose largest singular value is below this is dead (ΔW ≈ 0).
DEAD_ATOL = 1e-12


@dataclass
class FactoredSVD:
    """U (d_out×k), S (k, descending), V (d_in×k) with ΔW = U·diag(S)·Vᵀ."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def dead(self) -> bool:
        return self.S.numel() == 0 or float(self.S[0]) <= DEAD_ATOL

    @property
    def effective_rank(self) -> int:
        if self.dead:
            return 0
        return int((self.S > RANK_RTOL * self.S[0]).sum())

    def top(self, p: int) -> "FactoredSVD":
        return FactoredSVD(self.U[:, :p], self.S[:p], self.V[:, :p])

    def frobenius(self) -> float:
        return float(torch.linalg.vector_norm(self.S))


def factor_qr(up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype = torch.float64
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin QRs up = Q_up·R_up and downᵀ = Q_dn·R_dn (batched-capable).

    ΔW = s·Q_up·(R_up R_dnᵀ)·Q_dnᵀ, so span(Q_up) / span(Q_dn) are ΔW's column /
    row spaces whenever the small core R_up R_dnᵀ is invertible: callers that
    only need those spans (not ordered singular vectors) can skip the
    d×R·R×R products of svd_from_factors.
    """
    q_up, r_up = torch.linalg.qr(up.to(dtype))                    # d_out×k1, k1×R
    q_dn, r_dn = torch.linalg.qr(down.to(dtype).transpose(-1, -2))  # d_in×k2, k2×R
    return q_up, r_up, q_dn, r_dn


def svd_from_factors(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0,
                     dtype: torch.dtype = torch.float64) -> FactoredSVD:
    """Exact thin SVD of scale·up@down. Works batched: up (...,d_out,R), down (...,R,d_in)."""
    q_up, r_up, q_dn, r_dn = factor_qr(up, down, dtype)
    core = scale * (r_up @ r_dn.transpose(-1, -2))       # k1×k2
    p, s, qh = torch.linalg.svd(core, full_matrices=False)
    return FactoredSVD(q_up @ p, s, q_dn @ qh.transpose(-1, -2))


def module_svd(module: LoraModule, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> FactoredSVD:
    up, down = module.up, module.down
    if device is not None:
        up, down = up.to(device), down.to(device)
    with linalg_threads(1 if up.device.type == "cpu" else None):
        return svd_from_factors(up, down, module.scale, dtype)


def modules_svd(modules: list[LoraModule], dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> list[FactoredSVD]:
    """SVDs of many modules. On CUDA, modules with equal factor shapes are
    stacked into one batched call; on the CPU a plain loop measured faster."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type == "cpu":
        return [module_svd(m, dtype, device) for m in modules]
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(modules):
        groups.setdefault((tuple(m.up.shape), tuple(m.down.shape)), []).append(i)
    out: list[FactoredSVD | None] = [None] * len(modules)
    for idx in groups.values():
        ups = torch.stack([modules[i].up.to(device, dtype) for i in idx])
        downs = torch.stack([modules[i].down.to(device, dtype) for i in idx])
        scales = torch.tensor([modules[i].scale for i in idx], dtype=dtype, device=device)
        res = svd_from_factors(ups * scales[:, None, None], downs, 1.0, dtype)
        for j, i in enumerate(idx):
            out[i] = FactoredSVD(res.U[j], res.S[j], res.V[j])
    return out  # type: ignore[return-value]


def dense_svd(module: LoraModule, dtype: torch.dtype = torch.float64) -> FactoredSVD:
    """Reference: form ΔW and take a full SVD (tests and benchmarks only)."""
    u, s, vh = torch.linalg.svd(module.delta(dtype), full_matrices=False)
    k = min(module.factor_rank, s.numel())
    return FactoredSVD(u[:, :k], s[:k], vh[:k].T)
