"""Measuring one merged module against its sources, from factors: the error
against the exact weighted sum, each source's energy kept and φ."""
from __future__ import annotations

import math

import torch

from ..factored import FactoredSVD, svd_from_factors
from ..measures import phi_from_product
from .advisor import advise
from .basis import Job, Merged
from .report import ModuleReport


def _split_off(basis: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x = basis·c + q·r with q orthonormal and ⊥ basis. One Gram–Schmidt pass
    loses orthogonality when x lies nearly in the span, so a second runs when
    the first removed more than 1 − 1/√2 of some column ("twice is enough",
    Kahan/Parlett); otherwise the second pass only costs time."""
    c = basis.T @ x
    rest = x - basis @ c
    if bool((torch.linalg.vector_norm(rest, dim=-2) < torch.linalg.vector_norm(x, dim=-2) / math.sqrt(2)).any()):
        c2 = basis.T @ rest
        rest = rest - basis @ c2
        c = c + c2
    q, r = torch.linalg.qr(rest)
    return c, q, r


def _error_norm(target: FactoredSVD, up: torch.Tensor, down: torch.Tensor) -> float:
    """‖up·down − U_T·S_T·V_Tᵀ‖_F from factors. With up = U_T·c_u + q_u·r_u and
    downᵀ = V_T·c_d + q_d·r_d ([U_T q_u], [V_T q_d] orthonormal), the difference
    is [U_T q_u]·X·[V_T q_d]ᵀ for a small X, whose norm is the answer: no
    cancellation between ‖ΔW_merge‖² and ‖target‖² (an exact merge reports
    rounding-level error), and only d×r QRs of the merge's own factors."""
    c_u, _, r_u = _split_off(target.U, up)
    c_d, _, r_d = _split_off(target.V, down.T)
    top = c_u @ c_d.T - torch.diag(target.S)
    x = torch.cat([torch.cat([top, c_u @ r_d.T], 1), torch.cat([r_u @ c_d.T, r_u @ r_d.T], 1)], 0)
    return float(torch.linalg.matrix_norm(x))

def fidelity(job: Job, res: Merged, group: str, status: str) -> ModuleReport | None:
    """The module's report, or None when the merge cancels to zero there. Uses the
    method's known spaces or SVD and exact error when it gave them (no second factorisation)."""
    target = job.target_norm
    error = res.error
    if error is None:
        error = _error_norm(job.target, res.scale * res.up, res.down)
    if res.spans is not None:
        u, v = res.spans
    else:
        merged = res.known if res.known is not None else svd_from_factors(res.up, res.down, res.scale)
        if merged.dead:
            return None
        merged = merged.top(merged.effective_rank)
        u, v = merged.U, merged.V
    kept, phis, energy = {}, {}, {}
    for s in job.sources:
        proj, cross = s.form.projected(u, v)   # Uᵀ·ΔW_k·V and Uᵀ·(ΔW_k's column basis)
        energy[s.index] = s.form.energy
        kept[s.index] = float((proj ** 2).sum()) / energy[s.index]
        phis[s.index] = float(phi_from_product(cross))
    rel = error / target if target > 0 else (0.0 if error == 0 else None)
    note = "rank lowered to what the sources allow" if job.capped else ""
    return ModuleReport(job.name, group, status, [s.index for s in job.sources], int(res.down.shape[0]),
                        target, error, rel, energy, kept, phis, res.stats, note, res.truncation, advise(job))
