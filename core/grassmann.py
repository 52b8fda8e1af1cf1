"""Principal angles between subspaces, the primitive every measure builds on,
and the Grassmann Log/Exp maps the means build on.

X (d×k) and Y (d×l) are orthonormal bases (batched: ...×d×k). Only
min(k, l) angles exist. Cosines come from the SVD of the small XᵀY; for small
angles arccos is ill-conditioned, so sines come from the SVD of the residual
of the smaller basis projected out by the larger one, and θ = atan2(sin, cos)
pairs them (Knyazev & Argentati 2002; scipy.linalg.subspace_angles).
"""
from __future__ import annotations

import math

import torch


def _order(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(smaller, larger) by column count."""
    return (x, y) if x.shape[-1] <= y.shape[-1] else (y, x)


def principal_cosines(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cos θ, descending, clipped to [0, 1]. Cheap: one min(k,l)-sized SVD."""
    return torch.linalg.svdvals(x.transpose(-1, -2) @ y).clamp(0.0, 1.0)


def least_cos2(blocks: list[torch.Tensor]) -> torch.Tensor:
    """cos² of the widest principal angle for each cross block XᵀY (…, k, l) of
    orthonormal X, Y: the least eigenvalue of its smaller Gram (one batched
    eigvalsh when the Grams have equal sizes, about half an svdvals' time). The
    widest angle's arccos √· is a report figure: ~1e-8 rad off near 0."""
    grams = [smaller_gram(b) for b in blocks]
    if len({g.shape[-1] for g in grams}) == 1:
        return torch.linalg.eigvalsh(torch.stack(grams, -3))[..., 0].clamp(0.0, 1.0)
    return torch.stack([torch.linalg.eigvalsh(g)[..., 0] for g in grams], -1).clamp(0.0, 1.0)


# Above this angle arccos(cos θ) is accurate (its error ε/sin θ is under
# ~10ε relative), so the sine SVD, as costly as a thin QR, is skipped when
# every angle is at least this large: the usual case for unrelated LoRAs.
ARCCOS_SAFE_ANGLE = 0.3


def principal_angles(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """θ in [0, π/2], ascending, accurate for small and large angles alike."""
    small, large = _order(x, y)
    m = large.transpose(-1, -2) @ small                      # l×k
    cos = torch.linalg.svdvals(m).clamp(0.0, 1.0)            # descending
    if cos.numel() == 0 or bool((cos <= math.cos(ARCCOS_SAFE_ANGLE)).all()):
        return torch.arccos(cos)
    resid = small - large @ m                                 # d×k, singular values = sin θ
    sin = torch.linalg.svdvals(resid).clamp(0.0, 1.0).flip(-1)  # ascending
    return torch.atan2(sin, cos).clamp(0.0, math.pi / 2)


def log_cos_product(cos: torch.Tensor) -> torch.Tensor:
    """log Π cos θ = log|det XᵀY| (equal ranks), without the underflow of the
    plain product (≈1e-48 for two unrelated 64-dim subspaces of R^768)."""
    return torch.log(cos.clamp_min(torch.finfo(cos.dtype).tiny)).sum(-1)


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def orthonormalize(x: torch.Tensor) -> torch.Tensor:
    """Q of a thin QR with R's diagonal made positive, so that a nearly
    orthonormal x keeps its columns (and their signs): tangent vectors
    transported between iterates must refer to matching columns."""
    q, r = torch.linalg.qr(x)
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    return q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)


def cholesky_qr(x: torch.Tensor) -> torch.Tensor | None:
    """Q of x = Q·R (R's diagonal positive, as orthonormalize's) from one Cholesky
    of xᵀx, at a fraction of a Householder QR's cost, or None when xᵀx is not
    numerically positive definite. Its errors grow as u·κ(x)²: for columns that
    are orthonormal up to rounding, or nearly so."""
    low, info = torch.linalg.cholesky_ex(_t(x) @ x)
    if bool((info != 0).any()):
        return None
    return _t(torch.linalg.solve_triangular(low, _t(x), upper=False))


def reorthonormalize(x: torch.Tensor) -> torch.Tensor:
    """orthonormalize for columns orthonormal up to rounding: the same Q by cholesky_qr,
    by the Householder QR only where the Cholesky fails."""
    q = cholesky_qr(x)
    return orthonormalize(x) if q is None else q


def gram_eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """m's singular values (descending, ≥ 0) and the matching singular vectors of
    its smaller side, from one eigh of its smaller Gram: values with absolute
    errors ~n·u·σ_1²/σ, vectors to match (callers bound σ/σ_1 from below)."""
    lam, vec = torch.linalg.eigh(smaller_gram(m))
    return lam.flip(-1).clamp_min(0).sqrt(), vec.flip(-1)


def smaller_gram(m: torch.Tensor) -> torch.Tensor:
    """mᵀm for a tall (or square) m, else m·mᵀ: the Gram of its smaller side."""
    return _t(m) @ m if m.shape[-2] >= m.shape[-1] else m @ _t(m)


def tangent_projection(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(I − XXᵀ)V: onto the tangent space at X (also the vector transport we use)."""
    return v - x @ (_t(x) @ v)


# log_frame(close=True) takes Q and cos²θ from eigh(MᵀM) and P = MQ/cos θ when every
# cos θ is at least this: P is then orthonormal to ~ε/cos²θ ≤ 1e-14 (MQ's columns are
# orthogonal to ε·‖M‖ whatever the spacing of the angles), and the batched p×p eigh costs
# ~0.6 of the SVD (4 × 64×64, float64, one thread). Otherwise the SVD answers.
CLOSE_MIN_COS = 0.1


def log_frame(x: torch.Tensor, y: torch.Tensor, close: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, θ, E) with Log_X(Y) = E·diag(θ)·Pᵀ: XᵀY = P·cosΘ·Qᵀ (p×p SVD), θ the
    principal angles (ascending) and E the unit directions (I − XXᵀ)YQ/sin θ
    from X's principal vectors XP towards Y's (zero columns where sin θ = 0).

    The columns of (I − XXᵀ)YQ = YQ − X(XᵀY)Q are mutually orthogonal with
    norms sin θ, so θ = atan2(sin, cos) is accurate at both ends, with no
    inverse and nothing d×d. At θ = π/2 the geodesic is not unique; the SVD's
    choice is taken (finite, deterministic). close: the caller expects no
    angle near π/2 (CLOSE_MIN_COS), so the eigh route is tried first.
    """
    m = _t(x) @ y
    pq = _close_svd(m) if close else None
    p, cos, q = pq if pq is not None else _svd(m)
    resid = y @ q - x @ (p * cos.unsqueeze(-2))        # MQ = P·cos Θ
    sin = torch.linalg.vector_norm(resid, dim=-2)
    theta = torch.atan2(sin, cos.clamp(0.0, 1.0))
    tiny = torch.finfo(x.dtype).tiny
    e = resid / torch.where(sin > tiny, sin, torch.full_like(sin, math.inf)).unsqueeze(-2)
    return p, theta, e


def _svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p, cos, qh = torch.linalg.svd(m)
    return p, cos, _t(qh)


def _close_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The SVD of a square M (cos descending) from eigh(MᵀM), or None when some
    singular value is below CLOSE_MIN_COS (see there)."""
    cos, q = gram_eigh(m)
    if not bool((cos >= CLOSE_MIN_COS).all()):
        return None
    return (m @ q) / cos.unsqueeze(-2), cos, q


def grassmann_log(x: torch.Tensor, y: torch.Tensor, return_angles: bool = False):
    """Log_X(Y): the tangent H at X (XᵀH = 0) with Exp_X(H) = span(Y), ‖H‖_F = d_geo
    (see log_frame). With return_angles also the principal angles θ (…, p), ascending."""
    p, theta, e = log_frame(x, y)
    log = (e * theta.unsqueeze(-2)) @ _t(p)
    return (log, theta) if return_angles else log


def alpha_cot_alpha(a: torch.Tensor) -> torch.Tensor:
    """α·cot α, even, 1 at 0 (series below 1e-4), kept finite at α = π."""
    small = a.abs() < 1e-4
    sin = torch.sin(a)
    tiny = torch.finfo(a.dtype).eps ** 2
    sin = torch.where(sin.abs() < tiny, torch.full_like(sin, tiny), sin)
    return torch.where(small, 1.0 - a * a / 3.0, a * torch.cos(a) / sin)


class SqDistanceHessian:
    """The Riemannian Hessian of Σ_k w_k·½d_geo²(·, Y_k) at X, as a map on tangents
    η (…, d, p), from log_frame(X, Y_k) = (P, θ, E) stacked over k (…, K, …) and
    weights w (…, K). Exact; O(K·d·p²) per product.

    Gr(p, d) is a symmetric space: along the geodesic from X to Y (tangent
    E·diag(θ)·Pᵀ) the Jacobi operator is diagonal in the frame (E, P), with
    the restricted roots of Gr as eigenvalues, and the Hessian of ½r² has
    eigenvalue α·cot α on each root α. With B = Eᵀ(ηP) and C = ηP − E·B (the
    part of ηP orthogonal to every E column):
      (B_ij + B_ji)/2: α = θ_i − θ_j (so 1 on diag(B), the flat through X and Y);
      (B_ij − B_ji)/2: α = θ_i + θ_j;
      column j of C: α = θ_j.
    A direction whose E column is zero (θ_i = 0) falls into C, which is the
    right limit (θ_i ± θ_j = θ_j). Negative values appear once θ_i + θ_j > π/2:
    the cost is then not convex there (means may be several).
    Summed over k, H(η) = Σ_k E_k·w_k(H_B(B_k) − B_kΦ_k)·P_kᵀ + η·Σ_k w_k P_kΦ_kP_kᵀ
    (Φ_k = diag α·cot α at θ_k): two stacked products with d rows per call.

    The E columns are tangent at X, so H maps tangents to tangents without a
    projection (up to rounding).

    dtype: the precision of the products (default: the frame's). float32 halves
    their cost on a CPU; an inexact Newton solve tolerates the ~1e-7 relative
    error of Hη (the gradient, which decides convergence, stays exact).
    lower_bound is always computed at the frame's precision.
    """

    def __init__(self, p: torch.Tensor, theta: torch.Tensor, e: torch.Tensor, w: torch.Tensor,
                 dtype: torch.dtype | None = None) -> None:
        self.theta = theta
        ti, tj = theta.unsqueeze(-1), theta.unsqueeze(-2)
        plus, minus = alpha_cot_alpha(ti + tj), alpha_cot_alpha(ti - tj)
        phi = alpha_cot_alpha(theta).unsqueeze(-2)
        self.w = w[..., None, None]
        *lead, k, d, r = e.shape
        e = e.movedim(-3, -2).reshape(*lead, d, k * r)                  # [E_1 … E_K]
        flat = ((p * phi) @ _t(p) * self.w).sum(-3)                     # Σ w_k P_kΦ_kP_kᵀ
        # w_k·(H_B(B) − BΦ) = B∘same + Bᵀ∘swap: the symmetric/antisymmetric split folded in
        same = self.w * (0.5 * (minus + plus) - phi)
        swap = self.w * (0.5 * (minus - plus))
        dtype = dtype or e.dtype
        self.e, self.p, self.flat, self.same, self.swap = (t.to(dtype) for t in (e, p, flat, same, swap))
        self.k, self.r = k, r

    def __call__(self, eta: torch.Tensor) -> torch.Tensor:
        out = eta.dtype
        eta = eta.to(self.e.dtype)
        *lead, d, r = eta.shape
        b = (_t(self.e) @ eta).reshape(*lead, self.k, r, r) @ self.p   # B_k = E_kᵀηP_k
        g = (b * self.same + _t(b) * self.swap) @ _t(self.p)
        return (self.e @ g.reshape(*lead, self.k * r, r) + eta @ self.flat).to(out)

    def lower_bound(self) -> torch.Tensor:
        """hessian_lower_bound at this frame."""
        return hessian_lower_bound(self.theta, self.w[..., 0, 0])


def hessian_lower_bound(theta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k λ_min(Hess ½d²(·, Y_k)) ≤ λ_min(Hess Σ_k w_k ½d²(·, Y_k)) (Weyl), from the
    principal angles θ (…, K, p) to each Y_k and weights w (…, K); nothing else of the
    Hessian is built. Each term's eigenvalues are α·cot α over its roots θ_i + θ_j (i ≠ j),
    θ_i ± θ_j and θ_i, and 1 on the flat; α·cot α decreases on [0, π), so its smallest is at
    the largest root: the sum of the two largest angles (the largest one where p = 1)."""
    top = theta.topk(min(2, theta.shape[-1]), dim=-1).values
    least = alpha_cot_alpha(top[..., 0])
    if top.shape[-1] == 2:
        least = torch.minimum(least, alpha_cot_alpha(top[..., 0] + top[..., 1]))
    return (w * least.clamp_max(1.0)).sum(-1)


def grassmann_exp(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Exp_X(H) = X·V·cosΣ·Vᵀ + U·sinΣ·Vᵀ with H = UΣVᵀ, re-orthonormalised.

    Written as X·cos(√(HᵀH)) + H·sinc(√(HᵀH)): both are analytic functions of
    the p×p matrix HᵀH = VΣ²Vᵀ, so one eigh of it replaces the thin SVD of
    the d×p H (U·sinΣ = H·V·diag(sinΣ/Σ)) without losing digits for small Σ,
    and any eigenbasis of repeated Σ gives the same result.
    """
    lam, v = torch.linalg.eigh(_t(h) @ h)
    s = lam.clamp_min(0.0).sqrt()
    small = s < 1e-4
    sinc = torch.where(small, 1.0 - s * s / 6.0, torch.sin(s) / torch.where(small, torch.ones_like(s), s))
    y = (x @ v) * torch.cos(s).unsqueeze(-2) + (h @ v) * sinc.unsqueeze(-2)
    return reorthonormalize(y @ _t(v))
