"""core.fidelity against a fake linear "model" where F and cos have a closed form.

The fake denoiser is ε_v(x_t, c_k) = (W + Δ_{v,k}) x_t with x_t = σ·noise, so
ε_merge − ε_k = (Δ_m − Δ_k) x_t and ε_k − ε_base = Δ_k x_t; F and cos are then
computed here per sample with numpy, independently of the module's code.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from core import fidelity as fd
from core.prompts import GENERIC_PROMPT, prompt_for, trigger_prompt

SHAPE = (2, 3, 3)          # a tiny "latent": 18 numbers
D = int(np.prod(SHAPE))


class LinearModel:
    """ε = (W + Δ_variant,k) · σ·noise; records the calls."""

    def __init__(self, deltas: dict[str, list[np.ndarray]], n_prompts: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.w = rng.standard_normal((D, D))
        self.deltas = deltas
        self.n_prompts = n_prompts
        self.calls: list[tuple[str, int]] = []

    def delta(self, variant: str, k: int) -> np.ndarray:
        return np.zeros((D, D)) if variant == fd.BASE else self.deltas[variant][k]

    def x_t(self, noise, sigmas):
        return (noise.double().numpy().reshape(len(sigmas), D) * sigmas.double().numpy()[:, None])

    def __call__(self, variant, k, noise, sigmas):
        self.calls.append((variant, k))
        x = self.x_t(noise, sigmas)
        eps = x @ (self.w + self.delta(variant, k)).T
        return torch.from_numpy(eps.reshape(noise.shape)).float()


def reference(model: LinearModel, k: int, j: int, noise, sigmas):
    """F and cos per sample from the closed form."""
    x = model.x_t(noise, sigmas)
    dk = x @ model.delta(fd.source_variant(k), k).T
    dm = x @ model.delta(fd.merge_variant(j), k).T
    f = np.linalg.norm(dm - dk, axis=1) / np.linalg.norm(dk, axis=1)
    cos = np.sum(dm * dk, axis=1) / (np.linalg.norm(dm, axis=1) * np.linalg.norm(dk, axis=1))
    return f, cos


def random_deltas(rng, n_sources, merges_of):
    """Per source k a random Δ_k (same under every prompt for simplicity, but the
    prompts differ through the source index); merges built by merges_of(Δs)."""
    src = [0.05 * rng.standard_normal((D, D)) for _ in range(n_sources)]
    deltas = {fd.source_variant(k): [src[k]] * n_sources for k in range(n_sources)}
    for j, m in enumerate(merges_of(src)):
        deltas[fd.merge_variant(j)] = [m] * n_sources
    return deltas


def test_random_merges_match_the_closed_form():
    rng = np.random.default_rng(1)
    deltas = random_deltas(rng, 2, lambda s: [0.5 * (s[0] + s[1]), 0.03 * rng.standard_normal((D, D)), s[0]])
    model = LinearModel(deltas, 2)
    seeds, sigmas = [3, 4], [14.6, 2.0, 0.3]
    rep = fd.measure(model, ["A", "B"], ["avg", "noise", "A itself"], seeds, sigmas, SHAPE)
    noise = fd.noise_batch(seeds, len(sigmas), SHAPE)
    sig = torch.tensor(sigmas * len(seeds))
    for k in range(2):
        for j in range(3):
            f, cos = reference(model, k, j, noise, sig)
            cell = rep.cells[k][j]
            np.testing.assert_allclose(cell.f_samples, f, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(cell.cos_samples, cos, rtol=1e-5, atol=1e-6)
            assert cell.f == pytest.approx(f.mean(), rel=1e-5, abs=1e-6)
            assert cell.cos == pytest.approx(cos.mean(), rel=1e-5, abs=1e-6)
    # a merge equal to A: F_A = 0, cos_A = 1; and B sees A's update, not its own
    assert rep.cells[0][2].f == pytest.approx(0.0, abs=1e-6) and rep.cells[0][2].cos == pytest.approx(1.0)
    assert rep.cells[1][2].f > 0.5
    assert rep.forward_passes == fd.forward_passes(2, 3, 2, 3) == 2 * 5 * 2 * 3
    assert len(model.calls) == 2 * 5      # one batched call per (variant, prompt)


def test_special_merges_have_their_exact_values():
    """empty → F = 1, cos undefined; double → F = 1, cos = 1; negated → F = 2, cos = −1."""
    rng = np.random.default_rng(2)
    zero = np.zeros((D, D))
    deltas = random_deltas(rng, 1, lambda s: [zero, 2 * s[0], -s[0]])
    rep = fd.measure(LinearModel(deltas, 1), ["A"], ["empty", "double", "negated"], [0], [1.0, 5.0], SHAPE)
    empty, double, neg = rep.cells[0]
    assert empty.f == pytest.approx(1.0, abs=1e-6) and empty.cos is None
    assert double.f == pytest.approx(1.0, abs=1e-5) and double.cos == pytest.approx(1.0, abs=1e-6)
    assert neg.f == pytest.approx(2.0, abs=1e-5) and neg.cos == pytest.approx(-1.0, abs=1e-6)


def test_source_without_effect_is_reported_never_nan():
    rng = np.random.default_rng(3)
    deltas = random_deltas(rng, 2, lambda s: [s[0] + s[1]])
    deltas[fd.source_variant(1)] = [np.zeros((D, D))] * 2            # B changes nothing
    rep = fd.measure(LinearModel(deltas, 2), ["A", "B"], ["sum"], [0], [1.0], SHAPE)
    assert rep.cells[0][0].f is not None and rep.source_has_effect(0)
    assert rep.cells[1][0].f is None and rep.cells[1][0].cos is None and not rep.source_has_effect(1)
    assert any("B: " + fd.NO_SOURCE_EFFECT in n for n in rep.notes)
    cols, rows = rep.table()
    assert rows[1][3] == fd.NO_SOURCE_EFFECT
    data = json.loads(rep.to_json(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["F"][1] == [None] and data["status"][1] == [fd.NO_SOURCE_EFFECT]
    assert np.isnan(rep.matrix()[1, 0]) and not np.isnan(rep.matrix()[0, 0])
    img = rep.heatmap_image()
    assert img.size[0] > 50 and img.size[1] > 50


def test_rounding_sized_effect_counts_as_none():
    """An effect below rtol·‖ε‖ is float noise: no F, whatever its ratio would be."""
    rng = np.random.default_rng(4)
    tiny = 1e-9 * rng.standard_normal((D, D))
    deltas = {fd.source_variant(0): [tiny], fd.merge_variant(0): [np.zeros((D, D))]}
    rep = fd.measure(LinearModel(deltas, 1), ["A"], ["m"], [0], [1.0], SHAPE)
    assert rep.cells[0][0].f is None


def test_progress_counts_evaluations_and_its_raise_aborts():
    rng = np.random.default_rng(5)
    deltas = random_deltas(rng, 2, lambda s: [s[0], s[1]])
    seen = []
    fd.measure(LinearModel(deltas, 2), ["A", "B"], ["m1", "m2"], [0, 1], [1.0, 2.0, 3.0], SHAPE,
               progress=lambda done, total: seen.append((done, total)))
    total = fd.forward_passes(2, 2, 2, 3)
    assert seen[-1] == (total, total) and all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) == 2 * 4

    class Cancel(Exception):
        pass

    model = LinearModel(deltas, 2)

    def cancel(done, total):
        if done >= 6:
            raise Cancel

    with pytest.raises(Cancel):
        fd.measure(model, ["A", "B"], ["m1", "m2"], [0, 1], [1.0, 2.0, 3.0], SHAPE, progress=cancel)
    assert len(model.calls) == 1


def test_seeds_make_it_reproducible_and_match_comfyui_noise():
    noise = fd.noise_batch([7, 8], 3, SHAPE)
    assert noise.shape == (6, *SHAPE)
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[3])
    # ComfyUI's prepare_noise for one latent: torch.manual_seed(seed); torch.randn
    want = torch.randn((1, *SHAPE), generator=torch.manual_seed(8))[0]
    assert torch.equal(noise[3], want)
    rng = np.random.default_rng(6)
    deltas = random_deltas(rng, 1, lambda s: [0.7 * s[0]])
    a = fd.measure(LinearModel(deltas, 1), ["A"], ["m"], [7, 8], [1.0], SHAPE).to_dict()
    b = fd.measure(LinearModel(deltas, 1), ["A"], ["m"], [7, 8], [1.0], SHAPE).to_dict()
    c = fd.measure(LinearModel(deltas, 1), ["A"], ["m"], [9, 8], [1.0], SHAPE).to_dict()
    assert a == b and a["F_samples"] != c["F_samples"]


def test_timestep_fractions_and_bad_requests():
    assert fd.timestep_fractions(3) == pytest.approx([1 / 6, 1 / 2, 5 / 6])
    assert fd.timestep_fractions(1) == [0.5]
    with pytest.raises(ValueError):
        fd.timestep_fractions(0)
    model = LinearModel({}, 1)
    for kwargs in ({"sources": []}, {"merges": []}, {"seeds": []}, {"sigmas": [0.0]}, {"sigmas": [math.inf]}):
        args = dict(sources=["A"], merges=["m"], seeds=[0], sigmas=[1.0]) | kwargs
        with pytest.raises(ValueError):
            fd.measure(model, latent_shape=SHAPE, **args)


def test_text_names_the_cost_and_the_formula():
    rng = np.random.default_rng(7)
    deltas = random_deltas(rng, 2, lambda s: [s[0] + s[1]])
    rep = fd.measure(LinearModel(deltas, 2), ["A", "B"], ["sum"], [0, 1], [1.0, 2.0, 3.0], SHAPE,
                     weights=[1.0, 1.0], prompts=["a", "b"])
    text = rep.text()
    assert "36 denoiser evaluations" in text and "F = " in text
    cols, rows = rep.table()
    assert cols[:3] == ["source", "weight", "effect"] and [r[0] for r in rows] == ["A", "B"]


def test_trigger_prompt_from_metadata():
    tags = {"set a": {"falcon": 10, "hair bow": 4, "smile": 7}, "set b": {"hair bow": 5, "blush": 1}}
    assert trigger_prompt({"ss_tag_frequency": json.dumps(tags)}, top=3) == "falcon, hair bow, smile"
    assert trigger_prompt({"modelspec.trigger_phrase": "sks dog", "ss_tag_frequency": json.dumps(tags)}) == "sks dog"
    assert trigger_prompt({"ss_tag_frequency": "not json"}) is None and trigger_prompt({}) is None
    assert prompt_for("  my prompt ", {}) == ("my prompt", "given")
    assert prompt_for("", {"modelspec.trigger_phrase": "x"}) == ("x", "trigger words")
    assert prompt_for("", None) == (GENERIC_PROMPT, "generic")


def test_trigger_prompt_of_a_real_kohya_file(real_loras_dir):
    from core.formats import load_lora
    lora = load_lora(str(real_loras_dir / "lycoris__smart_falcon_4_lokr.safetensors"))
    prompt, where = prompt_for("", lora.metadata)
    assert where == "trigger words" and prompt.startswith("smart falcon")
