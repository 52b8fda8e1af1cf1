import json
import math
import statistics

import numpy as np
import pytest
import scipy.linalg
import torch

from core.errors import LoraError
from core.factored import dense_svd
from core.lora import LoraFile, LoraModule
from core.measures import DISTANCES
from core.sdarch import arch_for
from core.similarity import compare, guess_group
from core.synthetic import perturbed_lora, random_lora


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: single-threaded torch


def small(family="sd1", rank=4, seed=0, limit=24, **kw):
    return random_lora(family, rank, seed, limit=limit, **kw)


def copy_with(lora, fn, path="copy.safetensors"):
    out = LoraFile(path=path, format=lora.format, family=lora.family)
    for name, m in lora.modules.items():
        up, down, scale = fn(m)
        out.modules[name] = LoraModule(name, up, down, scale, m.rank, m.alpha, m.weight_shape, m.kind,
                                       dtype=m.dtype)
    return out


def live(report, side="out"):
    return [r for r in report.for_side(side) if r.live]


def dense_bases(module, side, p):
    svd = dense_svd(module)       # forms ΔW and takes a full SVD: the independent reference
    return (svd.U if side == "out" else svd.V)[:, :p].numpy()


# ---------------------------------------------------------------- identities and invariances
def test_phi_of_a_lora_with_itself_is_one_everywhere():
    a = small(conv=True, limit=40)
    rep = compare(a, a, side="both")
    assert len(rep.results) == 2 * len(a.modules)
    for r in rep.results:
        assert r.live and r.phi == pytest.approx(1.0, abs=1e-12), r.module
        assert max(r.angles_deg) < 1e-5
        assert r.distances["geodesic"] < 1e-7 and r.distances["martin"] < 1e-7


def test_symmetric_in_its_arguments():
    a, b = small(seed=1), small(seed=2, rank=6)
    ab, ba = compare(a, b, side="both"), compare(b, a, side="both")
    for x, y in zip(ab.results, ba.results):
        assert (x.module, x.side) == (y.module, y.side)
        assert x.phi == pytest.approx(y.phi, abs=1e-12)
        assert (x.rank_a, x.rank_b) == (y.rank_b, y.rank_a)
        assert np.allclose(x.angles_deg, y.angles_deg, atol=1e-9)
        for k in x.distances:
            assert x.distances[k] == pytest.approx(y.distances[k], abs=1e-9), k


def test_invariant_to_scaling_and_reparametrisation():
    a, b = small(seed=3), small(seed=4)
    g = torch.Generator().manual_seed(5)

    def reparam(m):
        r = m.factor_rank
        G = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
        up = (m.up.double() @ G).float()
        down = (torch.linalg.solve(G, m.down.double())).float()
        return up * 5.0, down, m.scale * 0.01

    a2 = copy_with(a, reparam)
    ref, got = compare(a, b, side="both"), compare(a2, b, side="both")
    for x, y in zip(ref.results, got.results):
        assert y.phi == pytest.approx(x.phi, abs=1e-6)
        assert np.allclose(y.angles_deg, x.angles_deg, atol=1e-3)
    # and the re-parametrised copy is the same subspace as the original
    assert all(r.phi == pytest.approx(1.0, abs=1e-6) for r in compare(a, a2, side="both").results)


# ---------------------------------------------------------------- against scipy on dense bases
@pytest.mark.parametrize("side", ["out", "in"])
def test_phi_and_angles_match_scipy_on_dense_bases(side):
    a, b = small(seed=6, rank=4, limit=10), small(seed=7, rank=6, limit=10)   # different ranks
    rep = compare(a, b, side=side)
    for r in rep.results:
        x = dense_bases(a.modules[r.module], side, r.rank_a)
        y = dense_bases(b.modules[r.module], side, r.rank_b)
        ref = np.sort(scipy.linalg.subspace_angles(x, y))
        assert np.allclose(np.radians(r.angles_deg), ref, atol=1e-9)
        assert r.phi == pytest.approx(np.sum(np.cos(ref) ** 2) / min(r.rank_a, r.rank_b), abs=1e-9)
        assert r.distances["geodesic"] == pytest.approx(np.linalg.norm(ref), abs=1e-9)
        assert r.distances["geodesic_cross_rank"] == pytest.approx(
            math.sqrt(abs(r.rank_a - r.rank_b) * math.pi ** 2 / 4 + np.sum(ref ** 2)), abs=1e-9)
        assert r.chance == pytest.approx(max(r.rank_a, r.rank_b) / r.d)
        assert set(DISTANCES) <= set(r.distances)


