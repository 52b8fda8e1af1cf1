"""KnOTS (Stoica et al., ICLR 2025, arXiv 2410.19735): align the sources by
the SVD of their concatenation [T_1 … T_K] = U·Σ·[V_1ᵀ … V_Kᵀ], merge the
per-source blocks Σ·V_kᵀ = Uᵀ·T_k (R×d_in) with TIES or DARE, ΔW = U·merged.

The blocks keep KnOTS's input coordinates (the layer's own d_in entries, where
its elementwise rules act): R×d_in, factor-sized, never a d_out×d_in ΔW. So
the result's column space lies in span(U), while its row space is the
elementwise-merged blocks' (it leaves the sources' row span wherever TIES
trims or DARE drops). U is the intrinsic one (core_space.column_range of
[w_k·U_k·S_k] over its nonzero spectrum). Runs in the module's coordinates.
"""
from __future__ import annotations

import torch

from ..factored import svd_from_factors
from .basis import Job, Merged
from .core_space import column_range
from .plan import Options
from .ties_dare import elementwise
from .truncate import finish


def knots_ties(job: Job, opts: Options) -> Merged:
    return _knots(job, opts, "ties")


def knots_dare(job: Job, opts: Options) -> Merged:
    return _knots(job, opts, "dare")


def _knots(job: Job, opts: Options, rule: str) -> Merged:
    u = column_range(torch.cat([s.weight * s.svd.U * s.svd.S for s in job.sources], 1))
    blocks = [((u.T @ s.svd.U) * (s.weight * s.svd.S)) @ s.svd.V.T for s in job.sources]
    return finish(job, svd_from_factors(u, elementwise(rule, blocks, job, opts)), opts)
