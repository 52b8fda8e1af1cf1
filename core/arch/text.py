"""Text-encoder tables shared by DiT families (CLIP comes from core.sdarch)."""
from __future__ import annotations


def t5_encoder(arch, prefix: str, label: str, comfy_name: str = "t5xxl", blocks: int = 24,
               d_model: int = 4096, inner: int = 4096, ff: int = 10240):
    """T5 v1.1 encoder (gated GELU FFN): what kohya writes as ``lora_te3_encoder_block_…``
    and ComfyUI keeps under ``t5xxl.transformer.encoder.block…``."""
    for i in range(blocks):
        base = f"encoder.block.{i}"
        subs = [(f"layer.0.SelfAttention.{p}", (inner, d_model) if p != "o" else (d_model, inner), "attn")
                for p in ("q", "k", "v", "o")]
        subs += [("layer.1.DenseReluDense.wi_0", (ff, d_model), "mlp"),
                 ("layer.1.DenseReluDense.wi_1", (ff, d_model), "mlp"),
                 ("layer.1.DenseReluDense.wo", (d_model, ff), "mlp")]
        for sub, shape, kind in subs:
            path = f"{base}.{sub}"
            arch.add(prefix + path.replace(".", "_"), shape, f"{label} {kind}", path,
                     f"{comfy_name}.transformer.{path}")


def llama_encoder(arch, prefix: str, label: str, comfy_name: str, layers: int, width: int, inter: int,
                  heads: int, kv_heads: int, head_dim: int = 128):
    """A Llama-style decoder used as text encoder (Qwen2.5-VL-7B for Qwen-Image,
    Qwen3-4B for Z-Image), as ComfyUI holds it: ``<comfy_name>.transformer.model.
    layers.N.…``. kohya's name drops ``model.`` as ComfyUI's single-encoder map
    does (``lora_te_layers_N_self_attn_q_proj``)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    for i in range(layers):
        base = f"layers.{i}"
        subs = [("self_attn.q_proj", (q, width), "attn"), ("self_attn.k_proj", (kv, width), "attn"),
                ("self_attn.v_proj", (kv, width), "attn"), ("self_attn.o_proj", (width, q), "attn"),
                ("mlp.gate_proj", (inter, width), "mlp"), ("mlp.up_proj", (inter, width), "mlp"),
                ("mlp.down_proj", (width, inter), "mlp")]
        for sub, shape, kind in subs:
            path = f"{base}.{sub}"
            arch.add(prefix + path.replace(".", "_"), shape, f"{label} {kind}", f"model.{path}",
                     f"{comfy_name}.transformer.model.{path}")


# Qwen3 size -> (width, MLP width); both 36 layers, 32 query / 8 key-value heads of 128
QWEN3 = {"4b": (2560, 9728), "8b": (4096, 12288)}


def qwen3_encoder(arch, size: str):
    """Qwen3-4B (Z-Image, Klein 4B) or Qwen3-8B (Klein 9B), the model's only
    text encoder: kohya ``lora_te_``, ComfyUI ``qwen3_<size>``."""
    width, inter = QWEN3[size]
    llama_encoder(arch, "lora_te_", "te", f"qwen3_{size}", layers=36, width=width, inter=inter, heads=32,
                  kv_heads=8)


def clip_l_g_t5(arch):
    """SD3's (and HiDream's) CLIP-L ``lora_te1_``, CLIP-G ``lora_te2_`` and T5-XXL
    ``lora_te3_``, as sd-scripts writes them and ComfyUI maps them."""
    from ..sdarch import _text_encoder

    for slot, clip, layers, width in (("te1", "clip_l", 12, 768), ("te2", "clip_g", 32, 1280)):
        _text_encoder(arch, f"lora_{slot}_", layers, width, 4 * width, slot, clip)
        # OneTrainer trains the text projection too (ComfyUI maps lora_te{1,2}_text_projection)
        arch.add(f"lora_{slot}_text_projection", (width, width), f"{slot} proj",
                 f"{clip}.transformer.text_projection")
    t5_encoder(arch, "lora_te3_", "te3")
