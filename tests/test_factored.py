import pytest
import torch

from core.factored import dense_svd, module_svd, modules_svd, svd_from_factors
from core.lora import LoraModule
from core.synthetic import random_lora

# Dense reference SVDs are many times slower with 2 threads on 2-core machines.
pytestmark = pytest.mark.usefixtures("one_thread")


def principal_angle_max(a: torch.Tensor, b: torch.Tensor) -> float:
    s = torch.linalg.svdvals(a.T @ b).clamp(max=1.0)
    return float(torch.arccos(s.min()))


@pytest.mark.parametrize("d_out,d_in,r", [(320, 320, 4), (640, 2048, 16), (1280, 2880, 8), (40, 30, 64)])
def test_factored_svd_matches_dense(d_out, d_in, r):
    g = torch.Generator().manual_seed(d_out + r)
    m = LoraModule("x", torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g), scale=0.5)
    f, d = module_svd(m), dense_svd(m)
    k = min(r, d_out, d_in)
    assert torch.allclose(f.S[:k], d.S[:k], rtol=1e-8, atol=1e-10)
    assert principal_angle_max(f.U[:, :k], d.U[:, :k]) < 1e-6
    assert principal_angle_max(f.V[:, :k], d.V[:, :k]) < 1e-6
    # reconstruction from the factored SVD is ΔW itself
    assert torch.allclose((f.U * f.S) @ f.V.T, m.delta(), atol=1e-10)


def test_effective_rank_and_dead():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(64, 2, generator=g)
    up = torch.cat([b, b @ torch.randn(2, 2, generator=g)], dim=1)  # rank 2 in 4 columns
    m = LoraModule("x", up, torch.randn(4, 50, generator=g))
    assert module_svd(m).effective_rank == 2
    dead = LoraModule("y", torch.zeros(64, 4), torch.randn(4, 50, generator=g))
    res = module_svd(dead)
    assert res.dead and res.effective_rank == 0 and torch.isfinite(res.U).all()


def test_batched_equals_loop():
    lora = random_lora("sd1", rank=4, seed=3, limit=12)
    mods = list(lora.modules.values())
    loop = modules_svd(mods)
    ups = torch.stack([m.up.double() * m.scale for m in mods[:4]])
    downs = torch.stack([m.down.double() for m in mods[:4]])
    batched = svd_from_factors(ups, downs)
    for j in range(4):
        assert torch.allclose(batched.S[j], loop[j].S)
