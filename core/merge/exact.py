"""The exact sum and its best rank-p approximation, from factors.

    linear   Σ w_k ΔW_k by concatenated factors, rank Σ r_k ("concat" is the
             same merge under its other name).
    svd      best rank-p approximation of Σ w_k ΔW_k: frames of the stacked
             factors and the top-p triplets of the (Σr)×(Σr) core — equal to
             truncating a dense SVD.
"""
from __future__ import annotations

import torch

from ..factored import RANK_RTOL, leading_svd
from .basis import Job, Merged, split
from .plan import Options
from .truncate import finish


def linear(job: Job, opts: Options) -> Merged:
    dev = opts.device
    up = torch.cat([s.weight * s.module.scale * s.module.up.to(dev, torch.float64) for s in job.sources], 1)
    down = torch.cat([s.module.down.to(dev, torch.float64) for s in job.sources], 0)
    return Merged(up, down)


def svd(job: Job, opts: Options) -> Merged:
    """In frames the top-p triplets of the small target core come from
    leading_svd when its spectrum allows, and the error is the norm of the
    difference matrix (no cancellation); else from the full SVD, error
    ‖S_T[p:]‖ (exact, a sum of squares). Rank auto: truncate.finish on the target's spectrum."""
    if opts.rank == "auto":
        return finish(job, job.target, opts)
    if job.frames is not None:
        core = job.target_core
        res = leading_svd(core, job.rank)
        if res is not None:
            error = float(torch.linalg.matrix_norm((res.U * res.S) @ res.V.T - core))
            return Merged(*split(res.U, res.S, res.V), known=res, error=error)
    res = job.target
    p = min(job.rank, int((res.S > RANK_RTOL * res.S[0]).sum()))
    return Merged(*split(res.U[:, :p], res.S[:p], res.V[:, :p]), known=res.top(p),
                  error=float(torch.linalg.vector_norm(res.S[p:])))
