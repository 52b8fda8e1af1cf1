"""SVD of ΔW = s·up·down from the factors alone, never forming ΔW.

Thin QR of up (d_out×R) and of downᵀ (d_in×R), then an SVD of the small
core s·R_up·R_downᵀ: U = Q_up·P, V = Q_down·Q. Cost O((d_out+d_in)·R²)
against O(d_out·d_in·min(d)) for a dense SVD.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .device import linalg_threads
from .grassmann import gram_eigh
from .lora import LoraModule

# Singular values below this fraction of the largest count as numerically zero.
RANK_RTOL = 1e-6
# A module whose largest singular value is below this is dead (ΔW ≈ 0).
DEAD_ATOL = 1e-12


@dataclass
class FactoredSVD:
    """U (d_out×k), S (k, descending), V (d_in×k) with ΔW = U·diag(S)·Vᵀ."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def dead(self) -> bool:
        return self.S.numel() == 0 or float(self.S[0]) <= DEAD_ATOL

    @property
    def effective_rank(self) -> int:
        if self.dead:
            return 0
        return int((self.S > RANK_RTOL * self.S[0]).sum())

    def top(self, p: int) -> "FactoredSVD":
        return FactoredSVD(self.U[:, :p], self.S[:p], self.V[:, :p])

    def frobenius(self) -> float:
        return float(torch.linalg.vector_norm(self.S))

    # The measures a merge report takes of a matrix; GramFactored answers the same from Grams.
    @property
    def energy(self) -> float:
        """‖ΔW‖²_F."""
        return float((self.S ** 2).sum())

    @property
    def col_basis(self) -> torch.Tensor:
        """Orthonormal basis of the column space."""
        return self.U

    @property
    def row_basis(self) -> torch.Tensor:
        """Orthonormal basis of the row space."""
        return self.V

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) with ΔW = left·rightᵀ."""
        return self.U * self.S, self.V

    def col_factor(self) -> torch.Tensor:
        """X with X·Xᵀ = ΔW·ΔWᵀ."""
        return self.U * self.S

    def row_factor(self) -> torch.Tensor:
        """Y with Y·Yᵀ = ΔWᵀ·ΔW."""
        return self.V * self.S

    def projected(self, u: torch.Tensor, v: torch.Tensor, weight: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(uᵀ·weight·ΔW·v, uᵀ·col_basis) for orthonormal u, v."""
        cross = u.T @ self.U
        return (cross * (weight * self.S)) @ (self.V.T @ v), cross


def pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """x with zero rows appended up to n rows (x itself when it has n)."""
    if x.shape[0] == n:
        return x
    out = x.new_zeros(n, x.shape[1])
    out[:x.shape[0]] = x
    return out


# GramFactored answers only when both r×r Grams are at most this far from
# singular (‖G‖_F·‖L⁻¹‖²_F, an upper bound on cond(G), about 600 for random
# factors): then its bases are orthonormal to ~u·1e5 ≈ 1e-11, and σ_min(ΔW) ≥
# σ_1(ΔW)/√(1e5·1e5) = 1e-5·σ_1, so every singular value is above RANK_RTOL·σ_1
# (the effective rank is r, as an SVD would find).
GRAM_MAX_COND = 1e5