def test_phi_grid_matches_dense_top_vectors():
    a, b = small(seed=8, rank=5, limit=4), small(seed=9, rank=3, limit=4)
    rep = compare(a, b, side="both")
    for side in ("out", "in"):
        name = rep.for_side(side)[2].module
        grid = rep.phi_grid(name, side)
        assert grid.shape == (5, 3)
        x, y = dense_bases(a.modules[name], side, 5), dense_bases(b.modules[name], side, 3)
        for i in range(1, 6):
            for j in range(1, 4):
                m = x[:, :i].T @ y[:, :j]
                assert grid[i - 1, j - 1] == pytest.approx(np.sum(m * m) / min(i, j), abs=1e-9)
        assert grid[-1, -1] == pytest.approx(rep.module(name, side).phi, abs=1e-12)
        assert rep.chance_grid(name, side)[-1, -1] == pytest.approx(rep.module(name, side).chance)


# ---------------------------------------------------------------- statistics
def test_independent_loras_sit_at_chance_level():
    a, b = random_lora("sd1", 8, 11), random_lora("sd1", 8, 12)
    rep = compare(a, b, side="both")
    for side in ("out", "in"):
        excess = [r.phi - r.chance for r in live(rep, side)]
        se = statistics.stdev(excess) / math.sqrt(len(excess))
        assert abs(statistics.fmean(excess)) < 4 * se, side
        s = rep.summary()["sides"][side]
        assert 0.7 < s["phi_over_chance"] < 1.3


def test_perturbed_copies_approach_phi_one():
    a = small(seed=13, rank=8, limit=30)
    means = []
    for eps in (1.0, 0.3, 0.1, 0.03, 0.01, 0.001):
        rep = compare(a, perturbed_lora(a, eps, seed=14))
        means.append(statistics.fmean(r.phi for r in live(rep)))
    assert all(later > earlier for earlier, later in zip(means, means[1:])), means
    assert 1 - means[-1] < 1e-4 and means[0] < 0.9


# ---------------------------------------------------------------- dead, deficient, ranks, names
def test_dead_and_rank_deficient_modules_are_reported_not_nan():
    a = small(seed=15, rank=4, limit=10)
    names = list(a.modules)
    dead_name, deficient_name = names[1], names[2]

    def edit(m):
        up, down = m.up.clone(), m.down.clone()
        if m.name == dead_name:
            up.zero_()
        if m.name == deficient_name:
            up[:, 3] = up[:, 0]          # rank 3 product from rank-4 factors
        return up, down, m.scale

    b = copy_with(a, edit)
    rep = compare(a, b, side="both")
    dead = rep.module(dead_name, "out")
    assert dead.status == "dead" and dead.dead_in == "b" and dead.phi is None
    d = dead.to_dict()
    assert "phi" not in d and d["dead_in"] == "b"
    deficient = rep.module(deficient_name, "in")
    assert (deficient.rank_a, deficient.rank_b, deficient.nominal_rank_b) == (4, 3, 4)
    assert deficient.to_dict()["rank_deficient"] is True
    assert deficient.phi == pytest.approx(1.0, abs=1e-9) or deficient.phi < 1   # rows: 3-dim inside 4-dim
    assert rep.module(deficient_name, "out").phi == pytest.approx(1.0, abs=1e-9)  # column span ⊂ original
    text = rep.to_json()                                 # allow_nan=False: raises on any NaN/inf
    assert "NaN" not in text
    summary = rep.summary()["sides"]["out"]
    assert summary["n_dead"] == 1 and summary["n_live"] == 9
    assert "1 dead" in rep.text_summary()


