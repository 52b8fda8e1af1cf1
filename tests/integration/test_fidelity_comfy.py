"""LoRA Merge Fidelity inside a real ComfyUI (issue 15).

Needs ComfyUI at ``COMFYUI_PATH`` with its venv (skipped otherwise). The session's
server (conftest.py) with a reduced-depth SD1.5 of random weights (the first two
UNet levels, same blocks, the same CLIP and VAE: make_sd15_checkpoint.py --levels
2): the synthetic LoRAs touch two of its modules, and its UNet calls cost a
fraction of the full model's. 64×64 latents and one or two seed × timestep
samples per node to stay small. The node's JSON output comes back through a
test-only node (comfy_test_nodes.py). Run with ``-s`` to see the measured tables.
The node on real SD1.5 LoRAs with four merges, on the full architecture, is
checked in test_nodes_comfy.py (workflow 4).
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

import comfy_harness as ch  # this folder is on sys.path (conftest.py)

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

SIZE = 64
LEVELS = 2                               # the synthetic LoRAs' reduced-depth SD1.5
SMALL_CHECKPOINT = f"random_sd15_{LEVELS}levels_test.safetensors"
PROMPT_A, PROMPT_B = "a red fox in the snow", "a city street at night, neon signs"
RANK = 4
# Two synthetic kohya LoRAs on disjoint UNet modules (A first, B last: both at 320
# channels) and one whose factors are all zero (an "empty merge": it patches but
# changes nothing).
A_MODULES = [f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_{p}"
             for p in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0")]
B_MODULES = [f"lora_unet_up_blocks_{LEVELS - 1}_attentions_2_transformer_blocks_0_{p}"
             for p in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0")]
SYN_A, SYN_B, SYN_ZERO = "fidelity_a.safetensors", "fidelity_b.safetensors", "fidelity_zero.safetensors"


def kohya_lora(modules: list[str], seed: int, scale: float) -> dict:
    rng = np.random.default_rng(seed)
    sd = {}
    for name in modules:
        sd[f"{name}.lora_down.weight"] = (rng.standard_normal((RANK, 320)) * scale).astype(np.float32)
        sd[f"{name}.lora_up.weight"] = (rng.standard_normal((320, RANK)) * scale).astype(np.float32)
        sd[f"{name}.alpha"] = np.array(float(RANK), dtype=np.float32)
    return sd


@pytest.fixture(scope="module")
def comfy(comfy_server):
    from safetensors.numpy import save_file

    srv = comfy_server
    srv.add_checkpoint(ch.build_checkpoint(levels=LEVELS), SMALL_CHECKPOINT)
    save_file(kohya_lora(A_MODULES, 1, 0.1), str(srv.loras_dir / SYN_A))
    save_file(kohya_lora(B_MODULES, 2, 0.1), str(srv.loras_dir / SYN_B))
    zero = kohya_lora(A_MODULES, 3, 0.1)
    zero.update({k: np.zeros_like(v) for k, v in zero.items() if k.endswith("lora_up.weight")})
    save_file(zero, str(srv.loras_dir / SYN_ZERO))
    return srv


class Graph:
    """A small API-graph builder: checkpoint, loaders, merges, fidelity nodes."""

    def __init__(self):
        self.g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SMALL_CHECKPOINT}}}
        self.loaded: dict[str, str] = {}

    def _add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self.g) + 1)
        self.g[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    def lora(self, name: str) -> list:
        if name not in self.loaded:
            self.loaded[name] = self._add("GrassmannLoRALoad", lora_name=name)
        return [self.loaded[name], 0]

    def merge(self, method: str, names: list[str], weights: str, dtype: str = "fp32") -> list:
        node = self._add("GrassmannLoRAKarcherMerge", model=["1", 0], clip=["1", 1], method=method, rank=0,
                         weights=weights, dtype=dtype, strength_model=1.0, strength_clip=1.0,
                         ties_density=0.5, dare_drop=0.5, dare_seed=0,
                         **{f"lora_{k}": self.lora(n) for k, n in enumerate(names, 1)})
        return [node, 2]

    def fidelity(self, sources: list[str], merges: list[list], weights: str, prompts: list[str],
                 seed: int = 0, seeds: int = 1, timesteps: int = 1) -> tuple[str, str]:
        extra = {f"merged_{j}": m for j, m in enumerate(merges[1:], 2)}
        node = self._add("GrassmannLoRAMergeFidelity", model=["1", 0], clip=["1", 1], merged_1=merges[0],
                         prompts="\n".join(prompts), weights=weights, seed=seed, seeds=seeds,
                         timesteps=timesteps, width=SIZE, height=SIZE, **extra,
                         **{f"lora_{k}": self.lora(n) for k, n in enumerate(sources, 1)})
        show = self._add("GrassmannTestShowString", text=[node, 1])
        return node, show


def run(comfy, graph: Graph, label: str) -> dict:
    t0 = time.monotonic()
    entry = comfy.run(graph.g, timeout=900)
    print(f"\n[fidelity] {label}: {time.monotonic() - t0:.1f}s")
    return entry


def report(comfy, entry, show: str) -> dict:
    return json.loads(comfy.node_ui(entry, show)["string"][0])


def table_text(comfy, entry, node: str) -> str:
    return comfy.node_ui(entry, node)["text"][0]


def test_self_merge_zero_and_empty_merge_one(comfy):
    """A merge equal to source A gives F_A = 0, an empty merge F_A = 1 (cos
    undefined); two seeds give two different samples."""
    g = Graph()
    node, show = g.fidelity([SYN_A], [g.merge("linear", [SYN_A, SYN_A], "0.5, 0.5"), g.lora(SYN_ZERO),
                                      g.lora(SYN_A)], "1", [PROMPT_A], seeds=2)
    entry = run(comfy, g, "self / empty merges (1 source, 3 merges, 2 seeds)")
    r = report(comfy, entry, show)
    print(table_text(comfy, entry, node))
    (f_self, f_zero, f_same), (c_self, c_zero, c_same) = r["F"][0], r["cos"][0]
    assert r["forward_passes"] == 1 * (2 + 3) * 2 * 1
    assert f_same == 0.0 and c_same == pytest.approx(1.0)              # the very same patch
    # A + A at 0.5 is ΔW_A again in exact arithmetic; ComfyUI keeps the fp16
    # checkpoint's dtype and rounds W + ΔW stochastically, so the two patched
    # models differ by fp16 rounding (measured F ≈ 1e-3 with this LoRA's effect)
    print(f"[fidelity] A merged with itself: F {f_self:.2e}, cos {c_self:.8f}")
    assert f_self < 3e-3 and c_self > 1 - 1e-5, (f_self, c_self)
    assert f_zero == pytest.approx(1.0, abs=1e-6) and c_zero is None
    assert all(f == pytest.approx(1.0, abs=1e-6) for f in r["F_samples"][0][1])
    effect = r["effect"][0]
    assert len(effect) == 2 and effect[0] != effect[1] and min(effect) > 1e-4
    assert r["status"] == [["ok", "ok", "ok"]]


def test_disjoint_linear_merge_symmetry_and_reproducibility(comfy):
    """Linear merge at weight 1 of A and B acting on disjoint modules. Both
    updates land in the model unchanged, so F_A is what B does under A's prompt,
    relative to what A does: ‖d_B(c_A)‖ / ‖d_A(c_A)‖ to first order (measured
    separately here). Swapping the source order gives the same F per source;
    the same seed gives the same numbers. (F is small for both only when
    neither source acts much under the other's prompt: disjoint modules alone
    do not make it small.)"""
    g = Graph()
    merged = g.merge("linear", [SYN_A, SYN_B], "1, 1")
    xa, xs = g.fidelity([SYN_A, SYN_B], [merged], "1, 1", [PROMPT_A, PROMPT_B])
    ya, ys = g.fidelity([SYN_B, SYN_A], [merged], "1, 1", [PROMPT_B, PROMPT_A])
    # each source under the *other* source's prompt: its leak into the other's F
    _, zs = g.fidelity([SYN_B, SYN_A], [merged], "1, 1", [PROMPT_A, PROMPT_B])
    entry = run(comfy, g, "disjoint merge (3 fidelity nodes)")
    x, y, z = (report(comfy, entry, s) for s in (xs, ys, zs))
    print(table_text(comfy, entry, xa))
    f_a, f_b = x["F"][0][0], x["F"][1][0]
    # symmetric under swapping the source order
    assert y["F"][1][0] == pytest.approx(f_a, rel=1e-6) and y["F"][0][0] == pytest.approx(f_b, rel=1e-6)
    assert y["cos"][1][0] == pytest.approx(x["cos"][0][0], rel=1e-6)
    # reproducible: the same seed in another node (its own patching and evaluation) gives the same numbers
    assert y["effect"] == x["effect"][::-1] and y["F_samples"][::-1] == x["F_samples"]
    # superposition: F_A ≈ ‖d_B(c_A)‖ / ‖d_A(c_A)‖ (the same ε_base under c_A cancels)
    leak_a = z["effect"][0][0] / x["effect"][0][0]
    leak_b = z["effect"][1][0] / x["effect"][1][0]
    print(f"[fidelity] disjoint linear merge: F_A {f_a:.4f} (leak of B under A's prompt {leak_a:.4f}), "
          f"F_B {f_b:.4f} (leak of A under B's prompt {leak_b:.4f}); cos {x['cos'][0][0]:.4f}, "
          f"{x['cos'][1][0]:.4f}")
    assert f_a == pytest.approx(leak_a, rel=0.05) and f_b == pytest.approx(leak_b, rel=0.05)
