"""Runs INSIDE ComfyUI's venv (cwd = COMFYUI_PATH): ComfyUI's own LoRA key maps
and patching for DiT models built at full depth on the meta device.

    python comfy_keymap_probe.py job.json out_dir

job.json: {"configs": ["flux/dev", ...],
           "files": [{"config": "flux/dev", "path": "x.safetensors", "check": [module names], "cols": 8}]}
Writes out_dir/result.json: per config the diffusion model's and text
encoders' weight shapes and ``model_lora_keys_unet`` / ``model_lora_keys_clip``;
per file the keys ComfyUI did not load, and out_dir/file<i>.safetensors with
ComfyUI's ΔW (``calculate_weight`` on a zero weight, first ``cols`` columns)
for each checked module (kohya name). Families add their config to CONFIGS (family/variant
as in core.arch), mirroring what ``comfy/model_detection.py`` derives.
"""
import json
import logging
import os
import sys

sys.path.insert(0, os.getcwd())
JOB, OUT_DIR = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI parses the command line on import
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import torch  # noqa: E402

import comfy.lora  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.utils  # noqa: E402

_FLUX = dict(image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=768,
             context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19,
             depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, qkv_bias=True,
             guidance_embed=True, txt_ids_dims=[], yak_mlp=False)
_FLUX2 = dict(image_model="flux2", axes_dim=[32, 32, 32, 32], mlp_ratio=3.0, theta=2000, out_channels=128,
              global_modulation=True, mlp_silu_act=True, qkv_bias=False, ops_bias=False,
              default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3], patch_size=1,
              in_channels=128, vec_in_dim=None, guidance_embed=False, yak_mlp=False)


def _clip(name):
    """The text-encoder model ComfyUI's clip_target builds for the family."""
    def build():
        meta = torch.device("meta")
        if name == "flux":
            from comfy.text_encoders.flux import FluxClipModel
            return FluxClipModel(device=meta)
        if name == "t5":
            from comfy.text_encoders.pixart_t5 import pixart_te
            return pixart_te()(device=meta)
        if name == "sd3":
            from comfy.text_encoders.sd3_clip import sd3_clip
            return sd3_clip(clip_l=True, clip_g=True, t5=True)(device=meta)
        if name == "qwen_image":
            from comfy.text_encoders.qwen_image import te
            return te()(device=meta)
        if name in ("qwen3_4b", "qwen3_8b"):  # Flux.2 Klein
            from comfy.text_encoders.flux import klein_te
            return klein_te(model_type=name)(device=meta)
        if name == "z_image":
            from comfy.text_encoders.z_image import te
            return te()(device=meta)
        if name == "wan":
            from comfy.text_encoders.wan import te
            return te()(device=meta)
        if name == "hidream":
            from comfy.text_encoders.hidream import hidream_clip
            return hidream_clip(clip_l=True, clip_g=True, t5=True, llama=True)(device=meta)
        return None
    return build


def _sd3(depth, patches, rms, x_attn2):
    return dict(in_channels=16, patch_size=2, out_channels=16, depth=depth, input_size=None, adm_in_channels=2048,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 4096, "out_features": 64 * depth}},
                num_patches=patches * patches, pos_embed_max_size=patches, pos_embed_scaling_factor=None,
                x_block_self_attn_layers=list(x_attn2), **({"qk_norm": "rms"} if rms else {}))


def _wan(dim, heads, ffn, layers, in_dim=16, out_dim=16, model_type="t2v"):
    return dict(image_model="wan2.1", dim=dim, out_dim=out_dim, num_heads=heads, ffn_dim=ffn, num_layers=layers,
                patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True,
                eps=1e-6, in_dim=in_dim, model_type=model_type)


