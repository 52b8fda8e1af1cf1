"""Grassmann kernels of Harandi et al. 2014 (arXiv 1407.1123), for both embeddings.

X (d×k) and Y (d×l) are orthonormal bases; θ their principal angles.

Projection embedding X ↦ XXᵀ, statistic s = ‖XᵀY‖²_F = Σ cos²θ, and
t = (k + l)/2 − s = ½‖XXᵀ − YYᵀ‖²_F (= p − s = Σ sin²θ for equal ranks p):

    projection-poly      (β + s)^α
    projection-rbf       exp(−β·t)        = e^{−βp}·exp(β·s): the paper's exp(βs) up to a
                                            constant, so p = 64 does not overflow
    projection-laplace   exp(−β·√t)
    projection-binomial  (β − s)^(−α),   β > p
    projection-logarithm −log(1 + t)      = −log(p + 1 − s)

Because t is half a squared Euclidean distance between projectors, every form
is defined across ranks k ≠ l and keeps its status there.

Binet–Cauchy (Plücker) embedding, equal ranks only: δ = |det XᵀY| = Π cos θ,
kept as log δ (two unrelated 64-dim subspaces of R^768 give δ ≈ 1e-48, 0 in
float32). The `bc-` kernels use u = δ, the `bc2-` kernels u = δ² = det²:

    poly (β + u)^α, rbf exp(−β(1 − u)) (= e^{−β}·exp(βu)), laplace exp(−β√(1 − u)),
    binomial (β − u)^(−α) with β > 1, logarithm −log(2 − u);  1 − u = −expm1(log u).

Status (math.md, measured on Gr(1,2), Gr(1,3), Gr(2,4), Gr(3,6)): every projection
kernel is positive definite (PD) but the logarithm, which is conditionally PD
(CPD); on |det| only Laplace is PD, the others indefinite (the logarithm not even
CPD); on det² all are PD, the logarithm CPD. tests/test_kernels.py earns the
indefinite labels on Gr(1,2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import LoraError
from .grassmann import log_cos_product

EMBEDDINGS = ("projection", "bc", "bc2")
FORMS = ("poly", "rbf", "laplace", "binomial", "log")
PD, CPD, INDEFINITE = "PD", "CPD", "indefinite"
DEFAULT_KERNEL = "projection-rbf"

_STATUS = {
    "projection": {"poly": PD, "rbf": PD, "laplace": PD, "binomial": PD, "log": CPD},
    "bc": {"poly": INDEFINITE, "rbf": INDEFINITE, "laplace": PD, "binomial": INDEFINITE,
           "log": INDEFINITE},
    "bc2": {"poly": PD, "rbf": PD, "laplace": PD, "binomial": PD, "log": CPD},
}
_PARAMS = {"poly": ("beta", "alpha"), "rbf": ("beta",), "laplace": ("beta",),
           "binomial": ("beta", "alpha"), "log": ()}
_STAT = {"projection": "s", "bc": "δ", "bc2": "δ²"}
_FORMULA = {
    "projection": {"poly": "(β + s)^α", "rbf": "exp(−β(p − s))", "laplace": "exp(−β√(p − s))",
                   "binomial": "(β − s)^(−α)", "log": "−log(p + 1 − s)"},
    "bc": {"poly": "(β + δ)^α", "rbf": "exp(−β(1 − δ))", "laplace": "exp(−β√(1 − δ))",
           "binomial": "(β − δ)^(−α)", "log": "−log(2 − δ)"},
}
_FORMULA["bc2"] = {f: v.replace("δ", "δ²") for f, v in _FORMULA["bc"].items()}


@dataclass(frozen=True)
class KernelSpec:
    name: str           # e.g. "projection-rbf", "bc-laplace", "bc2-poly"
    embedding: str      # projection | bc | bc2
    form: str           # poly | rbf | laplace | binomial | log
    status: str         # PD | CPD | indefinite (measured; see module docstring)
    params: tuple[str, ...]
    formula: str


KERNELS: dict[str, KernelSpec] = {
    f"{e}-{f}": KernelSpec(f"{e}-{f}", e, f, _STATUS[e][f], _PARAMS[f], _FORMULA[e][f])
    for e in EMBEDDINGS for f in FORMS
}


@dataclass(frozen=True)
class Kernel:
    """A kernel with validated parameters. ``status`` is the spec's, or
    'indefinite' when a forced parameter choice voids the guarantee."""

    spec: KernelSpec
    beta: float = 1.0
    alpha: float = 2.0
    status: str = PD

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def embedding(self) -> str:
        return self.spec.embedding

    @property
    def form(self) -> str:
        return self.spec.form

    @property
    def needs_equal_ranks(self) -> bool:
        return self.spec.embedding != "projection"

    @property
    def normalisable(self) -> bool:
        """k(X,X) > 0 for every X (all but the logarithm kernels, where it is 0)."""
        return self.spec.form != "log"

    def params(self) -> dict[str, float]:
        return {p: getattr(self, p) for p in self.spec.params}

    def describe(self, formula: bool = True) -> str:
        """e.g. 'projection-rbf [PD] exp(−β(p − s)) with β=1'; formula=False gives
        plain ASCII ('projection-rbf [PD] beta=1') for fonts without Greek letters."""
        if not formula:
            return " ".join([f"{self.name} [{self.status}]"]
                            + [f"{p}={getattr(self, p):g}" for p in self.spec.params])
        ps = ", ".join(f"{'β' if p == 'beta' else 'α'}={getattr(self, p):g}" for p in self.spec.params)
        return f"{self.name} [{self.status}] {self.spec.formula}" + (f" with {ps}" if ps else "")

    # -- evaluation ---------------------------------------------------------
    def projection_values(self, s, p) -> np.ndarray:
        """Projection kernels from s = ‖XᵀY‖²_F and p = (k + l)/2."""
        s = np.asarray(s, dtype=np.float64)
        t = np.maximum(np.asarray(p, dtype=np.float64) - s, 0.0)
        return self._apply(s, t)

    def binet_cauchy_values(self, log_delta) -> np.ndarray:
        """Binet–Cauchy kernels from log δ = log|det XᵀY| = Σ log cos θ."""
        log_u = np.asarray(log_delta, dtype=np.float64) * (2.0 if self.embedding == "bc2" else 1.0)
        log_u = np.minimum(log_u, 0.0)
        with np.errstate(under="ignore"):
            return self._apply(np.exp(log_u), -np.expm1(log_u))

    def _apply(self, sim: np.ndarray, dist: np.ndarray) -> np.ndarray:
        """sim: the inner-product statistic (s or u); dist: its gap to the
        self value (t or 1 − u), computed without cancellation by the caller."""
        b, a, f = self.beta, self.alpha, self.form
        with np.errstate(under="ignore", over="ignore"):   # an overflow is refused by the kernel matrix
            if f == "poly":
                return (b + sim) ** a
            if f == "rbf":
                return np.exp(-b * dist)
            if f == "laplace":
                return np.exp(-b * np.sqrt(dist))
            if f == "binomial":
                return (b - sim) ** (-a)
            return -np.log1p(dist)

    def from_cosines(self, cos: torch.Tensor, rank_x: int | None = None,
                     rank_y: int | None = None) -> np.ndarray:
        """k(X, Y) from principal cosines (…, min(k,l)), e.g. from
        ``core.grassmann.principal_cosines``; ranks default to the cosine count."""
        m = cos.shape[-1]
        rank_x = m if rank_x is None else rank_x
        rank_y = m if rank_y is None else rank_y
        if self.needs_equal_ranks:
            if rank_x != rank_y:
                raise ValueError(f"{self.name} needs equal ranks (got {rank_x} and {rank_y}); "
                                 "compare top-min(k, l) subspaces")
            return self.binet_cauchy_values(log_cos_product(cos).cpu().numpy())
        s = (cos.double() ** 2).sum(-1).cpu().numpy()
        return self.projection_values(s, 0.5 * (rank_x + rank_y))

    def self_value(self, rank) -> np.ndarray:
        """k(X, X) for a rank-`rank` subspace (all cosines 1)."""
        rank = np.asarray(rank, dtype=np.float64)
        if self.needs_equal_ranks:
            return self.binet_cauchy_values(np.zeros_like(rank))
        return self.projection_values(rank, rank)

    def check_ranks(self, max_rank: int, where: str = "") -> None:
        """The projection binomial needs β > p for every compared p (s ≤ p)."""
        if self.embedding == "projection" and self.form == "binomial" and not self.beta > max_rank:
            raise LoraError(f"{self.name} needs β > p, the largest rank compared ({max_rank}"
                            f"{' ' + where if where else ''}); got β={self.beta:g}")


def make_kernel(name: str = DEFAULT_KERNEL, beta: float = 1.0, alpha: float = 2.0,
                force: bool = False) -> Kernel:
    """Look up a kernel and validate its parameters (LoraError on bad input).

    β > 0 wherever β is used; Binet–Cauchy binomial β > 1 (the projection
    binomial's β > p is checked against the data by ``Kernel.check_ranks``);
    α > 0; the polynomial's α must be a positive integer for a guaranteed PD
    kernel: any other α is refused unless ``force``, and then labelled indefinite.
    """
    spec = KERNELS.get(name)
    if spec is None:
        raise LoraError(f"unknown kernel '{name}'; choose from {', '.join(KERNELS)}")
    beta, alpha = float(beta), float(alpha)
    status = spec.status
    if "beta" in spec.params:
        if not (math.isfinite(beta) and beta > 0):
            raise LoraError(f"{name} needs a finite β > 0; got β={beta:g}")
        if spec.form == "binomial" and spec.embedding != "projection" and not beta > 1:
            raise LoraError(f"{name} needs β > 1 (δ can reach 1); got β={beta:g}")
    if "alpha" in spec.params:
        if not (math.isfinite(alpha) and alpha > 0):
            raise LoraError(f"{name} needs a finite α > 0; got α={alpha:g}")
        if spec.form == "poly" and alpha != round(alpha):
            if not force:
                raise LoraError(f"{name} is positive definite only for a positive integer α; "
                                f"got α={alpha:g} (force to use it anyway, as an indefinite kernel)")
            status = INDEFINITE
    return Kernel(spec, beta, alpha, status)
