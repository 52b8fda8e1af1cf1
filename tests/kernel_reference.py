"""Brute-force references for the Grassmann kernels (tests only).

Written straight from Harandi et al. 2014 on dense bases: the Frobenius norm
of XᵀY and an explicit determinant. The RBF kernels are compared with the
paper's exp(β·s) / exp(β·δ) times the documented constant. Across ranks
(projection only) p = (k + l)/2, so p − s = ½‖XXᵀ − YYᵀ‖²_F (checked in
test_kernels against the projectors).
"""
import numpy as np


def frobenius_sq(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x.T @ y, "fro") ** 2)


def det_xty(x: np.ndarray, y: np.ndarray) -> float:
    return float(abs(np.linalg.det(x.T @ y)))


def brute_kernel(name: str, x: np.ndarray, y: np.ndarray, beta: float = 1.0, alpha: float = 2.0) -> float:
    """k(X, Y). For y is x the statistic is taken exactly (s = p, δ = 1): rounding
    of 1e-16 in det(XᵀX) would become 1e-8 under the Laplace kernel's square root."""
    embedding, form = name.split("-")
    if embedding == "projection":
        p = 0.5 * (x.shape[1] + y.shape[1])
        s = float(x.shape[1]) if y is x else frobenius_sq(x, y)
        t = max(p - s, 0.0)
        return {
            "poly": lambda: (beta + s) ** alpha,
            "rbf": lambda: np.exp(beta * s) * np.exp(-beta * p),
            "laplace": lambda: np.exp(-beta * np.sqrt(t)),
            "binomial": lambda: (beta - s) ** (-alpha),
            "log": lambda: -np.log(p + 1.0 - s),
        }[form]()
    delta = 1.0 if y is x else det_xty(x, y)
    u = delta ** (2 if embedding == "bc2" else 1)
    return {
        "poly": lambda: (beta + u) ** alpha,
        "rbf": lambda: np.exp(beta * u) * np.exp(-beta),
        "laplace": lambda: np.exp(-beta * np.sqrt(1.0 - u)),
        "binomial": lambda: (beta - u) ** (-alpha),
        "log": lambda: -np.log(2.0 - u),
    }[form]()


def valid_params(name: str, p: int) -> dict:
    """Parameters inside every kernel's valid range for subspaces of rank ≤ p."""
    if name == "projection-binomial":
        return {"beta": p + 1.5, "alpha": 2.0}
    if name.endswith("binomial"):
        return {"beta": 1.5, "alpha": 2.0}
    return {"beta": 0.7, "alpha": 3.0}
