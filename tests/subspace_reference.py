"""Random orthonormal bases and scipy's principal angles: the shared reference
for the Grassmann tests (Log/Exp, Hessian, Karcher, flag means)."""
import numpy as np
import torch
from scipy.linalg import subspace_angles

F64 = torch.float64


def orth(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(*shape, generator=g, dtype=F64))[0]


def near(base, eps, k, seed):
    """k bases at principal angles of order eps from base."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(k, *base.shape, generator=g, dtype=F64)
    return torch.linalg.qr(base + eps * noise)[0]


def angles(a, b):
    return np.sort(subspace_angles(np.asarray(a), np.asarray(b)))


def d_geo(a, b):
    return float(np.linalg.norm(angles(a, b)))


def max_angle(a, b):
    return float(angles(a, b).max())