def test_dead_in_both():
    a = small(seed=16, limit=3)
    z = copy_with(a, lambda m: (torch.zeros_like(m.up), m.down, m.scale))
    rep = compare(z, z)
    assert all(r.status == "dead" and r.dead_in == "both" for r in rep.results)
    assert "no live module" in rep.text_summary()
    with pytest.raises(LoraError):
        rep.phi_grid(rep.results[0].module)


def test_different_ranks_and_top():
    a, b = small(seed=17, rank=4), small(seed=18, rank=16)
    rep = compare(a, b)
    r = live(rep)[0]
    assert (r.rank_a, r.rank_b) == (4, 16) and len(r.angles_deg) == 4
    assert r.chance == pytest.approx(16 / r.d)
    topped = compare(a, b, top=2)
    t = topped.module(r.module)
    assert (t.rank_a, t.rank_b) == (2, 2) and len(t.angles_deg) == 2
    # top-2 φ is the (2, 2) entry of the full grid
    assert t.phi == pytest.approx(rep.phi_grid(r.module)[1, 1], abs=1e-12)
    with pytest.raises(LoraError):
        compare(a, b, top=0)


def test_module_filter():
    a, b = small(seed=30, limit=10), small(seed=31, limit=10)
    keep = list(a.modules)[2:5] + ["lora_not_there"]
    rep = compare(a, b, modules=keep)
    assert [r.module for r in rep.results] == keep[:3]
    assert rep.summary()["only_in_a"] == 0


def test_modules_only_in_one_file_are_counted():
    a = random_lora("sd1", 4, 19, limit=20)
    b = random_lora("sd1", 4, 20, limit=26)
    del b.modules[next(iter(b.modules))]
    rep = compare(a, b)
    s = rep.summary()
    assert s["shared"] == 19 and s["only_in_a"] == 1 and s["only_in_b"] == 6
    assert "only in A: 1, only in B: 6" in rep.text_summary()


def test_family_and_shape_mismatches_raise_lora_errors():
    with pytest.raises(LoraError, match="SD2"):
        compare(small("sd1"), small("sd2"))
    a = small(limit=2)
    b = copy_with(a, lambda m: (m.up[:-1], m.down, m.scale), path="b.safetensors")
    with pytest.raises(LoraError) as err:
        compare(a, b)
    assert err.value.key == next(iter(a.modules)) and err.value.path == "b.safetensors"
    with pytest.raises(LoraError):
        compare(a, a, side="left")


# ---------------------------------------------------------------- aggregates, outputs
def test_groups_and_summary_recomputed_independently():
    a = random_lora("sd1", 4, 21, names=[n for n in arch_for("sd1").shapes
                                          if "up_blocks_3" in n or n.startswith("lora_te_text_model_encoder_layers_0_")])
    b = perturbed_lora(a, 0.5, 22)
    rep = compare(a, b, side="in")
    arch = arch_for("sd1")
    groups = {g["group"]: g for g in rep.groups()}
    assert set(groups) == {arch.groups[n] for n in a.modules}
    for label, g in groups.items():
        members = [r for r in rep.results if arch.groups[r.module] == label]
        phis = [r.phi for r in members]
        assert g["n_live"] == len(members)
        assert g["phi_mean"] == pytest.approx(np.mean(phis)) and g["phi_median"] == pytest.approx(np.median(phis))
        w = np.array([np.linalg.norm(a.modules[r.module].delta().numpy()) *
                      np.linalg.norm(b.modules[r.module].delta().numpy()) for r in members]) ** 0.5
        assert g["phi_mean_weighted"] == pytest.approx(np.sum(w * phis) / np.sum(w), rel=1e-6)
        assert g["geodesic_mean"] == pytest.approx(np.mean([r.distances["geodesic"] for r in members]))
    s = rep.summary()
    assert s["weights"]["phi_mean_weighted"].startswith("sqrt(")
    top5 = s["sides"]["in"]["most_similar"]
    excess = sorted(((r.phi - r.chance) / (1 - r.chance) for r in rep.results), reverse=True)
    assert [e["phi_above_chance"] for e in top5] == pytest.approx(excess[:5])


