"""KnOTS (Stoica et al., ICLR 2025, arXiv 2410.19735): align the sources by
the SVD of their concatenation [T_1 … T_K] = U·Σ·[V_1ᵀ … V_Kᵀ], merge the
per-source blocks Σ·V_kᵀ = Uᵀ·T_k (R×d_in) with TIES or DARE, ΔW = U·merged.

The blocks keep KnOTS's input coordinates (the layer's own d_in entries, where
its elementwise rules act): R×d_in, factor-sized, never a d_out×d_in ΔW. So
the result's column space lies in span(U), while its row space is the
elementwise-merged blocks' (it leaves the sources' row span wherever TIES
trims or DARE drops). U is the intrinsic one (core_space.column_split of
[w_k·col_factor_k] over its nonzero spectrum).

The output side runs in the job's frame coordinates: U from the eigh of the
concatenation's n×n Gram, the blocks as (Uᵀ·w_k·left_k)·rows_k with rows_k the
source's right factor in the module's input space (a Gram-measured source's
own down factor), so no per-source SVD and no d-sized QR. The result's SVD is
U·svd(merged), merged's top p from one eigh of its R×R Gram (grassmann.gram_eigh),
and its error against the target is ‖merged_p − Σ_k Uᵀ·T_k‖ (plus the target's
part on the directions U drops): the result lies in span(U).
"""
from __future__ import annotations

import math

import torch

from ..factored import FactoredSVD, leading_svd
from ..grassmann import gram_eigh
from .basis import Job, Merged, Source, split
from .core_space import column_range
from .plan import Options
from .ties_dare import elementwise
from .truncate import cut, live_count


def knots_ties(job: Job, opts: Options) -> Merged:
    return _knots(job, opts, "ties")


def knots_dare(job: Job, opts: Options) -> Merged:
    return _knots(job, opts, "dare")


def _rows(job: Job, s: Source, right: torch.Tensor) -> torch.Tensor:
    """The source's right factor as rows in the module's input space: a
    Gram-measured source's coordinates are those of its own downᵀ, so its down
    factor itself; else the lift."""
    if s.gram is not None:
        return s.module.down.to(right.device, torch.float64)
    return job.lift_down(right.T)


def _knots(job: Job, opts: Options, rule: str) -> Merged:
    u = column_range(torch.cat([s.weight * s.form.col_factor() for s in job.sources], 1))
    blocks = []
    for s in job.sources:
        left, right = s.form.factors()
        blocks.append((u.T @ (s.weight * left)) @ _rows(job, s, right))
    res, trunc = _top(job, elementwise(rule, blocks, job, opts), opts)
    if not res.S.numel():                    # the rule cancelled everything here
        return Merged(res.U, res.V.T, known=res, error=job.target_norm, truncation=trunc)
    col = u @ res.U
    v_in = job.input_coords(res.V)           # V projected onto the sources' row span: all the report needs
    # ‖result − target‖²: its part inside the frames (a small core difference) + the rows leaving the row span
    outside = res.S[:, None] * (res.V.T - job.lift_down(v_in.T))
    error = math.hypot(job.core_error(FactoredSVD(col, res.S, v_in)), float(torch.linalg.matrix_norm(outside)))
    up, down = split(col, res.S, res.V)
    return Merged(job.lift_up(up), down, error=error, truncation=trunc, spans=(col, v_in), module_space=True)


def _top(job: Job, merged: torch.Tensor, opts: Options) -> tuple[FactoredSVD, float]:
    """merged's SVD at the job's rank (or rank auto) and the truncation error:
    from one eigh of its small Gram when σ_p allows (leading_svd), else its SVD."""
    eig = gram_eigh(merged)
    p, trunc = cut(job, eig[0][:live_count(eig[0])], opts)
    if not p:                                # nothing live: the merge cancels here
        return FactoredSVD(merged.new_zeros(merged.shape[0], 0), merged.new_zeros(0),
                           merged.new_zeros(merged.shape[1], 0)), trunc
    res = leading_svd(merged, p, eig)
    if res is None:
        w, s, zh = torch.linalg.svd(merged, full_matrices=False)
        p, trunc = cut(job, s[:live_count(s)], opts)
        res = FactoredSVD(w[:, :p], s[:p], zh[:p].T)
    return res, trunc
