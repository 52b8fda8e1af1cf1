"""Reference ΔW formulas (ComfyUI's own, dense, float64) and the dense-SVD check
that factored results are held to. Independent of core.formats."""
import pytest
import torch

from core.device import linalg_threads
from core.grassmann import principal_angles


@pytest.fixture(autouse=True)
def one_thread():
    """Import into a test module: dense reference SVDs and small factor ops run
    10-100× slower with 2 threads on a busy 2-core machine."""
    with linalg_threads(1):
        yield


def comfy_lora_delta(up, down, alpha=None, mid=None):
    """comfy/weight_adapter/lora.py: alpha / lora_down rows · up·down (flattened)."""
    up, down = up.double(), down.double()
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    if mid is not None:
        r = down.shape[0]
        down = torch.mm(down.transpose(0, 1).flatten(start_dim=1),
                        mid.double().transpose(0, 1).flatten(start_dim=1)
                        ).reshape(down.shape[1], r, *mid.shape[2:]).transpose(0, 1)
    return scale * torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1))


def comfy_loha_delta(t, name, weight_shape):
    g = {k[len(name) + 1:]: v.double() for k, v in t.items() if k.startswith(name + ".")}
    alpha = g["alpha"].item() / g["hada_w1_b"].shape[0] if "alpha" in g else 1.0
    if "hada_t1" in g:
        m1 = torch.einsum("i j k l, j r, i p -> p r k l", g["hada_t1"], g["hada_w1_b"], g["hada_w1_a"])
        m2 = torch.einsum("i j k l, j r, i p -> p r k l", g["hada_t2"], g["hada_w2_b"], g["hada_w2_a"])
    else:
        m1 = g["hada_w1_a"] @ g["hada_w1_b"]
        m2 = g["hada_w2_a"] @ g["hada_w2_b"]
    return alpha * (m1 * m2).reshape(weight_shape)


def comfy_lokr_parts(t, name):
    """(w1, w2, scale) as ComfyUI's LoKr builds them: ΔW = scale·kron(w1, w2)."""
    g = {k[len(name) + 1:]: v.double() for k, v in t.items() if k.startswith(name + ".")}
    dim = None
    if "lokr_w1" in g:
        w1 = g["lokr_w1"]
    else:
        dim = g["lokr_w1_b"].shape[0]
        w1 = g["lokr_w1_a"] @ g["lokr_w1_b"]
    if "lokr_w2" in g:
        w2 = g["lokr_w2"]
    else:
        dim = g["lokr_w2_b"].shape[0]
        if "lokr_t2" in g:
            # .contiguous(): torch.kron rejects the einsum's strided result (ComfyUI hits
            # exactly this and logs "ERROR lokr … view size is not compatible")
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", g["lokr_t2"], g["lokr_w2_b"],
                              g["lokr_w2_a"]).contiguous()
        else:
            w2 = g["lokr_w2_a"] @ g["lokr_w2_b"]
    scale = g["alpha"].item() / dim if "alpha" in g and dim is not None else 1.0
    return w1, w2, scale


def comfy_lokr_delta(t, name, weight_shape):
    w1, w2, scale = comfy_lokr_parts(t, name)
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return scale * torch.kron(w1, w2).reshape(weight_shape)


def lokr_apply(t, name, x):
    """ΔW·x without forming ΔW: kron(A, B)·vec(X) = vec(A·X·Bᵀ) (row-major vec)."""
    w1, w2, scale = comfy_lokr_parts(t, name)
    w2 = w2.reshape(w2.shape[0], -1)
    xr = x.T.reshape(x.shape[1], w1.shape[1], w2.shape[1])
    return scale * (w1 @ xr @ w2.T).reshape(x.shape[1], -1).T


def assert_svd_matches_dense(f, dense, sigma_rtol=1e-4, angle_tol=1e-3):
    """Factored U/Σ/V against torch.linalg.svd of the dense ΔW: singular values to
    ``sigma_rtol`` (relative), subspaces of the numerical rank to ``angle_tol`` rad."""
    if not dense.any():
        assert f.dead and f.effective_rank == 0
        return
    u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    k = int((s > 1e-6 * s[0]).sum())
    assert f.effective_rank == k
    torch.testing.assert_close(f.S[:k], s[:k], rtol=sigma_rtol, atol=1e-9 * float(s[0]))
    assert float(principal_angles(f.U[:, :k], u[:, :k]).max()) < angle_tol
    assert float(principal_angles(f.V[:, :k], vh[:k].T).max()) < angle_tol


def assert_is_svd_of(f, apply, d_in, rtol=1e-9, probes=8):
    """Exact check without a dense SVD: U·diag(S)·Vᵀ·x = ΔW·x on random probes
    (``apply(x)`` computes ΔW·x from the file's own tensors; any difference shows
    with probability 1), U and V orthonormal, S descending ≥ 0 — which makes
    U, S, V an SVD of ΔW."""
    x = torch.randn(d_in, probes, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = apply(x)
    if not want.any():
        assert f.dead
        return
    eye = torch.eye(f.S.numel(), dtype=torch.float64)
    assert float((f.U.T @ f.U - eye).abs().max()) < 1e-10
    assert float((f.V.T @ f.V - eye).abs().max()) < 1e-10
    assert bool((f.S[:-1] >= f.S[1:]).all()) and float(f.S.min()) >= 0
    got = f.U @ (f.S[:, None] * (f.V.T @ x))
    assert float(torch.linalg.matrix_norm(want - got)) <= rtol * float(torch.linalg.matrix_norm(want))