def test_json_schema():
    a, b = small(seed=23), small(seed=24)
    doc = json.loads(compare(a, b, side="both").to_json())
    assert set(doc) == {"a", "b", "modules", "groups", "summary"}
    assert doc["a"]["family"] == "sd1" and doc["b"]["n_modules"] == len(b.modules)
    m = doc["modules"][0]
    for key in ("module", "group", "rank_a", "rank_b", "d", "side", "phi", "chance", "angles_deg", "distances"):
        assert key in m
    assert set(DISTANCES) <= set(m["distances"])
    assert {x["side"] for x in doc["modules"]} == {"out", "in"}
    assert len(m["angles_deg"]) == min(m["rank_a"], m["rank_b"])


def test_json_file_and_images(tmp_path):
    a = small(seed=25, limit=12)
    b = copy_with(a, lambda m: (m.up if m.name != next(iter(a.modules)) else torch.zeros_like(m.up),
                                m.down, m.scale))
    rep = compare(a, perturbed_lora(b, 0.3, 26, path="b.safetensors"), side="both")
    path = tmp_path / "r.json"
    rep.to_json(str(path))
    assert json.loads(path.read_text())["summary"]["shared"] == 12
    table, rows, cols = rep.measure_table()
    assert table.shape == (12, 2 * 8) and len(cols) == 16 and "martin" not in " ".join(cols)
    assert np.isnan(table[0]).all() and not np.isnan(table[1:]).any()        # dead row → n/a
    assert (table[1:] >= 0).all() and (table[1:] <= 1 + 1e-12).all()
    img = rep.heatmap_image()
    assert img.width > 300 and img.height > 12 * 5
    # φ and its chance level (per side) on their own scale, the 14 distances on another
    assert [(first, n) for _, first, n in img.info["heatmap_panels"]] == [(0, 4), (4, 14)]
    name = rows[3] if rows[3] in a.modules else "lora_unet_" + rows[3]
    assert rep.grid_image(rep.results[5].module, "in").size[0] > 100


def test_guess_group_for_tableless_names():
    assert guess_group("lora_unet_double_blocks_3_img_attn_qkv") == "unet double img_attn"
    assert guess_group("lora_unet_single_blocks_20_linear1") == "unet single linear1"
    assert guess_group("lora_te1_text_model_encoder_layers_3_mlp_fc1") == "te1 layers mlp"
    assert guess_group("lora_unet_whatever") == "unet"


def _flux_like_pair(family):
    names = [f"lora_unet_double_blocks_{i}_img_attn_qkv" for i in range(3)] + \
            [f"lora_unet_single_blocks_{i}_linear1" for i in range(2)]
    g = torch.Generator().manual_seed(27)

    def lora(seed):
        f = LoraFile(path=f"{seed}.safetensors", format="kohya", family=family)
        for n in names:
            f.modules[n] = LoraModule(n, torch.randn(64, 4, generator=g), torch.randn(4, 48, generator=g))
        return f
    return lora(1), lora(2)


def test_unknown_family_uses_heuristic_groups():
    rep = compare(*_flux_like_pair("unknown"))
    assert {g["group"] for g in rep.groups()} == {"unet double img_attn", "unet single linear1"}


def test_flux_groups_come_from_its_table():
    # Flux has a module table (core/arch): groups are its per-block labels, not the name heuristic.
    rep = compare(*_flux_like_pair("flux"))
    assert {g["group"] for g in rep.groups()} == {"double_blocks.00", "double_blocks.01", "double_blocks.02",
                                                  "single_blocks.00", "single_blocks.01"}


