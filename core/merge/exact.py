"""The exact sum and its best rank-p approximation, from factors.

    linear   Σ w_k ΔW_k by concatenated factors, rank Σ r_k ("concat" is the
             same merge under its other name).
    svd      best rank-p approximation of Σ w_k ΔW_k: frames of the stacked
             factors and the top-p triplets of the (Σr)×(Σr) core — equal to
             truncating a dense SVD.

normalise ("stack without burning", both): the sum seen through the number of
sources using each direction. N_out = Σ_k Π_k, Π_k the orthogonal projector
onto source k's column space (N_in likewise on the row spaces), and
    ΔW_norm = f(N_out)·(Σ w_k ΔW_k)·f(N_in),   f(λ) = min(1, λ^−½)
on N's eigen-directions. A direction one source uses alone has λ = 1 and keeps
its full strength; one that m sources share exactly (same input and output
directions) has λ = m on both sides and is divided by m — what one source
gives; partly shared directions fall in between; f never amplifies. Computed
in the job's frames from the sources' own singular vectors (n×n eigenproblems).
"""
from __future__ import annotations

import torch

from ..factored import DEAD_ATOL, RANK_RTOL, FactoredSVD, leading_svd
from .basis import Job, Merged, split
from .plan import Options
from .truncate import finish, live_count


def _shrink(n: torch.Tensor) -> torch.Tensor:
    lam, vec = torch.linalg.eigh(n)
    return (vec * lam.clamp_min(1.0).rsqrt()) @ vec.T


def normalised(job: Job) -> FactoredSVD:
    """The SVD of ΔW_norm (module docstring) in the job's frames."""
    n_out = sum(s.svd.U @ s.svd.U.T for s in job.sources)
    n_in = sum(s.svd.V @ s.svd.V.T for s in job.sources)
    u, s, vh = torch.linalg.svd(_shrink(n_out) @ job.target_core @ _shrink(n_in), full_matrices=False)
    return FactoredSVD(u, s, vh.T)


def linear(job: Job, opts: Options) -> Merged:
    """The concatenated factors as they are (the file is exactly Σ w_k ΔW_k). In
    frames the report comes from the frames' coordinates: the merge's core
    there, its error against the target core, and its spaces — the whole frame
    (identity bases) when the sum keeps every direction, which svdvals tells
    without an SVD; else (cancelling sources) the core's SVD."""
    if opts.params.get("normalise"):
        return finish(job, normalised(job), opts)
    dev = opts.device
    up = torch.cat([s.weight * s.module.scale * s.module.up.to(dev, torch.float64) for s in job.sources], 1)
    down = torch.cat([s.module.down.to(dev, torch.float64) for s in job.sources], 0)
    if job.frames is None:
        return Merged(up, down)
    out, inn = (f.coords for f in job.frames)
    cols = torch.cat([torch.full((m.factor_rank,), c, dtype=out.dtype, device=out.device)
                      for m, c in zip(job.members, _member_weights(job))])
    core = (out * cols) @ inn.T
    error = float(torch.linalg.matrix_norm(core - job.target_core))
    sv = torch.linalg.svdvals(core)
    live = int((sv > RANK_RTOL * sv[0]).sum()) if float(sv[0]) > DEAD_ATOL else 0
    if live == core.shape[0] == core.shape[1]:
        eye = torch.eye(live, dtype=core.dtype, device=core.device)
        return Merged(up, down, error=error, spans=(eye, eye), module_space=True)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return Merged(up, down, known=FactoredSVD(u, s, vh.T), error=error, module_space=True)


def _member_weights(job: Job) -> list[float]:
    """w_k·s_k per member of the frames, in order; 0 for a member dead here (the
    sources are the live members, in the same order; a LoRA given twice is one
    module object twice)."""
    live = iter(job.sources)
    source = next(live, None)
    out = []
    for member in job.members:
        if source is not None and source.module is member:
            out.append(source.weight * source.module.scale)
            source = next(live, None)
        else:
            out.append(0.0)
    return out


def svd(job: Job, opts: Options) -> Merged:
    """In frames the top-p triplets of the small target core come from
    leading_svd when its spectrum allows, and the error is the norm of the
    difference matrix (no cancellation); else from the full SVD, error
    ‖S_T[p:]‖ (exact, a sum of squares). Rank auto: truncate.finish on the target's spectrum."""
    if opts.params.get("normalise"):
        return finish(job, normalised(job), opts)
    if opts.rank == "auto":
        return finish(job, job.target, opts)
    if job.frames is not None:
        res = leading_svd(job.target_core, job.rank)
        if res is not None:
            return Merged(*split(res.U, res.S, res.V), known=res, error=job.core_error(res))
    res = job.target
    p = min(job.rank, live_count(res.S))
    return Merged(*split(res.U[:, :p], res.S[:p], res.V[:, :p]), known=res.top(p),
                  error=float(torch.linalg.vector_norm(res.S[p:])))
