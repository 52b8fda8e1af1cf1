"""Chordal means of subspaces: the flag (extrinsic) mean, the flag median and
the consensus of a set of subspaces, for sources of equal or different ranks.

The weighted sources U_k (…, d, p_k), weights normalised to Σ w_k = 1, enter
only through Σ w_k U_kU_kᵀ = ZDZᵀ with Z = [U_1 … U_K] (d×R, R = Σ p_k) and
D = diag(w_k repeated p_k times). Its nonzero spectrum is that of the R×R
matrix D^½(ZᵀZ)D^½, so after one Gram ZᵀZ (O(d·R²)) everything is R×R work
whatever d, and a reweighting (the flag median) never touches d again.

- flag mean (Draper et al. 2014; the extrinsic or chordal mean): the top-p
  eigenvectors of Σ w_k U_kU_kᵀ, the minimiser of Σ w_k d_chordal²(X, U_k)
  over Gr(p, d) for equal ranks, closed form, unique when λ_p > λ_{p+1}.
- consensus: those eigenvalues. λ ∈ [0, 1]; ≈1 for a direction every source
  holds, ≈w_k for one only source k holds. The orthogonal projector P of any
  rank minimising Σ w_k‖P − U_kU_kᵀ‖²_F = const + Σ_{v∈P} (1 − 2λ_v) keeps
  exactly the eigenvectors with λ > ½: a weighted majority (consensus_rank).
- flag median (Mankovich et al., CVPR 2022, arXiv 2203.04437): the minimiser
  of Σ w_k d_chordal(X, U_k), not squared, by iteratively reweighted flag
  means with weights w_k / max(d_k, ε). One far-off source gets a weight
  1/d_k instead of a pull ∝ d_k, so an outlier does not drag the result.

d_chordal(X, U_k) = √Σ sin²θ over the min(p, p_k) principal angles (Ye & Lim 2016).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LoraError
from .grassmann import cholesky_qr, least_cos2, reorthonormalize

MEDIAN_EPS = 1e-10     # IRLS floor on a distance: a source the median passes through keeps a finite weight
MEDIAN_TOL = 1e-10     # IRLS stops when the relative decrease of Σ w_k d_k is below this
# IRLS converges linearly and can sit on a plateau before a drop (measured on unrelated SDXL
# rank-64 sides: 14–97 steps to MEDIAN_TOL); its own limit, not the Karcher Newton's
MEDIAN_MAX_ITER = 300


def check_weights(weights, k: int, like: torch.Tensor) -> torch.Tensor:
    """Positive finite weights (…, K) normalised to sum 1 (the means do not change
    when all weights are scaled, and tolerances stay scale-free)."""
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.shape[-1] != k:
        raise LoraError(f"{w.shape[-1]} weight(s) for {k} subspaces")
    if not torch.isfinite(w).all():
        raise LoraError("subspace weights must be finite")
    if (w <= 0).any():
        raise LoraError("mean weights must be positive: a zero weight means leaving the source "
                        "out, and a negative weight has no Fréchet-mean meaning (use the linear or "
                        "svd merge to subtract a LoRA)")
    return w / w.sum(-1, keepdim=True)


def _sources(bases) -> tuple[torch.Tensor, list[int]]:
    """Z = [U_1 … U_K] (…, d, R) and the ranks p_k, from a (…, K, d, p) tensor or a list."""
    if isinstance(bases, torch.Tensor):
        if bases.dim() < 3:
            raise LoraError(f"bases must be (…, K, d, p), got {tuple(bases.shape)}")
        *lead, k, d, p = bases.shape
        return bases.movedim(-3, -2).reshape(*lead, d, k * p), [p] * k
    if not bases:
        raise LoraError("no subspaces to average")
    return torch.cat(list(bases), -1), [int(b.shape[-1]) for b in bases]


@dataclass
class Gram:
    """The stacked sources Z, their Gram ZᵀZ (…, R, R) and each column's source."""

    z: torch.Tensor
    gram: torch.Tensor
    ranks: list[int]

    @classmethod
    def of(cls, bases) -> "Gram":
        z, ranks = _sources(bases)
        return cls(z, z.transpose(-1, -2) @ z, ranks)

    def column_weights(self, w: torch.Tensor) -> torch.Tensor:
        """diag(D): w_k repeated p_k times (…, R)."""
        if len(set(self.ranks)) == 1:
            return w.repeat_interleave(self.ranks[0], -1)
        idx = torch.repeat_interleave(torch.arange(len(self.ranks), device=w.device),
                                      torch.tensor(self.ranks, device=w.device))
        return w[..., idx]

    def weighted(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """D^½ZᵀZD^½ (…, R, R), whose spectrum is that of Σ w_k U_kU_kᵀ, and √diag(D)."""
        sq = self.column_weights(w).clamp_min(0).sqrt()
        return sq.unsqueeze(-1) * self.gram * sq.unsqueeze(-2), sq

    def eig(self, w: torch.Tensor, dtype: torch.dtype | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eigenvalues λ (…, R), descending, of Σ w_k U_kU_kᵀ, the eigenvectors
        (…, R, R) of D^½ZᵀZD^½ and √diag(D). dtype: the eigensolver's precision
        (default the Gram's; results are returned in the Gram's)."""
        a, sq = self.weighted(w)
        return (*self.eigh(a, dtype), sq)

    @staticmethod
    def eigh(a: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (descending, ≥ 0) and eigenvectors of a weighted Gram a (eig's dtype)."""
        lam, vec = torch.linalg.eigh(a if dtype is None else a.to(dtype))
        return lam.to(a.dtype).flip(-1).clamp_min(0), vec.to(a.dtype).flip(-1)

    def spectrum(self, w: torch.Tensor) -> torch.Tensor:
        """Eigenvalues of Σ w_k U_kU_kᵀ (…, R), descending, without eigenvectors."""
        return torch.linalg.eigvalsh(self.weighted(w)[0]).flip(-1).clamp_min(0)

    def top(self, w: torch.Tensor, p: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-p eigenvectors of Σ w_k U_kU_kᵀ as R×p coefficients on Z (so the basis is
        Z·coef, orthonormal) and all eigenvalues, descending (dtype: as in eig)."""
        lam, vec, sq = self.eig(w, dtype)
        return self.coef(vec[..., :p], lam, sq, p), lam

    @staticmethod
    def coef(vec: torch.Tensor, lam: torch.Tensor, sq: torch.Tensor, p: int) -> torch.Tensor:
        """Z-coefficients of the orthonormal basis Z·D^½·vec/√λ from top-p eigenpairs of D^½ZᵀZD^½."""
        if p > lam.shape[-1]:
            raise LoraError(f"rank {p} is more than the {lam.shape[-1]} directions the sources span")
        tiny = torch.finfo(lam.dtype).eps * lam[..., :1].clamp_min(torch.finfo(lam.dtype).tiny)
        if bool((lam[..., p - 1:p] <= tiny).any()):
            raise LoraError(f"the sources span fewer than {p} directions: no rank-{p} mean")
        return sq.unsqueeze(-1) * vec / lam[..., :p].sqrt().unsqueeze(-2)

    def basis(self, coef: torch.Tensor) -> torch.Tensor:
        """Z·coef, orthonormalised: columns orthonormal up to rounding, so by a Cholesky QR
        (the Q of orthonormalize, positive R diagonal, at a fraction of a Householder QR's cost)."""
        return reorthonormalize(self.z @ coef)

    def cross(self, coef: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """XᵀU_k (…, p, p_k) for every source k, X = Z·coef: the R-sized blocks of
        coefᵀ(ZᵀZ), nothing d-sized."""
        return torch.split(coef.transpose(-1, -2) @ self.gram, self.ranks, dim=-1)

    def max_angle(self, coef: torch.Tensor) -> torch.Tensor:
        """Largest principal angle between Z·coef and any source (…,), over min(p, p_k)
        angles, from the cross blocks' least cos² (grassmann.least_cos2; arccos of the root:
        a report figure, ~1e-8 off for tiny angles)."""
        return torch.arccos(least_cos2(self.cross(coef)).amin(-1).sqrt())

    def chordal_distances(self, coef: torch.Tensor) -> torch.Tensor:
        """d_chordal(Z·coef, U_k) (…, K): √(min(p, p_k) − ‖XᵀU_k‖²_F)."""
        p = coef.shape[-1]
        return torch.stack([(min(p, xu.shape[-1]) - (xu ** 2).sum((-1, -2))).clamp_min(0).sqrt()
                            for xu in self.cross(coef)], -1)


def refine_top(a: torch.Tensor, x: torch.Tensor, y: torch.Tensor, rest: torch.Tensor, slack: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The top-p eigenpairs (descending) of a symmetric a (…, R, R) from approximate
    eigenvectors x (…, R, p) of them and y (…, R, R − p) of the others, with eigenvalues
    rest (…, R − p), descending, whose first exceeds λ_{p+1}(a) by at most slack (…, 1),
    or None when REFINE_STEPS steps do not certify them.

    A step takes the Ritz pairs (μ, X) of the top p columns (eigh of H = XᵀAX, p×p) and the
    residual AX − X·diag(μ), and moves X by Y·E, E_ij = (Yᵀ residual)_ij / (μ_j − λ_{p+i}),
    against the other columns Y (the first-order correction of Ogita & Aishima 2018, for
    the top p only), then re-orthonormalises (Cholesky QR). The space is certified when
    ‖residual‖_F ≤ REFINE_TOL·δ, δ = μ_min − (λ_{p+1} + slack) > 0: then sin θ_max ≤
    ‖residual‖/δ (Davis–Kahan). It gives up as soon as the contraction seen so far cannot
    reach that within REFINE_STEPS."""
    prev = None
    for step in range(REFINE_STEPS + 1):
        ax = a @ x
        mu, q = torch.linalg.eigh(x.transpose(-1, -2) @ ax)
        x, ax = x @ q, ax @ q
        res = ax - x * mu.unsqueeze(-2)
        delta = mu[..., 0] - rest[..., 0] - slack[..., 0]
        if not bool((delta > 0).all()):      # no certified gap (and the denominators could vanish)
            return None
        norm = torch.linalg.matrix_norm(res)
        goal = REFINE_TOL * delta
        if bool((norm <= goal).all()):
            return mu.flip(-1), x.flip(-1)
        left = REFINE_STEPS - step
        if left == 0 or (prev is not None and bool((norm * (norm / prev) ** left > goal).any())):
            return None
        prev = norm
        x = cholesky_qr(x + y @ ((y.transpose(-1, -2) @ res) / (mu.unsqueeze(-2) - rest.unsqueeze(-1))))
        if x is None:
            return None
    return None


# The flag median's IRLS steps reweight one Gram, late steps only a little: a step's top-p
# eigenvectors are refined from the previous step's (refine_top) where the reweighting
# promises REFINE_TOL within REFINE_STEPS corrections (WARM_MAX_RATE), else a float64 eigh
# answers. A certified refinement costs ≈ half an eigh at R = 256 (one thread); related
# SDXL rank-64 sides: 84 of 144 eighs replaced, every attempt certified, medians and
# steps as with eigh at every step (≤ 1e-11); unrelated sides: few steps qualify.
REFINE_TOL = 1e-10
REFINE_STEPS = 3
WARM_MAX_RATE = 0.01
REFINE_MIN_R = 64      # below this an eigh costs less than the refinement's small products


class _WarmTop:
    """Top-p eigenvectors of A = D^½ZᵀZD^½ for a sequence of weightings: refined from the
    last ones, else by eigh, whose eigenpairs become the reference A₀ — A = T·A₀·T with
    T = diag(√(d/d₀)), so λ_{p+1}(A) ≤ max(d/d₀)·λ_{p+1}(A₀) (Ostrowski; A₀ ⪰ 0) is the
    bound the certificate needs, and A₀'s other eigenvectors are the directions corrected
    against; a correction shrinks the residual by about ‖A − A₀‖/gap ≤ max|d/d₀ − 1|·λ_1/gap."""

    def __init__(self, g: "Gram", p: int, w: torch.Tensor) -> None:
        """Starts from an eigh at weights w: coef and lam (all eigenvalues) are Gram.top's."""
        self.g, self.p, self.ref = g, p, None
        self.coef = self.top(w)       # sets lam

    def top(self, w: torch.Tensor) -> torch.Tensor:
        """Z-coefficients of the top-p basis (as Gram.top) for weights w."""
        a, sq = self.g.weighted(w)
        if self.ref is not None and a.shape[-1] >= REFINE_MIN_R and self.p < a.shape[-1]:
            sq0, x, y, rest, gap = self.ref
            # A = T·A₀·T, T = diag(sq/sq0): λ_{p+1}(A) ≤ max t²·λ_{p+1}(A₀) (Ostrowski; A₀ ⪰ 0)
            ratio = (sq / sq0) ** 2
            grow = ratio.amax(-1, keepdim=True) - 1
            change = torch.maximum(grow, 1 - ratio.amin(-1, keepdim=True))
            if bool((change * self.lam[..., :1] <= WARM_MAX_RATE * gap).all()):
                got = refine_top(a, x, y, rest, grow * rest[..., :1])
                if got is not None:
                    mu, x = got
                    self.ref = sq0, x, y, rest, gap
                    return Gram.coef(x, mu, sq, self.p)
        lam, vec = Gram.eigh(a)
        self.ref = (sq, vec[..., :self.p].contiguous(), vec[..., self.p:].contiguous(), lam[..., self.p:],
                    lam[..., self.p - 1:self.p] - lam[..., self.p:self.p + 1])
        self.lam = lam
        return Gram.coef(vec[..., :self.p], lam, sq, self.p)


@dataclass
class FlagMean:
    """mean (…, d, p); consensus = all eigenvalues of Σ w_k U_kU_kᵀ (…, R), descending;
    unique = relative eigen-gap (λ_p − λ_{p+1})/λ_1 above EIGENGAP_RTOL; max_angle =
    largest principal angle (rad) between the mean and any source (Gram.max_angle)."""

    mean: torch.Tensor
    consensus: torch.Tensor
    unique: torch.Tensor
    max_angle: torch.Tensor


EIGENGAP_RTOL = 1e-8


def eigengap(lam: torch.Tensor, p: int, rtol: float = EIGENGAP_RTOL) -> torch.Tensor:
    """λ_p > λ_{p+1} relative to λ_1 (rtol; the default: the rank-p flag mean is unique)."""
    nxt = lam[..., p] if lam.shape[-1] > p else torch.zeros_like(lam[..., 0])
    return (lam[..., p - 1] - nxt) / lam[..., 0] > rtol


def flag_mean(bases, weights, p: int | None = None) -> FlagMean:
    """Weighted flag (chordal, extrinsic) mean of rank p (default: the smallest source
    rank). bases: (…, K, d, p) or a list of K tensors (…, d, p_k) of any ranks."""
    g = Gram.of(bases)
    w = check_weights(weights, len(g.ranks), g.z)
    p = min(g.ranks) if p is None else p
    coef, lam = g.top(w, p)
    return FlagMean(g.basis(coef), lam, eigengap(lam, p), g.max_angle(coef))


# A direction held by sources of exactly half the weight (two of four equal LoRAs) has λ = ½
# exactly: a tie, not a majority. Its computed λ lies within ~1e-15 of ½ on either side, so
# without a margin rounding (eigh against eigvalsh, the order of a sum) would decide the count.
CONSENSUS_TIE_ATOL = 1e-9


def consensus_rank(consensus: torch.Tensor) -> torch.Tensor:
    """How many directions a weighted majority of the sources share: the count of
    eigenvalues of Σ w_k U_kU_kᵀ (Σ w_k = 1) above ½ (…,), ties at ½ (within
    CONSENSUS_TIE_ATOL) left out. May be 0: no direction is held by sources of more
    than half the total weight."""
    return (consensus > 0.5 + CONSENSUS_TIE_ATOL).sum(-1)


@dataclass
class FlagMedian:
    """mean (…, d, p); objective Σ w_k d_chordal (…,); iterations of IRLS (…,);
    converged = relative decrease below tol before max_iter; distances (…, K);
    consensus = eigenvalues of Σ w_k U_kU_kᵀ with the user's weights; max_angle as FlagMean's."""

    mean: torch.Tensor
    objective: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    distances: torch.Tensor
    consensus: torch.Tensor
    max_angle: torch.Tensor


def flag_median(bases, weights, p: int | None = None, tol: float = MEDIAN_TOL, max_iter: int = MEDIAN_MAX_ITER,
                eps: float = MEDIAN_EPS) -> FlagMedian:
    """Weighted flag median by IRLS (Mankovich et al. 2022, Alg. 1), batched, started
    from the flag mean. Each step is the flag mean with weights w_k / max(d_k, eps),
    which never increases Σ w_k d_k (a majorisation step); it stops per batch element
    when the relative decrease falls below tol."""
    g = Gram.of(bases)
    w = check_weights(weights, len(g.ranks), g.z)
    p = min(g.ranks) if p is None else p
    warm = _WarmTop(g, p, w)
    coef, lam = warm.coef, warm.lam
    dist = g.chordal_distances(coef)
    obj = (w * dist).sum(-1)
    its = torch.zeros(obj.shape, dtype=torch.long, device=obj.device)
    done = torch.zeros(obj.shape, dtype=torch.bool, device=obj.device)
    for _ in range(max_iter):
        if bool(done.all()):
            break
        a = w / dist.clamp_min(eps)
        c_coef = warm.top(a / a.sum(-1, keepdim=True))
        c_dist = g.chordal_distances(c_coef)
        c_obj = (w * c_dist).sum(-1)
        better = ~done & (c_obj <= obj)
        done = done | ~better | (obj - c_obj <= tol * obj.clamp_min(torch.finfo(obj.dtype).tiny))
        coef = torch.where(better[..., None, None], c_coef, coef)
        dist = torch.where(better.unsqueeze(-1), c_dist, dist)
        obj = torch.where(better, c_obj, obj)
        its += better.long()
    return FlagMedian(g.basis(coef), obj, its, done, dist, lam, g.max_angle(coef))
