"""The geometric-mean merges (karcher, chordal, flag-median) through core.merge:
the means they use equal the core functions on the sources' dense SVDs, the
report carries convergence and consensus, mixed ranks, an outlier LoRA."""
import math

import numpy as np
import pytest
import torch

from core.lora import LoraFile, LoraModule
from core.merge import merge
from core.means import flag_mean, flag_median

from tests.subspace_reference import F64, max_angle


pytestmark = pytest.mark.usefixtures("one_thread")


def module(seed, d_out=40, d_in=30, r=4, base=None, eps=0.0):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(d_out, r, generator=g, dtype=F64)
    down = torch.randn(r, d_in, generator=g, dtype=F64)
    if base is not None:
        up = base.up[:, :r] + eps * up
        down = base.down[:r] + eps * down
    return LoraModule("m", up, down)


def file(m, seed):
    return LoraFile(path=f"src{seed}.safetensors", format="kohya", modules={"m": m})


def dense_spaces(m):
    u, s, vh = torch.linalg.svd(m.delta().to(F64), full_matrices=False)
    r = int((s > 1e-10 * s[0]).sum())
    return u[:, :r], vh[:r].T


def merged_spaces(res, p):
    u, s, vh = torch.linalg.svd(res.lora.modules["m"].delta().to(F64), full_matrices=False)
    return u[:, :p], vh[:p].T


@pytest.mark.parametrize("method", ["chordal", "flag-median"])
def test_chordal_and_flag_median_merges_use_the_means_of_the_dense_spaces_with_mixed_ranks(method):
    mods = [module(1, r=3), module(2, r=6), module(3, r=4)]
    w = [1.0, 0.5, 2.0]
    res = merge([file(m, i) for i, m in enumerate(mods)], w, method=method, rank=3, dtype=F64)
    us, vs = zip(*(dense_spaces(m) for m in mods))
    mean = flag_mean if method == "chordal" else flag_median
    u_ref, v_ref = mean(list(us), w, 3).mean, mean(list(vs), w, 3).mean
    u, v = merged_spaces(res, 3)
    assert max_angle(u, u_ref) < 1e-6 and max_angle(v, v_ref) < 1e-6
    stats = res.report.modules[0].karcher
    for side, spaces in (("U", us), ("V", vs)):
        ref = flag_mean(list(spaces), w, 1).consensus
        assert np.allclose(stats[side]["consensus"], ref[: len(stats[side]["consensus"])].numpy(), atol=1e-4)
        assert stats[side]["consensus_rank"] == int((ref > 0.5).sum())
        assert stats[side]["converged"]


def test_karcher_merge_converges_on_unrelated_sources_and_reports_it():
    mods = [module(10 + k, d_out=30, d_in=24, r=3) for k in range(4)]
    res = merge([file(m, k) for k, m in enumerate(mods)], [1.0] * 4, method="karcher", dtype=F64)
    s = res.report.summary()["karcher"]
    assert s["not_converged"] == 0 and s["grad_norm_max"] <= 1e-8
    side = res.report.modules[0].karcher["U"]
    assert side["local_min"] == (side["hessian_min"] > 0 or side["hessian_lower"] > 0)
    assert side["hessian_lower"] <= side["hessian_min"] + 1e-12
    assert "consensus" in res.report.table()


def test_flag_median_merge_resists_an_outlier_lora():
    base = module(20, r=4)
    related = [module(21 + k, r=4, base=base, eps=0.05) for k in range(4)]
    outlier = module(30, r=4)
    srcs = [file(m, k) for k, m in enumerate(related + [outlier])]
    u_base = dense_spaces(base)[0]
    chord = merge(srcs, [1.0] * 5, method="chordal", rank=4, dtype=F64)
    median = merge(srcs, [1.0] * 5, method="flag-median", rank=4, dtype=F64)
    assert max_angle(merged_spaces(median, 4)[0], u_base) < 0.5 * max_angle(merged_spaces(chord, 4)[0], u_base)


def planted_files(shared=2, private=2, d_out=40, d_in=30):
    """Sources 1 and 2 share `shared` column and row directions (and each has `private`
    of its own); source 3 has only its own. Equal weights: shared λ = 2/3 > ½."""
    from tests.subspace_reference import orth
    qu, qv = orth(d_out, 2 * shared + 4 * private, seed=50), orth(d_in, 2 * shared + 4 * private, seed=51)
    g = torch.Generator().manual_seed(52)
    files, start = [], shared
    for k in range(3):
        n = private if k < 2 else shared + private
        cols = list(range(shared)) if k < 2 else []
        cols += list(range(start, start + n))
        start += n
        s = torch.rand(len(cols), generator=g, dtype=F64) + 0.5
        files.append(file(LoraModule("m", qu[:, cols] * s, qv[:, cols].T), k))
    return files, qu[:, :shared], qv[:, :shared]


@pytest.mark.parametrize("method", ["karcher", "chordal", "flag-median"])
def test_rank_auto_keeps_the_directions_a_majority_shares(method):
    files, u_shared, v_shared = planted_files()
    res = merge(files, [1.0, 1.0, 1.0], method=method, rank="auto", dtype=F64)
    mod = res.report.modules[0]
    assert mod.rank == 2
    for side in ("U", "V"):
        assert mod.karcher[side]["consensus_rank"] == 2
        assert np.allclose(mod.karcher[side]["consensus"][:2], 2 / 3, atol=1e-4)
    if method != "karcher":      # karcher averages each source's top-2 singular spaces instead
        u, v = merged_spaces(res, 2)
        assert max_angle(u, u_shared) < 1e-6 and max_angle(v, v_shared) < 1e-6


def test_flag_median_has_its_own_step_limit_and_the_report_shows_convergence_per_group(monkeypatch):
    from core.karcher import MAX_NEWTON_STEPS
    from core.means import MEDIAN_MAX_ITER
    import core.merge.means as merge_means
    seen = {}
    real = merge_means.flag_median

    def spy(*args, **kw):
        seen["max_iter"] = kw.get("max_iter")
        return real(*args, **kw)
    monkeypatch.setattr(merge_means, "flag_median", spy)
    base = module(1)
    srcs = [file(base, 1)] + [file(module(s, base=base, eps=0.2), s) for s in (2, 3)]
    merge(srcs, [1, 1, 1], method="flag-median", rank=3)
    assert seen["max_iter"] == MEDIAN_MAX_ITER != MAX_NEWTON_STEPS     # not the Karcher's limit
    merge(srcs, [1, 1, 1], method="flag-median", rank=3, max_iter=7)
    assert seen["max_iter"] == 7
    res = merge(srcs, [1, 1, 1], method="karcher", rank=3)
    head, rows = res.report.group_rows()
    sides = res.report.modules[0].karcher.values()
    row = dict(zip(head, rows[-1]))
    assert row["conv"] == f"{int(all(s['converged'] for s in sides))}/1"
    assert row["loc.min"] == f"{int(all(s['local_min'] for s in sides))}/1"
    assert row["iters"] == f"{sum(s['iterations'] for s in sides) / 2:.1f}/{max(s['iterations'] for s in sides)}"
    assert "consensus" in head and "loc.min" in res.report.table()
