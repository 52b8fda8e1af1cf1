"""Truncating a method's result to the merge rank p, or to the smallest rank
holding a stated share of its energy (rank "auto"), with the error reported.

A rule hands its whole result as (U, S, V) — orthonormal U, V in the job's
coordinates, S ≥ 0 in the rule's order of importance — and finish() keeps the
first p triplets (a stable sort by S keeps the rule's order among equal values:
an isotropic spectrum truncates along the directions the rule ranked first).
The truncation error ‖S[p:]‖ is exact because U, V are orthonormal; a result
whose factors are not (a rank-deficient polar factor) is re-decomposed first.
"""
from __future__ import annotations

import torch

from ..factored import RANK_RTOL, FactoredSVD, leading_svd
from .basis import Job, Merged, split
from .plan import Options

ORTHONORMAL_ATOL = 1e-9


def energy_rank(job: Job, s: torch.Tensor, share: float) -> int:
    """The smallest p with Σ_{i<p} σ_i² ≥ share·Σ σ_i² (s descending): the default rank-auto policy."""
    e = torch.cumsum(s * s, 0)
    return int(torch.searchsorted(e, share * e[-1] * (1 - 1e-12)).item()) + 1


def _orthonormal(x: torch.Tensor) -> bool:
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return bool(torch.allclose(x.T @ x, eye, atol=ORTHONORMAL_ATOL))


def finish(job: Job, res: FactoredSVD, opts: Options, rank_auto=energy_rank, orthonormal: bool = False) -> Merged:
    """The rule's result at the job's rank (or rank auto), as merged factors with
    their SVD, the exact error against the target (in frames: one small matrix)
    and the relative truncation error. orthonormal: the rule guarantees
    orthonormal U, V (no check)."""
    u, s, v = res.U, res.S, res.V
    if not orthonormal and not (_orthonormal(u) and _orthonormal(v)):
        p_, s, qh = torch.linalg.svd((u * s) @ v.T, full_matrices=False)
        u, v = p_, qh.T
    order = torch.sort(s, descending=True, stable=True).indices
    u, s, v = u[:, order], s[order], v[:, order]
    live = live_count(s)
    p, trunc = cut(job, s[:live], opts, rank_auto)
    return _merged(job, FactoredSVD(u[:, :p], s[:p], v[:, :p]), trunc)


def live_count(s: torch.Tensor) -> int:
    """How many of the descending singular values s count as nonzero (> RANK_RTOL·σ_1)."""
    return int((s > RANK_RTOL * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0


def cut(job: Job, s: torch.Tensor, opts: Options, rank_auto=energy_rank) -> tuple[int, float]:
    """The rank p a result with live spectrum s (descending) keeps — the job's rank,
    or rank auto — and its relative truncation error ‖s[p:]‖/‖s‖."""
    if opts.rank == "auto":
        p = rank_auto(job, s, opts.energy) if s.numel() else 0
    else:
        p = min(job.rank, s.numel())
        _mark_capped(job, p, opts)
    total = float(torch.linalg.vector_norm(s))
    return p, float(torch.linalg.vector_norm(s[p:])) / total if total > 0 else 0.0


def _mark_capped(job: Job, p: int, opts: Options) -> None:
    """Note in the job when it keeps fewer directions (p) than the rank asked for."""
    job.capped = job.capped or (opts.rank is not None and p < opts.rank)


def _merged(job: Job, known: FactoredSVD, trunc: float) -> Merged:
    """The truncated result as merged factors, with its exact error in frames."""
    error = job.core_error(known) if job.frames is not None else None
    return Merged(*split(known.U, known.S, known.V), known=known, error=error, truncation=trunc)


def finish_core(job: Job, u: torch.Tensor, core: torch.Tensor, v: torch.Tensor, opts: Options) -> Merged:
    """finish() for a rule whose result is u·core·vᵀ with orthonormal u, v (its
    basis) and a small dense core. At a fixed rank the top-p triplets come from
    leading_svd (one eigh, lifted by u and v: orthonormal by construction, so
    not re-checked) and the truncation figure is the norm of the difference
    matrix, ‖core − its rank-p part‖/‖core‖; rank auto, or a spectrum
    leading_svd declines, takes the core's full SVD and finish()."""
    if opts.rank != "auto":
        res = leading_svd(core, job.rank)
        if res is not None:
            total = float(torch.linalg.matrix_norm(core))
            trunc = float(torch.linalg.matrix_norm((res.U * res.S) @ res.V.T - core)) / total
            _mark_capped(job, job.rank, opts)
            return _merged(job, FactoredSVD(u @ res.U, res.S, v @ res.V), trunc)
    p, s, qh = torch.linalg.svd(core, full_matrices=False)
    return finish(job, FactoredSVD(u @ p, s, v @ qh.T), opts)
