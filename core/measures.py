"""Similarity and distance measures between subspaces, all from principal angles.

Inputs are orthonormal bases X (…×d×k), Y (…×d×l) whose columns are ordered
by importance (singular vectors, descending), or principal angles θ (…×m,
m = min(k, l)) from ``core.grassmann.principal_angles``. Everything is batched
over leading dimensions.

φ (Hu et al. 2021, LoRA paper §7.2): φ(i, j) = ‖X_iᵀY_j‖²_F / min(i, j) on the
top-i / top-j columns. At full size it is Σcos²θ / min(k, l); it equals
1 − d²/min(k, l) with d the chordal distance below. Chance level for
independent uniformly random subspaces: E‖X_iᵀY_j‖² = i·j/d, so E[φ] = max(i, j)/d.

Distances (Edelman–Arias–Smith 1998; Ye & Lim 2016, Table 2), names as here:

    geodesic      √Σθ²                     arc length on Gr(p, d)
    chordal       √Σsin²θ = ‖XXᵀ−YYᵀ‖_F/√2  UQpy calls this "projection"; other
                                           libraries use "projection" for sin θ_max,
                                           so we never use that name
    binet_cauchy  √(1 − Πcos²θ)
    fubini_study  arccos(Πcos θ)
    asimov        max θ
    martin        √(−2 Σ log cos θ)       +inf when an angle is exactly π/2
    procrustes    2√Σsin²(θ/2) = min_Q ‖X − YQ‖_F
    spectral      2 sin(max θ / 2) = min_Q ‖X − YQ‖₂

Products of cosines are taken in log space (Πcos θ ≈ 1e-48 for two unrelated
64-dim subspaces of R^768: exactly 0 in float32), and each formula is
arranged to stay accurate for tiny angles (log1p / expm1 / atan2 rather than
1 − cos or arccos near 1).

Metric axioms on Gr(p, d) (equal ranks): all of these except Martin are true
metrics. Martin is a distance-like divergence: it is symmetric, zero only for
equal subspaces, but breaks the triangle inequality (three lines in R² at 0,
θ, 2θ: f(2θ) > 2f(θ) for every 0 < θ < π/4, and f(π/2) = ∞); ``METRICS``
lists the true metrics and the tests check the axioms on exactly that set.

Different ranks k ≠ l. Two conventions, both here:
(a) common dimension: the formulas above over the min(k, l) principal angles.
    Zero whenever one subspace contains the other, so not a metric across
    ranks; φ uses min(k, l) in its denominator for the same reason.
(b) Ye & Lim (2016) cross-rank geodesic √(|k − l|·π²/4 + Σθ²): the distance
    on the doubly infinite Grassmannian, a true metric across ranks (the
    missing |k − l| directions count as right angles).
"""
from __future__ import annotations

import functools
import math

import torch

from .grassmann import principal_angles

DISTANCES = ("geodesic", "chordal", "binet_cauchy", "fubini_study", "asimov", "martin",
             "procrustes", "spectral")
# Which of DISTANCES satisfy the metric axioms on Gr(p, d) (see module docstring).
METRICS = ("geodesic", "chordal", "binet_cauchy", "fubini_study", "asimov", "procrustes", "spectral")
HALF_PI = math.pi / 2