@dataclass
class GramFactored:
    """ΔW = scale·a·bᵀ (a: d_out×r, b: d_in×r) measured through Cholesky factors
    of its r×r Grams aᵀa = L_a·L_aᵀ, bᵀb = L_b·L_bᵀ, without its SVD: ΔW =
    B_a·(scale·L_aᵀL_b)·B_bᵀ with orthonormal B_a = a·L_a⁻ᵀ, B_b = b·L_b⁻ᵀ.
    Same measures as FactoredSVD (energy, col_basis, factors, col_factor,
    row_factor, projected); built by gram_factored when both Grams are well
    conditioned, so its rank is r (see gram_factored). rows: a and b are zero
    below their first `rows` rows (a source's columns of upper-triangular frame
    coordinates), so its products skip those rows (None: use every row)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    l_a: torch.Tensor
    inv_a: torch.Tensor
    l_b: torch.Tensor
    rows: int | None = None

    def _top(self, x: torch.Tensor) -> torch.Tensor:
        """x's rows that can meet a's or b's nonzero rows."""
        return x if self.rows is None else x[:self.rows]

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    @cached_property
    def energy(self) -> float:
        return float(self.scale ** 2 * ((self.l_a.T @ self.l_b) ** 2).sum())

    @cached_property
    def col_basis(self) -> torch.Tensor:
        return pad_rows(self._top(self.a) @ self.inv_a.T, self.a.shape[0])

    @cached_property
    def row_basis(self) -> torch.Tensor:
        return pad_rows(torch.linalg.solve_triangular(self.l_b, self._top(self.b).T, upper=False).T, self.b.shape[0])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale * self.a, self.b

    def col_factor(self) -> torch.Tensor:
        return (self.scale * self.a) @ self.l_b

    def row_factor(self) -> torch.Tensor:
        return (self.scale * self.b) @ self.l_a

    def projected(self, u: torch.Tensor, v: torch.Tensor, weight: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        ua = self._top(u).T @ self._top(self.a)
        return ((weight * self.scale) * ua) @ (self._top(self.b).T @ self._top(v)), ua @ self.inv_a.T


def _gram_cholesky(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For x (K, d, r): L and L⁻¹ with xᵀx = L·Lᵀ, and per item whether xᵀx is
    clearly positive definite (GRAM_MAX_COND)."""
    gram = x.mT @ x
    low, info = torch.linalg.cholesky_ex(gram)
    inv = torch.linalg.solve_triangular(low, torch.eye(x.shape[-1], dtype=x.dtype, device=x.device), upper=False)
    bound = torch.linalg.matrix_norm(gram) * (inv * inv).sum((-1, -2))
    return low, inv, (info == 0) & (bound <= GRAM_MAX_COND)


def gram_factored(a: torch.Tensor, b: torch.Tensor, scales: list[float],
                  rows: list[int | None] | None = None) -> list[GramFactored | None]:
    """ΔW_k = scale_k·a_k·b_kᵀ for a (K, d_out, r), b (K, d_in, r), as
    GramFactored (one batched call per step for all K), each None when a Gram
    is near-singular or ΔW_k is (nearly) dead: take its SVD then (svd_from_factors).
    rows: per k, GramFactored.rows."""
    la, inv_a, ok_a = _gram_cholesky(a)
    lb, _, ok_b = _gram_cholesky(b)
    ok = (ok_a & ok_b).tolist()
    out = []
    for k, scale in enumerate(scales):
        res = (GramFactored(a[k], b[k], float(scale), la[k], inv_a[k], lb[k], None if rows is None else rows[k])
               if ok[k] else None)
        # σ_1 ≥ ‖ΔW‖_F/√r: live for sure above this, else the SVD decides
        out.append(res if res is not None and res.energy > res.rank * DEAD_ATOL ** 2 * 4 else None)
    return out


def factor_qr(up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype = torch.float64
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin QRs up = Q_up·R_up and downᵀ = Q_dn·R_dn (batched-capable).

    ΔW = s·Q_up·(R_up R_dnᵀ)·Q_dnᵀ, so span(Q_up) / span(Q_dn) are ΔW's column /
    row spaces whenever the small core R_up R_dnᵀ is invertible: callers that
    only need those spans (not ordered singular vectors) can skip the
    d×R·R×R products of svd_from_factors.
    """
    q_up, r_up = torch.linalg.qr(up.to(dtype))                    # d_out×k1, k1×R
    q_dn, r_dn = torch.linalg.qr(down.to(dtype).transpose(-1, -2))  # d_in×k2, k2×R
    return q_up, r_up, q_dn, r_dn


def svd_from_factors(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0,
                     dtype: torch.dtype = torch.float64) -> FactoredSVD:
    """Exact thin SVD of scale·up@down. Works batched: up (...,d_out,R), down (...,R,d_in)."""
    q_up, r_up, q_dn, r_dn = factor_qr(up, down, dtype)
    core = scale * (r_up @ r_dn.transpose(-1, -2))       # k1×k2
    p, s, qh = torch.linalg.svd(core, full_matrices=False)
    return FactoredSVD(q_up @ p, s, q_dn @ qh.transpose(-1, -2))


def module_svd(module: LoraModule, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> FactoredSVD:
    up, down = module.up, module.down
    if device is not None:
        up, down = up.to(device), down.to(device)
    with linalg_threads(1 if up.device.type == "cpu" else None):
        return svd_from_factors(up, down, module.scale, dtype)


def modules_svd(modules: list[LoraModule], dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> list[FactoredSVD]:
    """SVDs of many modules. On CUDA, modules with equal factor shapes are
    stacked into one batched call; on the CPU a plain loop measured faster."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type == "cpu":
        return [module_svd(m, dtype, device) for m in modules]
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(modules):
        groups.setdefault((tuple(m.up.shape), tuple(m.down.shape)), []).append(i)
    out: list[FactoredSVD | None] = [None] * len(modules)
    for idx in groups.values():
        ups = torch.stack([modules[i].up.to(device, dtype) for i in idx])
        downs = torch.stack([modules[i].down.to(device, dtype) for i in idx])
        scales = torch.tensor([modules[i].scale for i in idx], dtype=dtype, device=device)
        res = svd_from_factors(ups * scales[:, None, None], downs, 1.0, dtype)
        for j, i in enumerate(idx):
            out[i] = FactoredSVD(res.U[j], res.S[j], res.V[j])
    return out  # type: ignore[return-value]


def dense_svd(module: LoraModule, dtype: torch.dtype = torch.float64) -> FactoredSVD:
    """Reference: form ΔW and take a full SVD (tests and benchmarks only)."""
    u, s, vh = torch.linalg.svd(module.delta(dtype), full_matrices=False)
    k = min(module.factor_rank, s.numel())
    return FactoredSVD(u[:, :k], s[:k], vh[:k].T)


# A Cholesky frame is used only when ‖R⁻¹‖²_F of the column-balanced Gram's
# factor is at most this: then λ_min(Gram) ≥ 1e-8, and the basis x·R⁻¹ is
# orthonormal to about u·√(d·n)/λ_min ≈ 1e-13·1e8 — at most ~1e-5 in its weakest
# direction, whose share of x is ≤ √λ_min = 1e-4, so x's reconstruction and
# every inner product taken through the frame keep ~1e-9 relative accuracy.
FRAME_MAX_INV_GRAM = 1e8
# ‖R⁻¹‖²_F is first estimated from FRAME_PROBES seeded Gaussian probes z
# (E‖R⁻ᵀz‖² = ‖R⁻¹‖²_F; one triangular solve with 8 columns instead of R's
# inverse): an estimate below FRAME_MAX_INV_GRAM/FRAME_PROBE_MARGIN accepts the
# frame (it undershoots by 100× with probability < 1e-7: χ²₈ < 0.08), above it
# the exact ‖R⁻¹‖²_F decides. Typical stacked factors: 3e2–3e4.
FRAME_PROBES = 8
FRAME_PROBE_MARGIN = 100.0


@dataclass
class Frame:
    """An orthonormal basis Q (d×n) of span(x) for x (d×R), kept implicit:
    x = Q·coords (coords n×R), and lift(c) = Q·c.

    Built from the R×R Gram xᵀx by Cholesky when it is well conditioned (one
    d·R² product at BLAS-3 speed: Q = x·D⁻¹·R⁻¹ with R the balanced Gram's
    factor and D the column norms, never formed), by Householder QR otherwise
    (exact for any x, rank-deficient included; Q stored). Inner products of
    vectors given in coordinates equal those of their lifts, so SVDs,
    principal angles and Karcher means can all run on n-vectors.
    """

    coords: torch.Tensor
    factor: torch.Tensor | None = None  # R (Cholesky frame)
    norms: torch.Tensor | None = None   # D's diagonal (Cholesky frame)
    q: torch.Tensor | None = None       # d×n (Householder frame)

    @property
    def kind(self) -> str:
        return "cholesky" if self.q is None else "householder"

    def _solve(self, c: torch.Tensor) -> torch.Tensor:
        """D⁻¹·R⁻¹·c (Q = x·D⁻¹·R⁻¹)."""
        return torch.linalg.solve_triangular(self.factor, c, upper=True) / self.norms[:, None]

    def lift(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Q·c for coordinates c (n×k); x: the matrix the frame was built from."""
        return self.q @ c if self.q is not None else x @ self._solve(c)

    def lift_rows(self, c: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """c·Qᵀ for coordinates c (k×n); xt = xᵀ. For x stored as the rows of xt
        (a down factor stack): a product in xt's own row-major layout, about 3×
        faster at d = 5120 than lifting through its transpose."""
        return c @ self.q.T if self.q is not None else self._solve(c.T).T @ xt

    def coords_of(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Qᵀ·v for v (d×k): the coordinates of v's projection onto the frame
        (R⁻ᵀ·D⁻¹·xᵀ·v for a Cholesky frame); x as in lift."""
        if self.q is not None:
            return self.q.T @ v
        return torch.linalg.solve_triangular(self.factor.T, (x.T @ v) / self.norms[:, None], upper=False)


_PROBES: dict[tuple, torch.Tensor] = {}     # (n, dtype, device) -> the seeded probes, drawn once


def _probes(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (n, dtype, str(device))
    if key not in _PROBES:
        g = torch.Generator().manual_seed(n)
        _PROBES[key] = torch.randn(n, FRAME_PROBES, generator=g, dtype=dtype).to(device)
    return _PROBES[key]


def _inverse_bounded(factor: torch.Tensor) -> bool:
    """‖factor⁻¹‖²_F ≤ FRAME_MAX_INV_GRAM (see FRAME_PROBES)."""
    n = factor.shape[0]
    y = torch.linalg.solve_triangular(factor.T, _probes(n, factor.dtype, factor.device), upper=False)
    if float((y * y).sum()) / FRAME_PROBES <= FRAME_MAX_INV_GRAM / FRAME_PROBE_MARGIN:
        return True
    inv = torch.linalg.solve_triangular(factor, torch.eye(n, dtype=factor.dtype, device=factor.device), upper=True)
    return float((inv * inv).sum()) <= FRAME_MAX_INV_GRAM


def frame(x: torch.Tensor) -> Frame:
    """Orthonormal frame of span(x), x (d×R) float64; see Frame."""
    d, r = x.shape
    if r < d:
        gram = x.T @ x
        norms = torch.diagonal(gram).sqrt()
        if bool((norms > 0).all()):
            balanced = gram / norms[:, None] / norms[None, :]
            factor, info = torch.linalg.cholesky_ex(balanced, upper=True)
            if int(info) == 0 and _inverse_bounded(factor):
                # x = (x·D⁻¹R⁻¹)·(R·D) with D = diag(column norms)
                return Frame(factor * norms[None, :], factor=factor, norms=norms)
    q, coords = torch.linalg.qr(x)
    return Frame(coords, q=q)


# leading_svd answers only when σ_p ≥ this·σ_1: the Gram's eigenvalues carry
# absolute errors ~n·u·σ_1², so σ_p keeps ~1e-8 relative accuracy there and its
# vectors lose at most σ_1/σ_p = 1e3 times the digits a direct SVD keeps.
LEADING_SVD_MIN_RATIO = 1e-3


def leading_svd(m: torch.Tensor, p: int, eig: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> FactoredSVD | None:
    """Top-p singular triplets of a small dense matrix from one eigh of its
    smaller Gram (about half the time of a full SVD at n = 256), or None when
    σ_p < LEADING_SVD_MIN_RATIO·σ_1 (take a full SVD then). eig: gram_eigh(m)
    when the caller has it already."""
    tall = m.shape[-2] >= m.shape[-1]
    s, vec = eig if eig is not None else gram_eigh(m)
    s, vec = s[:p], vec[:, :p]
    if s.numel() < p or not float(s[-1]) >= LEADING_SVD_MIN_RATIO * float(s[0]) > 0:
        return None
    # the wide side as (vecᵀ·m)ᵀ: a product in m's own row-major layout, 2–4× faster than mᵀ·vec at d = 1280–5120
    other = (m @ vec if tall else (vec.transpose(-1, -2) @ m).transpose(-1, -2)) / s
    return FactoredSVD(other, s, vec) if tall else FactoredSVD(vec, s, other)
