"""The geometric means: U*, V* = a mean of the sources' column spaces on
Gr(p, d_out) and of their row spaces on Gr(p, d_in); core M = Σ w_k U*ᵀΔW_k V*
(p×p, from factors) = P·S·Qᵀ; up = U*·P·√S, down = √S·Qᵀ·V*ᵀ, alpha = p
(scale 1). Runs in the job's frames.

- karcher: the weighted Karcher mean of each source's top-p singular space
  (core.karcher: trust-region Newton, converged for any spread); jobs of one
  coordinate shape can be stacked into one batched call (karcher_batch).
  distance="chordal" takes the chordal (flag) mean of the same top-p spaces.
- chordal: the flag mean of each source's whole (effective-rank) singular
  spaces, so sources of different ranks count with all their directions
  (core.means.flag_mean); closed form.
- flag-median: the robust chordal median of the same spaces by IRLS
  (core.means.flag_median): one outlier LoRA does not drag the result.

Rank "auto" (consensus rank): the directions a weighted majority of the
sources share, min over the two sides of the number of eigenvalues of
Σ w_k U_kU_kᵀ (Σ w = 1) above ½, at least 1. Every side reports those
eigenvalues (the leading ones) as a consensus measure: ≈1 for a direction all
sources hold, ≈w_k for one only source k holds.
"""
from __future__ import annotations

import math

import torch

from ..factored import FactoredSVD
from ..karcher import KarcherResult, karcher_mean
from ..means import Gram, check_weights, consensus_rank, flag_mean, flag_median
from .basis import Job, Merged, split
from .plan import Options

CONSENSUS_SHOWN = 8      # eigenvalues beyond the merge rank shown per side in the report


