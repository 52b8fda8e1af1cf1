import numpy as np
import pytest
import scipy.linalg
import torch

from core.grassmann import log_cos_product, principal_angles, principal_cosines


def orthonormal(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


@pytest.mark.parametrize("d,k,l", [(50, 5, 5), (80, 3, 7), (80, 7, 3), (768, 64, 64)])
def test_angles_match_scipy(d, k, l):
    x, y = orthonormal(d, k, 1), orthonormal(d, l, 2)
    ref = np.sort(scipy.linalg.subspace_angles(x.numpy(), y.numpy()))
    ours = principal_angles(x, y).numpy()
    assert np.allclose(ours, ref, atol=1e-12)


def test_tiny_angles_are_accurate():
    x = orthonormal(100, 4, 3)
    h = orthonormal(100, 4, 4)
    h = h - x @ (x.T @ h)
    y = torch.linalg.qr(x + 1e-9 * h)[0]
    ours = principal_angles(x, y)
    ref = np.sort(scipy.linalg.subspace_angles(x.numpy(), y.numpy()))
    assert torch.all(ours > 0) and np.allclose(ours.numpy(), ref, rtol=1e-4, atol=1e-15)
    # arccos of the cosines would have returned exact zeros here
    assert torch.all(torch.arccos(principal_cosines(x, y)) < 1e-7)


def test_log_det_does_not_underflow():
    x, y = orthonormal(768, 64, 5), orthonormal(768, 64, 6)
    cos = principal_cosines(x, y)
    assert float(torch.prod(cos.float())) == 0.0          # the pitfall
    sign, logabs = torch.linalg.slogdet(x.T @ y)
    assert torch.allclose(log_cos_product(cos), logabs, atol=1e-8)