# ---------------------------------------------------------------- φ and chance
def phi(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """φ = ‖XᵀY‖²_F / min(k, l) on the bases as given (pass top-i / top-j columns)."""
    k, l = x.shape[-1], y.shape[-1]
    if min(k, l) == 0:
        raise ValueError("φ needs non-empty bases")
    return phi_from_product(x.transpose(-1, -2) @ y)


def phi_from_product(m: torch.Tensor) -> torch.Tensor:
    """φ from the product XᵀY (…, k, l) already formed: ‖XᵀY‖²_F / min(k, l)."""
    return (m * m).sum((-1, -2)) / min(m.shape[-2:])


def phi_from_cosines(cos: torch.Tensor) -> torch.Tensor:
    """φ from the min(k, l) principal cosines: Σcos²θ / min(k, l)."""
    return (cos * cos).sum(-1) / cos.shape[-1]


def phi_grid(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """All φ(i, j), i ≤ k, j ≤ l, as a (…, k, l) tensor (entry [i-1, j-1]).

    One k×l product and 2-D cumulative sums of its squared entries: the
    top-i × top-j block sum is a prefix sum, so the whole grid costs
    O(d·k·l), not k·l separate products.
    """
    m = x.transpose(-1, -2) @ y
    sums = (m * m).cumsum(-2).cumsum(-1)
    i = torch.arange(1, m.shape[-2] + 1, dtype=m.dtype, device=m.device)
    j = torch.arange(1, m.shape[-1] + 1, dtype=m.dtype, device=m.device)
    return sums / torch.minimum(i[:, None], j[None, :])


def chance_phi(i: int, j: int, d: int) -> float:
    """E[φ(i, j)] for independent uniformly random subspaces of R^d: max(i, j)/d."""
    if d <= 0 or i <= 0 or j <= 0:
        raise ValueError(f"chance level needs positive sizes, got i={i}, j={j}, d={d}")
    return min(1.0, max(i, j) / d)


def chance_grid(k: int, l: int, d: int) -> torch.Tensor:
    """chance_phi for every (i, j), i ≤ k, j ≤ l (float64)."""
    i = torch.arange(1, k + 1, dtype=torch.float64)
    j = torch.arange(1, l + 1, dtype=torch.float64)
    return (torch.maximum(i[:, None], j[None, :]) / d).clamp(max=1.0)


# ---------------------------------------------------------------- distances
def log_cos(theta: torch.Tensor) -> torch.Tensor:
    """log cos θ, accurate at both ends: ½·log1p(−sin²θ) for small θ (where
    cos θ rounds to 1), log cos θ for large θ; −inf from π/2 on."""
    s = torch.sin(theta)
    value = torch.where(theta < math.pi / 4, 0.5 * torch.log1p(-s * s), torch.log(torch.cos(theta).abs()))
    return torch.where(theta >= HALF_PI, -math.inf, value)


class _Angles:
    """θ plus the quantities several distances share, each computed once."""

    def __init__(self, theta: torch.Tensor):
        self.theta = theta

    @functools.cached_property
    def sin(self) -> torch.Tensor:
        return torch.sin(self.theta)

    @functools.cached_property
    def sum_log_cos(self) -> torch.Tensor:           # log Π cos θ
        return log_cos(self.theta).sum(-1)

    @functools.cached_property
    def max(self) -> torch.Tensor:
        if self.theta.shape[-1] == 0:
            return self.theta.new_zeros(self.theta.shape[:-1])
        return self.theta.amax(-1)

    @functools.cached_property
    def binet_cauchy(self) -> torch.Tensor:          # √(1 − Π cos²θ) = √(−expm1(2 log Π cos θ))
        return torch.sqrt((-torch.expm1(2.0 * self.sum_log_cos)).clamp_min(0.0))


_FORMULAS = {
    "geodesic": lambda a: torch.linalg.vector_norm(a.theta, dim=-1),
    # UQpy's "projection"; not sin θ_max, which other libraries call projection
    "chordal": lambda a: torch.linalg.vector_norm(a.sin, dim=-1),
    "binet_cauchy": lambda a: a.binet_cauchy,
    # arccos(Π cos θ) as atan2(√(1 − Π²), Π): small angles keep their digits
    "fubini_study": lambda a: torch.atan2(a.binet_cauchy, torch.exp(a.sum_log_cos)),
    "asimov": lambda a: a.max,
    # √(−2 Σ log cos θ), +inf at a right angle; never via Π 1/cos², which overflows
    "martin": lambda a: torch.sqrt((-2.0 * a.sum_log_cos).clamp_min(0.0)),
    "procrustes": lambda a: 2.0 * torch.linalg.vector_norm(torch.sin(a.theta / 2), dim=-1),
    "spectral": lambda a: 2.0 * torch.sin(a.max / 2),
}


def distance(name: str, theta: torch.Tensor) -> torch.Tensor:
    """One distance by name (see DISTANCES) over the common-dimension angles θ."""
    if name not in _FORMULAS:
        raise ValueError(f"unknown distance {name!r}; choose from {', '.join(DISTANCES)}")
    return _FORMULAS[name](_Angles(theta))


def distances(theta: torch.Tensor, names: tuple[str, ...] = DISTANCES) -> dict[str, torch.Tensor]:
    """{name: distance} from principal angles θ (…, min(k, l)), batched; shared
    pieces (Σ log cos θ, sin θ, max θ) are computed once."""
    angles = _Angles(theta)
    for n in names:
        if n not in _FORMULAS:
            raise ValueError(f"unknown distance {n!r}; choose from {', '.join(DISTANCES)}")
    return {n: _FORMULAS[n](angles) for n in names}


def cross_rank_geodesic(theta: torch.Tensor, k: int, l: int) -> torch.Tensor:
    """Ye & Lim (2016): √(|k − l|·π²/4 + Σθ²) between a k- and an l-dim subspace;
    θ are their min(k, l) principal angles. Equals ``geodesic`` when k = l."""
    if theta.shape[-1] != min(k, l):
        raise ValueError(f"expected min(k, l) = {min(k, l)} angles, got {theta.shape[-1]}")
    return torch.sqrt(abs(k - l) * HALF_PI ** 2 + (theta * theta).sum(-1))


def subspace_distances(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """All distances between span(X) and span(Y) (orthonormal bases), plus the
    cross-rank geodesic under the key 'geodesic_cross_rank'."""
    theta = principal_angles(x, y)
    out = distances(theta)
    out["geodesic_cross_rank"] = cross_rank_geodesic(theta, x.shape[-1], y.shape[-1])
    return out


# ---------------------------------------------------------------- differentiable (trainers)
def span_overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(‖Q_aᵀQ_b‖²_F, min(k, l)) where Q are thin-QR bases of span(a), span(b).

    Differentiable: QR has well-defined gradients for full-column-rank inputs,
    unlike SVD, whose gradient has 1/(σᵢ² − σⱼ²) terms that blow up when
    singular values repeat. No SVD is needed because φ at full rank only uses
    the Frobenius norm of QaᵀQb, which is basis-invariant.
    """
    qa = torch.linalg.qr(a)[0]
    qb = torch.linalg.qr(b)[0]
    m = qa.transpose(-1, -2) @ qb
    return (m * m).sum((-1, -2)), min(a.shape[-1], b.shape[-1])


def span_phi(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differentiable φ between span(a) (…×d×k) and span(b) (…×d×l), full rank:
    ‖Q_aᵀQ_b‖²_F / min(k, l). a, b must have full column rank."""
    s, p = span_overlap(a, b)
    return s / p


def span_chordal(a: torch.Tensor, b: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Differentiable chordal distance √(min(k, l) − ‖Q_aᵀQ_b‖²_F) = √Σsin²θ.

    Use ``squared=True`` in a loss: the square root has an infinite gradient at
    distance 0 (identical subspaces); its square is smooth everywhere.
    """
    s, p = span_overlap(a, b)
    sq = (p - s).clamp_min(0.0)
    return sq if squared else torch.sqrt(sq)


def lora_span(up: torch.Tensor, down: torch.Tensor, side: str = "out") -> torch.Tensor:
    """The matrix whose columns span ΔW's column space ('out': up) or row space
    ('in': downᵀ), assuming the other factor has full rank (true for a trained
    LoRA; a rank-deficient product has a smaller span than this)."""
    if side == "out":
        return up
    if side == "in":
        return down.transpose(-1, -2)
    raise ValueError(f"side must be 'out' or 'in', got {side!r}")


def lora_phi(up_a: torch.Tensor, down_a: torch.Tensor, up_b: torch.Tensor, down_b: torch.Tensor,
             side: str = "out") -> torch.Tensor:
    """Differentiable φ between two LoRAs' ΔW subspaces on one side, from raw factors
    (a regulariser: minimise to push LoRAs apart, maximise to pull them together)."""
    return span_phi(lora_span(up_a, down_a, side), lora_span(up_b, down_b, side))


def lora_chordal(up_a: torch.Tensor, down_a: torch.Tensor, up_b: torch.Tensor, down_b: torch.Tensor,
                 side: str = "out", squared: bool = False) -> torch.Tensor:
    """Differentiable chordal distance between two LoRAs' subspaces on one side."""
    return span_chordal(lora_span(up_a, down_a, side), lora_span(up_b, down_b, side), squared)
