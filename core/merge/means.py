"""karcher: U*, V* = weighted Karcher means of the sources' top-p column and
row spaces on Gr(p, d_out), Gr(p, d_in) (core.karcher); core
M = Σ w_k U*ᵀΔW_k V* (p×p, from factors) = P·S·Qᵀ; up = U*·P·√S,
down = √S·Qᵀ·V*ᵀ, alpha = p (scale 1). distance="chordal" uses the chordal
(extrinsic) mean instead. Runs in the job's frames; jobs of one coordinate
shape can be stacked into one batched call (karcher_batch)."""
from __future__ import annotations

import math

import torch

from ..factored import FactoredSVD
from ..karcher import KarcherResult, karcher_mean
from .basis import Job, Merged, split
from .plan import Options


def karcher(job: Job, opts: Options) -> Merged:
    return karcher_batch([job], opts)[0]


def karcher_batch(group: list[Job], opts: Options) -> list[Merged]:
    """One batch of jobs with equal (d_out, d_in, p, K): means of both sides, then the cores."""
    p = group[0].rank
    us = torch.stack([torch.stack([s.svd.U[:, :p] for s in j.sources]) for j in group])
    vs = torch.stack([torch.stack([s.svd.V[:, :p] for s in j.sources]) for j in group])
    w = torch.tensor([[s.weight for s in j.sources] for j in group], dtype=us.dtype, device=us.device)
    ku = karcher_mean(us, w, opts["tol"], opts["max_iter"], opts["distance"])
    kv = karcher_mean(vs, w, opts["tol"], opts["max_iter"], opts["distance"])
    out = []
    for b, job in enumerate(group):
        u, v = ku.mean[b], kv.mean[b]
        core = sum(s.weight * ((u.T @ s.svd.U) * s.svd.S) @ (s.svd.V.T @ v) for s in job.sources)
        pp, ss, qh = torch.linalg.svd(core)
        known = FactoredSVD(u @ pp, ss, v @ qh.T)
        # ΔW_merge − target as one small matrix: coordinates are exact isometries (no cancellation);
        # every Karcher job has frames (several sources, a framed method)
        error = float(torch.linalg.matrix_norm((known.U * known.S) @ known.V.T - job.target_core))
        out.append(Merged(*split(known.U, known.S, known.V), stats={"U": _side(ku, b), "V": _side(kv, b)},
                          known=known, error=error))
    return out


def _side(res: KarcherResult, b: int) -> dict:
    return {"iterations": int(res.iterations[b]), "grad_norm": float(res.grad_norm[b]),
            "converged": bool(res.converged[b]), "unique": bool(res.unique[b]),
            "afsari": bool(res.afsari[b]), "radius": float(res.radius[b]),
            "max_angle_deg": math.degrees(float(res.max_angle[b])),
            "pairwise_max_angle_deg": math.degrees(float(res.pairwise_max_angle[b])),
            "pairwise_distance": float(res.pairwise_distance[b])}
