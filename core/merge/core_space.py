"""Merges in the intrinsic core space of the sources (Core Space merging,
Panariello et al., NeurIPS 2025, arXiv 2509.17786), and the rules that
reduce to small problems there: TSV-M, Iso-C, Iso-CTS, TIES and DARE.

T_k = w_k·ΔW_k, never formed: each source is its exact SVD U_k·S_k·V_kᵀ in the
job's frame coordinates (basis.Job), so every matrix below is at most
Σr × Σr whatever d. The core basis is intrinsic — U = left singular vectors of
[T_1 … T_K] = range of [w_k·U_k·S_k], V = right singular vectors of
[T_1; …; T_K] = range of [w_k·V_k·S_k], over their nonzero spectrum — so the
result depends neither on how a source's factors are scaled (up·G, G⁻¹·down)
nor on the order of the sources, and nothing lands outside span(U)×span(V):
the published TSV-M / Iso code run on a dense LoRA ΔW takes its SVD over
all min(d) directions and pulls arbitrary null-space vectors in.

    ties, dare  PEFT's rules on the core coordinates M_k = Uᵀ·T_k·V (R×R).
    tsv         per source T_k = P_k·S_k·Q_kᵀ (its top `keep` fraction of
                triplets); ΔW = polar([P_1 … P_K])·diag(S)·polar([Q_1 … Q_K])ᵀ.
    iso-c       the SVD of Σ T_k with every singular value replaced by their mean.
    iso-cts     common subspace = the sum's top ~80 % of the merge rank, the
                rest from each source's top directions orthogonal to it (equal
                shares), both sides orthogonalised (polar), isotropic spectrum.
Every rule hands its whole result to truncate.finish (rank p or rank auto).
"""
from __future__ import annotations

import torch

from ..factored import RANK_RTOL, FactoredSVD, leading_svd, svd_from_factors
from .basis import Job, Merged
from .plan import Options
from .ties_dare import elementwise
from .truncate import finish, finish_core

ISO_CTS_COMMON = 0.8        # share of the merge rank the common subspace takes (the paper's default)


def column_range(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of range(x) over its nonzero spectrum (σ > RANK_RTOL·σ_1):
    eigh of the smaller-side Gram when x is wide or square (frames: n ≤ Σr), else an SVD."""
    if x.shape[0] <= x.shape[1]:
        lam, vec = torch.linalg.eigh(x @ x.T)
        return vec[:, lam > RANK_RTOL ** 2 * lam[-1].clamp_min(0)].flip(-1)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return u[:, s > RANK_RTOL * s[0]]


def core_basis(job: Job) -> tuple[torch.Tensor, torch.Tensor]:
    """The intrinsic U (n_out×R_u) and V (n_in×R_v) of the module's weighted sources."""
    return (column_range(torch.cat([s.weight * s.form.col_factor() for s in job.sources], 1)),
            column_range(torch.cat([s.weight * s.form.row_factor() for s in job.sources], 1)))


def core_coordinates(job: Job, u: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    """M_k = Uᵀ·T_k·V, from each source's SVD."""
    return [s.form.projected(u, v, s.weight)[0] for s in job.sources]


# polar() takes the Gram's eigendecomposition when X is this well conditioned
# (σ_min ≥ POLAR_MIN_RATIO·σ_max): X·Z·Λ^−½·Zᵀ then carries errors ~u·κ(X)² ≤
# 1e-12, at about half an SVD's cost; else the SVD.
POLAR_MIN_RATIO = 1e-2


def polar(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """X(XᵀX)^−½ over X's nonzero spectrum (W·Zᵀ from X = W·Σ·Zᵀ), and whether
    its columns are orthonormal (X has full column rank); never a direction
    outside range(X)."""
    if x.shape[0] >= x.shape[1]:
        lam, z = torch.linalg.eigh(x.T @ x)
        if float(lam[0]) >= POLAR_MIN_RATIO ** 2 * float(lam[-1]) > 0:
            return (x @ (z * lam.rsqrt())) @ z.T, True
    w, s, zh = torch.linalg.svd(x, full_matrices=False)
    live = s > RANK_RTOL * s[0]
    return w[:, live] @ zh[live], bool(live.all()) and x.shape[0] >= x.shape[1]


def ties_core(job: Job, opts: Options) -> Merged:
    return _elementwise_core(job, opts, "ties")


def dare_core(job: Job, opts: Options) -> Merged:
    return _elementwise_core(job, opts, "dare")


def _elementwise_core(job: Job, opts: Options, rule: str) -> Merged:
    u, v = core_basis(job)
    return finish_core(job, u, elementwise(rule, core_coordinates(job, u, v), job, opts), v, opts)


def tsv(job: Job, opts: Options) -> Merged:
    ps, ss, qs = [], [], []
    for s in job.sources:
        r = max(1, round(opts["keep"] * s.rank))
        ps.append(s.svd.U[:, :r] * (1.0 if s.weight >= 0 else -1.0))    # T_k's own SVD: sign in P_k
        ss.append(abs(s.weight) * s.svd.S[:r])
        qs.append(s.svd.V[:, :r])
    (pu, u_ok), (pv, v_ok) = polar(torch.cat(ps, 1)), polar(torch.cat(qs, 1))
    return finish(job, FactoredSVD(pu, torch.cat(ss), pv), opts, orthonormal=u_ok and v_ok)


def iso_c(job: Job, opts: Options) -> Merged:
    t = job.target
    t = t.top(t.effective_rank)
    return finish(job, FactoredSVD(t.U, torch.full_like(t.S, float(t.S.mean())), t.V), opts)


def iso_cts_split(p: int, k: int) -> tuple[int, int]:
    """(common directions, directions per source) for merge rank p and k sources,
    as the paper's code rounds them: the task-specific total a multiple of k."""
    common = int(p * ISO_CTS_COMMON)
    common = max(0, p - round((p - common) / k) * k)
    return common, (p - common) // k


def _target_top(job: Job, c: int) -> FactoredSVD:
    """The sum's top-c triplets (fewer where its effective rank is lower): from
    leading_svd of the target core when its spectrum allows, else its full SVD."""
    res = leading_svd(job.target_core, c) if job.frames is not None and c > 0 else None
    if res is not None:
        return res
    t = job.target
    return t.top(min(c, t.effective_rank))


def iso_cts(job: Job, opts: Options) -> Merged:
    c, per = iso_cts_split(job.rank, len(job.sources))
    t = _target_top(job, c)
    uc, sc, vc = t.U, t.S, t.V
    us, ss, vs = [uc], [sc], [vc]
    if per:
        for s in job.sources:
            left, right = s.form.factors()
            left = s.weight * left
            rest = svd_from_factors(left - uc @ (uc.T @ left), right.T)   # (I − U_c U_cᵀ)·T_k
            rest = rest.top(min(per, rest.effective_rank))
            us.append(rest.U), ss.append(rest.S), vs.append(rest.V)
    s_all = torch.cat(ss)
    (pu, u_ok), (pv, v_ok) = polar(torch.cat(us, 1)), polar(torch.cat(vs, 1))
    return finish(job, FactoredSVD(pu, torch.full_like(s_all, float(s_all.mean())), pv), opts,
                  orthonormal=u_ok and v_ok)