CONFIGS = {
    "flux/dev": (_FLUX, _clip("flux")),
    "flux/schnell": (dict(_FLUX, guidance_embed=False), _clip("flux")),
    "flux/chroma": ({**{k: v for k, v in _FLUX.items() if k not in ("guidance_embed", "yak_mlp")},
                     "image_model": "chroma", "in_channels": 64, "out_channels": 64, "in_dim": 64,
                     "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5, "vec_in_dim": None}, _clip("t5")),
    "flux2/klein-4b": (dict(_FLUX2, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20,
                            context_in_dim=7680), _clip("qwen3_4b")),
    "flux2/klein-9b": (dict(_FLUX2, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24,
                            context_in_dim=12288), _clip("qwen3_8b")),
    # what comfy/model_detection.py derives for each checkpoint
    "sd3/large": (_sd3(38, 192, True, ()), _clip("sd3")),
    "sd3/3.5-medium": (_sd3(24, 384, True, range(13)), _clip("sd3")),
    "sd3/medium": (_sd3(24, 192, False, ()), _clip("sd3")),
    "qwen_image/base": (dict(image_model="qwen_image", in_channels=64, num_layers=60), _clip("qwen_image")),
    "z_image/base": (dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560,
                          n_layers=30, qk_norm=True, n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48],
                          axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                          z_image_modulation=True, time_scale=1000.0), _clip("z_image")),
    "wan/14b": (_wan(5120, 40, 13824, 40), _clip("wan")),
    "wan/1.3b": (_wan(1536, 12, 8960, 30), _clip("wan")),
    "wan/5b": (_wan(3072, 24, 14336, 30, in_dim=48, out_dim=48), _clip("wan")),
    "wan/14b-i2v": (_wan(5120, 40, 13824, 40, in_dim=36, model_type="i2v"), _clip("wan")),
    "wan/1.3b-i2v": (_wan(1536, 12, 8960, 30, in_dim=36, model_type="i2v"), _clip("wan")),
    "hidream/i1": (dict(image_model="hidream", attention_head_dim=128, axes_dims_rope=[64, 32, 32],
                        caption_channels=[4096, 4096], max_resolution=[128, 128], in_channels=16,
                        llama_layers=list(range(32)) + [31] * 16, num_attention_heads=20, num_routed_experts=4,
                        num_activated_experts=2, num_layers=16, num_single_layers=32, out_channels=16,
                        patch_size=2, text_emb_dim=2048), _clip("hidream")),
}


def _target(v):
    return v if isinstance(v, str) else [v[0], list(v[1]) if v[1] is not None else None,
                                         getattr(v[2], "__name__", None) if len(v) > 2 else None]


def _weights(sd, prefix=""):
    return {k: list(t.shape) for k, t in sd.items() if k.endswith(".weight") and t.dim() >= 2}


def probe_config(name):
    unet_config, clip_builder = CONFIGS[name]
    model_config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    if model_config is None:
        raise SystemExit(f"ComfyUI has no model for config {name}")
    model = model_config.get_model({}, "", device=torch.device("meta"))
    out = {"model": type(model).__name__, "unet_weights": _weights(model.state_dict()),
           "unet_map": {k: _target(v) for k, v in comfy.lora.model_lora_keys_unet(model, {}).items()}}
    clip = clip_builder()
    if clip is not None:
        out["clip_weights"] = _weights(clip.state_dict())
        out["clip_map"] = {k: _target(v) for k, v in comfy.lora.model_lora_keys_clip(clip, {}).items()}
    return model, clip, out


class _Missing(logging.Handler):
    def __init__(self):
        super().__init__()
        self.keys = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("lora key not loaded"):
            self.keys.append(msg.split(":", 1)[1].strip())


def probe_file(job, model, clip, out_dir, i):
    from safetensors.torch import save_file

    key_map = comfy.lora.model_lora_keys_unet(model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip, key_map)
    lora = comfy.utils.load_torch_file(job["path"], safe_load=True)
    handler = _Missing()
    logging.getLogger().addHandler(handler)
    try:
        patch_dict = comfy.lora.load_lora(lora, key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    # what ModelPatcher.add_patches does with the keys: (key, offset, function)
    patches = {}
    for k, v in patch_dict.items():
        key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
        patches.setdefault(key, []).append((1.0, v, 1.0, offset, function))
    shapes = dict(model.state_dict().items())
    if clip is not None:
        shapes.update(clip.state_dict())
    deltas = {}
    for name in job["check"]:  # kohya module names, resolved through ComfyUI's own map
        if name not in key_map:
            continue  # the test reports unmapped names
        target = key_map[name] if isinstance(key_map[name], str) else key_map[name][0]
        if target not in patches:
            continue  # reported through not_loaded / the missing ΔW
        zero = torch.zeros(shapes[target].shape, dtype=torch.float32)
        w = comfy.lora.calculate_weight(patches[target], zero, target)
        deltas[name] = w.reshape(w.shape[0], -1)[:, :job.get("cols", 8)].contiguous()
    save_file(deltas, os.path.join(out_dir, f"file{i}.safetensors"))
    return {"not_loaded": handler.keys, "patched": sorted(patches)}


def main():
    job = json.load(open(JOB))
    out_dir = OUT_DIR
    result = {"configs": {}, "files": []}
    built = {}
    with torch.no_grad():
        for name in job["configs"]:
            if name not in CONFIGS:
                result["configs"][name] = {"missing": f"no ComfyUI config for {name} in {__file__}"}
                continue
            model, clip, info = probe_config(name)
            built[name] = (model, clip)
            result["configs"][name] = info
        for i, f in enumerate(job.get("files", [])):
            if f["config"] not in built:  # the test skips configs the probe lacks
                result["files"].append({"not_loaded": [], "patched": []})
                continue
            model, clip = built[f["config"]]
            result["files"].append(probe_file(f, model, clip, out_dir, i))
    with open(os.path.join(out_dir, "result.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
