"""Smoke test against a real ComfyUI: the pack loads and a kohya SD1.5 LoRA runs end to end.

Needs a ComfyUI laid out at ``COMFYUI_PATH`` (default ``~/ComfyUI``) with its own
``venv/``; skipped otherwise.  The pytest process only talks HTTP to the server
(conftest.py's ``comfy_server``, shared by the session); ComfyUI's python builds
the random full-size SD1.5 checkpoint (cached in ``~/.cache/grassmann_lora/``,
about 50 s the first time) and runs the graph.
"""

from __future__ import annotations

import os
import time

import pytest

import comfy_harness as ch  # this folder is on sys.path (conftest.py)
import example_graphs as eg

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

RANK = 4


def kohya_sd15_lora() -> dict:
    """A small kohya-named SD1.5 LoRA with real shapes (numpy arrays, fp16)."""
    import numpy as np

    rng = np.random.default_rng(0)
    sd = {}

    def add(name, down_shape, up_shape, alpha=float(RANK)):
        sd[f"{name}.lora_down.weight"] = (rng.standard_normal(down_shape) * 0.05).astype(np.float16)
        sd[f"{name}.lora_up.weight"] = (rng.standard_normal(up_shape) * 0.05).astype(np.float16)
        sd[f"{name}.alpha"] = np.array(alpha, dtype=np.float16)

    blk = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"
    for proj in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0"):
        add(f"{blk}_{proj}", (RANK, 320), (320, RANK))
    add(f"{blk}_attn2_to_k", (RANK, 768), (320, RANK))            # cross-attn: 768 -> 320
    add("lora_unet_down_blocks_0_resnets_0_conv1", (RANK, 320, 3, 3), (320, RANK, 1, 1))  # LoCon
    add("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (RANK, 768), (768, RANK))
    return sd


@pytest.fixture(scope="module")
def comfy(comfy_server):
    return comfy_server


def test_server_starts_with_pack_linked(comfy):
    info = comfy.object_info()
    for node in ("CheckpointLoaderSimple", "LoraLoader", "KSampler", "SaveImage"):
        assert node in info
    assert (comfy.custom_nodes_dir / ch.PACK_NAME).is_symlink()
    status = comfy.pack_import_status()
    errors = comfy.pack_errors()
    pack_nodes = comfy.pack_nodes()
    print(f"[comfy] pack import: {status}; pack nodes: {pack_nodes}")
    for e in errors:
        print("[comfy] pack error:\n" + e)
    assert status != "absent", "ComfyUI did not try to import the linked pack:\n" + comfy.log_tail()
    if os.environ.get("GRASSMANN_REQUIRE_PACK") == "1":  # strict mode once the pack is complete
        assert status == "imported" and not errors and pack_nodes, "\n\n".join(errors) or comfy.log_tail()


def test_kohya_lora_txt2img(comfy):
    from safetensors.numpy import save_file

    lora_path = comfy.loras_dir / "grassmann_smoke_kohya.safetensors"
    save_file(kohya_sd15_lora(), str(lora_path))
    assert "grassmann_smoke_kohya.safetensors" in \
        comfy.object_info("LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]

    # one sampling step runs the whole path (encode, patched UNet, decode)
    graph = ch.txt2img_graph(eg.CHECKPOINT, "grassmann_smoke_kohya.safetensors", steps=1, seed=1234)
    log_before = len(comfy.log_text())
    t0 = time.monotonic()
    entry = comfy.run(graph, timeout=900)
    dt = time.monotonic() - t0
    print(f"[comfy] SD1.5 64x64 1-step prompt with LoRA: {dt:.1f}s")

    images = comfy.output_images(entry)
    assert len(images) == 1 and images[0].is_file(), entry.get("outputs")
    arr = ch.load_image(images[0])
    assert arr.shape == (64, 64, 3)
    assert float(arr.std()) > 0.0, "decoded image is constant (NaN or dead model?)"

    log = comfy.log_text()[log_before:]
    assert "lora key not loaded" not in log, log
    assert "NOT LOADED" not in log, log
    assert "WARNING SHAPE MISMATCH" not in log and "ERROR lora" not in log, log