def _weights(job: Job, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([s.weight for s in job.sources], dtype=like.dtype, device=like.device)


def _whole(s, side: str) -> torch.Tensor:
    return s.form.col_basis if side == "U" else s.form.row_basis


def _whole_spaces(job: Job, side: str) -> list[torch.Tensor]:
    """An orthonormal basis of each source's whole column or row space: the means
    see only the projectors, so no per-source SVD is needed where the source is
    measured from its Grams."""
    return [_whole(s, side) for s in job.sources]


def _top_spaces(job: Job, side: str, p: int) -> list[torch.Tensor]:
    """Each source's top-p singular space: its whole space where its rank is p,
    else its leading p singular vectors (the source's SVD)."""
    return [_whole(s, side) if s.rank == p else (s.svd.U if side == "U" else s.svd.V)[:, :p]
            for s in job.sources]


def _consensus(job: Job, side: str) -> torch.Tensor:
    """Eigenvalues of Σ w_k U_kU_kᵀ over the sources' whole effective-rank spaces, descending
    (no eigenvectors: rank auto needs the count first)."""
    spaces = _whole_spaces(job, side)
    return Gram.of(spaces).spectrum(check_weights(_weights(job, spaces[0]), len(spaces), spaces[0]))


def _rank(job: Job, opts: Options, consensus: dict[str, torch.Tensor] | None) -> int:
    """The job's rank, or with rank "auto" the consensus rank (at least 1, at most the
    smallest source rank: the Karcher mean needs p directions from every source)."""
    if opts.rank != "auto":
        return job.rank
    agreed = min(int(consensus_rank(consensus[side])) for side in ("U", "V"))
    job.rank = max(1, min(agreed, min(s.rank for s in job.sources)))
    return job.rank


def _consensus_stats(consensus: torch.Tensor, p: int) -> dict:
    shown = consensus[: p + CONSENSUS_SHOWN]
    return {"consensus_rank": int(consensus_rank(consensus)),
            "consensus": [round(x, 4) for x in shown.tolist()]}


def _merged(job: Job, u: torch.Tensor, v: torch.Tensor, stats: dict) -> Merged:
    """The core of the weighted sources between the means (uᵀ·target·v, the target core the
    error needs anyway), its SVD and the exact error."""
    core = (u.T @ job.target_core) @ v
    pp, ss, qh = torch.linalg.svd(core)
    known = FactoredSVD(u @ pp, ss, v @ qh.T)
    # every job here has frames (several sources, a framed method)
    return Merged(*split(known.U, known.S, known.V), stats=stats, known=known, error=job.core_error(known))


def karcher(job: Job, opts: Options) -> Merged:
    return karcher_batch([job], opts)[0]


def karcher_batch(group: list[Job], opts: Options) -> list[Merged]:
    """Jobs with equal (d_out, d_in, K): means of both sides, then the cores. With rank
    "auto" jobs may end with different ranks: each rank is one batched call."""
    auto = opts.rank == "auto"
    cons = [{side: _consensus(j, side) for side in ("U", "V")} if auto else None for j in group]
    ranks = [_rank(j, opts, c) for j, c in zip(group, cons)]
    out: list[Merged | None] = [None] * len(group)
    for p in sorted(set(ranks)):
        idx = [i for i, r in enumerate(ranks) if r == p]
        jobs = [group[i] for i in idx]
        res = {}
        for side in ("U", "V"):
            bases = torch.stack([torch.stack(_top_spaces(j, side, p)) for j in jobs])
            w = torch.stack([_weights(j, bases) for j in jobs])
            res[side] = karcher_mean(bases, w, opts["tol"], opts["max_iter"], opts["distance"])
        for b, i in enumerate(idx):
            job = group[i]
            whole = all(s.rank == p for s in job.sources)   # top-p spaces are the whole spaces
            stats = {side: {**_side(res[side], b), **_consensus_stats(
                cons[i][side] if cons[i] else res[side].consensus[b] if whole else _consensus(job, side), p)}
                for side in ("U", "V")}
            out[i] = _merged(job, res["U"].mean[b], res["V"].mean[b], stats)
    return out


def _side(res: KarcherResult, b: int) -> dict:
    return {"iterations": int(res.iterations[b]), "grad_norm": float(res.grad_norm[b]),
            "converged": bool(res.converged[b]), "unique": bool(res.unique[b]),
            "afsari": bool(res.afsari[b]), "radius": float(res.radius[b]),
            "max_angle_deg": math.degrees(float(res.max_angle[b])),
            "pairwise_max_angle_deg": math.degrees(float(res.pairwise_max_angle[b])),
            "pairwise_distance": float(res.pairwise_distance[b]),
            "hess_products": int(res.hess_products[b]),
            "hessian_min": float(res.hessian_min[b]), "hessian_lower": float(res.hessian_lower[b]),
            "local_min": bool(res.local_min[b])}


def _chordal_means(job: Job, opts: Options, mean) -> Merged:
    """Both sides by a chordal rule on the sources' whole spaces: mean(spaces, w, p)
    returns (basis, consensus eigenvalues, largest angle to a source, per-side figures)."""
    cons = {side: _consensus(job, side) for side in ("U", "V")} if opts.rank == "auto" else None
    p = _rank(job, opts, cons)
    means, stats = {}, {}
    for side in ("U", "V"):
        spaces = _whole_spaces(job, side)
        means[side], lam, angle, figures = mean(spaces, _weights(job, spaces[0]), p)
        angle = math.degrees(float(angle))
        stats[side] = {"grad_norm": 0.0, "unique": angle < 45.0, "max_angle_deg": angle, **figures,
                       **_consensus_stats(lam, p)}
    return _merged(job, means["U"], means["V"], stats)


def chordal(job: Job, opts: Options) -> Merged:
    def mean(spaces, w, p):
        res = flag_mean(spaces, w, p)
        return res.mean, res.consensus, res.max_angle, {"iterations": 0, "converged": True,
                                                        "unique": bool(res.unique)}
    return _chordal_means(job, opts, mean)


def flag_median_merge(job: Job, opts: Options) -> Merged:
    def mean(spaces, w, p):
        res = flag_median(spaces, w, p, max_iter=opts["max_iter"])
        return res.mean, res.consensus, res.max_angle, {"iterations": int(res.iterations),
                                                        "converged": bool(res.converged),
                                                        "objective": float(res.objective)}
    return _chordal_means(job, opts, mean)
