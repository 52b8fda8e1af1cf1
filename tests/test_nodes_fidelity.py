"""LoRA Merge Fidelity node without ComfyUI: its inputs, default weights and
prompts, and the tables it shows (the measurement itself needs ComfyUI: see
tests/integration/test_fidelity_comfy.py; the maths: tests/test_fidelity.py)."""
from __future__ import annotations

import json

import pytest

from tests.test_nodes_unit import NODE_CLASS_MAPPINGS, common, pack, random_lora

fidelity_node = pack("nodes.fidelity")
merging = pack("core.merge")
fd = pack("core.fidelity")
prompts = pack("core.prompts")


def test_inputs_sources_merges_and_cost():
    cls = NODE_CLASS_MAPPINGS["GrassmannLoRAMergeFidelity"]
    spec = cls.INPUT_TYPES()
    assert list(spec["required"])[:3] == ["model", "clip", "merged_1"]
    assert spec["required"]["seeds"][1]["default"] == 2 and spec["required"]["timesteps"][1]["default"] == 3
    merges = [k for k in spec["optional"] if k.startswith("merged_")]
    assert merges == [f"merged_{j}" for j in range(2, fidelity_node.MAX_MERGES + 1)]
    assert "denoiser evaluations" in cls.DESCRIPTION and "60" in cls.DESCRIPTION
    assert fd.forward_passes(2, 3, 2, 3) == 60
    assert cls.OUTPUT_NODE and cls.RETURN_TYPES == ("IMAGE", "STRING")


def _named(lora, name):
    lora.path = name
    return lora


def test_default_weights_come_from_the_merge_recipe():
    a = _named(random_lora("sd1", rank=2, seed=1), "a.safetensors")
    b = _named(random_lora("sd1", rank=2, seed=2), "b.safetensors")
    merged = merging.merge([a, b], [0.7, 0.3], method="linear").lora
    assert fidelity_node.recorded_weights(merged, [a, b]) == pytest.approx([0.7, 0.3])
    assert fidelity_node.recorded_weights(merged, [b, a]) == pytest.approx([0.3, 0.7])
    c = _named(random_lora("sd1", rank=2, seed=3), "c.safetensors")
    assert fidelity_node.recorded_weights(merged, [a, c]) == [0.5, 0.5]      # other sources: 1/N
    assert fidelity_node.recorded_weights(a, [a, b, c]) == pytest.approx([1 / 3] * 3)   # no recipe


def test_prompts_per_source_with_trigger_words_and_generic():
    a = _named(random_lora("sd1", rank=2, seed=1), "a.safetensors")
    b = _named(random_lora("sd1", rank=2, seed=2), "b.safetensors")
    b.metadata = {"ss_tag_frequency": json.dumps({"x": {"sks style": 9, "red": 2}})}
    c = _named(random_lora("sd1", rank=2, seed=3), "c.safetensors")
    texts, origins = fidelity_node.source_prompts("a cat\n\n", [a, b, c])
    assert texts == ["a cat", "sks style, red", prompts.GENERIC_PROMPT]
    assert origins == ["given", "trigger words", "generic"]


def test_tables_carry_the_report():
    report = fd.FidelityReport(["a", "b"], ["karcher", "linear"], [0.5, 0.5], ["p", "q"], [0, 1], [0.5],
                               [1.0], [[fd.Cell([0.2, 0.4], [0.9, 0.7]), fd.Cell([0.0, 0.0], [1.0, 1.0])],
                                       [fd.Cell([None, None], [None, None]), fd.Cell([None, None], [None, None])]],
                               [[0.01, 0.02], [0.0, 0.0]], 16, ["b: source has no effect"])
    main, extra = fidelity_node.fidelity_tables(report)
    assert main["columns"] == ["source", "weight", "effect", "karcher: F / cos", "linear: F / cos"]
    assert main["rows"][0][3:] == ["0.300 / 0.800", "0.000 / 1.000"]
    assert main["rows"][1][3] == fd.NO_SOURCE_EFFECT
    assert "16 denoiser evaluations" in main["note"]
    assert ["note", "b: source has no effect"] in extra["rows"]
