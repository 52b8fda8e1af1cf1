"""Brute-force references for the Grassmann kernels (tests only).

Written straight from Harandi et al. 2014 on dense bases: the Frobenius norm
of XᵀY, an explicit determinant, the projectors XXᵀ. The RBF kernels are
compared with the paper's exp(β·s) / exp(β·δ) times the documented constant.
"""
import numpy as np


def projection_stats(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(s, p) with s = tr(XXᵀYYᵀ) and p = (k + l)/2, via the d×d projectors."""
    px, py = x @ x.T, y @ y.T
    return float(np.sum(px * py)), 0.5 * (x.shape[1] + y.shape[1])


def det_xty(x: np.ndarray, y: np.ndarray) -> float:
    return float(abs(np.linalg.det(x.T @ y)))


def brute_kernel(name: str, x: np.ndarray, y: np.ndarray, beta: float = 1.0, alpha: float = 2.0) -> float:
    embedding, form = name.split("-")
    if embedding == "projection":
        s, p = projection_stats(x, y)
        # ½‖XXᵀ − YYᵀ‖²_F written out, to check the cross-rank form p − s as well
        t = 0.5 * float(np.linalg.norm(x @ x.T - y @ y.T) ** 2)
        return {
            "poly": lambda: (beta + s) ** alpha,
            "rbf": lambda: np.exp(beta * s) * np.exp(-beta * p),
            "laplace": lambda: np.exp(-beta * np.sqrt(max(t, 0.0))),
            "binomial": lambda: (beta - s) ** (-alpha),
            "log": lambda: -np.log(1.0 + t),
        }[form]()
    u = min(det_xty(x, y), 1.0) ** (2 if embedding == "bc2" else 1)  # 1 + 1e-16 for X = Y
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