# ---------------------------------------------------------------- CLI (in-memory files)
def test_cli_writes_everything(tmp_path, monkeypatch, capsys):
    from core import cli
    from core.commands import similarity as cmd
    a = small(seed=28, limit=10, rank=4)
    files = {"A.safetensors": a, "B.safetensors": perturbed_lora(a, 0.2, 29, path="B.safetensors")}
    monkeypatch.setattr(cmd, "_load", lambda p: files[p])
    name = list(a.modules)[4]
    rc = cli.main(["similarity", "A.safetensors", "B.safetensors", "--side", "both",
                   "--json", str(tmp_path / "r.json"), "--heatmap", str(tmp_path / "h.png"),
                   "--grid", name, "--grid-png", str(tmp_path / "g.png"), "--groups"])
    out = capsys.readouterr().out
    assert rc == 0 and "chance" in out and "most similar" in out and "Groups" in out
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["shared"] == 10
    assert (tmp_path / "h.png").stat().st_size > 1000
    assert (tmp_path / "g-out.png").exists() and (tmp_path / "g-in.png").exists()
    # text grid, short module name
    rc = cli.main(["similarity", "A.safetensors", "B.safetensors", "--grid", name[len("lora_unet_"):]])
    out = capsys.readouterr().out
    assert rc == 0 and "i\\j" in out and out.count("\n   ") >= 4
    # unknown module is a one-line user error
    assert cli.main(["similarity", "A.safetensors", "B.safetensors", "--grid", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_loras_sharing_no_module_have_no_heatmap_one_line_and_nothing_written(tmp_path, monkeypatch, capsys):
    """A text-encoder-only LoRA against a UNet-only one: the summary says so; a heatmap
    asked for is a one-line error before any file is written (a ValueError
    traceback from the plotter before)."""
    from core import cli
    from core.commands import similarity as cmd
    from core.synthetic import module_names
    names = module_names("sd1")
    te, unet = [n for n in names if n.startswith("lora_te")][:2], [n for n in names if n.startswith("lora_unet")][:2]
    files = {"A.safetensors": random_lora("sd1", 2, 1, names=te, path="A.safetensors"),
             "B.safetensors": random_lora("sd1", 2, 2, names=unet, path="B.safetensors")}
    rep = compare(files["A.safetensors"], files["B.safetensors"])
    with pytest.raises(LoraError, match="share no module") as err:
        rep.heatmap_image()
    assert err.value.path == "A.safetensors"
    monkeypatch.setattr(cmd, "_load", lambda p: files[p])
    out_json, out_png = tmp_path / "r.json", tmp_path / "h.png"
    rc = cli.main(["similarity", "A.safetensors", "B.safetensors", "--json", str(out_json), "--heatmap",
                   str(out_png)])
    err_text = capsys.readouterr().err
    assert rc == 2 and "share no module" in err_text and len(err_text.strip().splitlines()) == 1
    assert not out_json.exists() and not out_png.exists()


# ---------------------------------------------------------------- real files (need core.formats)
@pytest.fixture(scope="module")
def load_lora():
    formats = pytest.importorskip("core.formats")
    return formats.load_lora


def test_real_files_against_themselves_and_scipy(real_loras_dir, load_lora):
    for fname in ("catundchat__pytorch_lora_weights.safetensors", "cloneofsimo__lora_illust_sd2.pt",
                  "lycoris__smart_falcon_4_lokr.safetensors"):
        f = load_lora(str(real_loras_dir / fname))
        rep = compare(f, f, side="both", modules=[n for n in f.modules if "up_blocks_3" in n])
        assert len(rep.results) > 10
        assert all(r.phi == pytest.approx(1.0, abs=1e-9) for r in rep.results if r.live), fname
        assert not any(r.phi is not None and math.isnan(r.phi) for r in rep.results)
    a = load_lora(str(real_loras_dir / "cloneofsimo__analog_svd_rank4_sd15.safetensors"))
    b = load_lora(str(real_loras_dir / "catundchat__pytorch_lora_weights.safetensors"))
    rep = compare(a, b, side="both")
    checked = 0
    for r in rep.results:
        if not r.live or r.d > 1280 or checked >= 12:
            continue
        x = dense_bases(a.modules[r.module], r.side, r.rank_a)
        y = dense_bases(b.modules[r.module], r.side, r.rank_b)
        ref = np.sort(scipy.linalg.subspace_angles(x, y))
        assert np.allclose(np.radians(r.angles_deg), ref, atol=1e-7), r.module
        assert r.phi == pytest.approx(np.sum(np.cos(ref) ** 2) / min(r.rank_a, r.rank_b), abs=1e-7)
        checked += 1
    assert checked == 12


def test_diffusers_and_cloneofsimo_files_line_up(real_loras_dir, load_lora):
    a = load_lora(str(real_loras_dir / "catundchat__pytorch_lora_weights.safetensors"))
    b = load_lora(str(real_loras_dir / "cloneofsimo__analog_svd_rank4_sd15.safetensors"))
    rep = compare(a, b)
    s = rep.summary()
    # every diffusers-processor module (128 UNet attention projections) has its cloneofsimo twin
    assert s["shared"] == 128 and s["only_in_a"] == 0 and s["only_in_b"] == 192 - 128
    assert all(r.live for r in rep.results)
    assert {arch_for("sd1").groups[r.module].split()[-1] for r in rep.results} == {"attn1", "attn2"}
    # different LoRAs on one base: above chance but far from shared (README: 0.01–0.04 vs ~0.007)
    side = s["sides"]["out"]
    assert side["chance_mean"] < side["phi_mean"] < 0.2


def test_real_dead_modules(real_loras_dir, load_lora):
    a = load_lora(str(real_loras_dir / "cloneofsimo__lora_illust_sd2.pt"))
    b = load_lora(str(real_loras_dir / "cloneofsimo__lora_pop_sd2.pt"))
    rep = compare(a, b, side="both")
    dead = [r for r in rep.for_side("out") if not r.live]
    assert len(dead) == 32 and all(r.module.endswith("to_out_0") for r in dead)
    assert all(r.dead_in == "both" for r in dead)
    json.loads(rep.to_json())
    lokr4 = load_lora(str(real_loras_dir / "lycoris__smart_falcon_4_lokr.safetensors"))
    lokr8 = load_lora(str(real_loras_dir / "lycoris__smart_falcon_8_lokr.safetensors"))
    rep = compare(lokr4, lokr8, modules=[n for n in lokr4.modules if "down_blocks_0" in n])
    dead = [r.module for r in rep.results if not r.live]
    assert sorted(dead) == sorted(f"lora_unet_down_blocks_0_resnets_0_{x}" for x in ("conv1", "conv2", "time_emb_proj"))
    assert all(r.dead_in == "both" for r in rep.results if not r.live)


def test_cli_on_real_files(real_loras_dir, load_lora, tmp_path, capsys):
    from core import cli
    a = str(real_loras_dir / "catundchat__pytorch_lora_weights.safetensors")
    b = str(real_loras_dir / "cloneofsimo__analog_svd_rank4_sd15.safetensors")
    rc = cli.main(["similarity", a, b, "--top", "2", "--json", str(tmp_path / "r.json")])
    assert rc == 0 and "× chance" in capsys.readouterr().out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["a"]["format"] != doc["b"]["format"] and len(doc["modules"]) == 128
    assert all(m["rank_a"] == 2 for m in doc["modules"])
    sd2 = str(real_loras_dir / "cloneofsimo__lora_pop_sd2.pt")
    assert cli.main(["similarity", a, sd2]) == 2            # different base models: one-line error
    assert "SD2" in capsys.readouterr().err


def test_worker_threads_give_the_same_report():
    a, b = small(seed=32, limit=30, rank=6), small(seed=33, limit=30, rank=6)
    one, many = compare(a, b, side="both", workers=1), compare(a, b, side="both", workers=3)
    assert [(r.module, r.side) for r in one.results] == [(r.module, r.side) for r in many.results]
    assert max(abs(x.phi - y.phi) for x, y in zip(one.results, many.results)) < 1e-12
    assert torch.get_num_threads() == 1          # the fixture's setting survives the pool
