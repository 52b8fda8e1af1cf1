"""Build a random-weight checkpoint with the full Stable Diffusion 1.5 architecture.

No pretrained weights can be downloaded here, so the integration tests use a
checkpoint built from ComfyUI's own model classes with seeded random weights:

* UNet: ``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel`` with the
  SD15 config (``comfy/model_detection.py`` -> ``SD15`` dict, plus
  ``comfy.supported_models.SD15.unet_extra_config``): 320 channels,
  channel_mult [1, 2, 4, 4], 2 res blocks a level, context 768, 8 heads.
* Text encoder: ``comfy.sd1_clip.SD1ClipModel`` (CLIP ViT-L/14 text model).
* VAE: ``comfy.ldm.models.autoencoder.AutoencoderKL`` with the SD1 ddconfig
  (same dict as ``comfy/sd.py`` uses for SD1.x VAEs).

Keys are mapped with ``comfy.supported_models.SD15.process_*_state_dict_for_saving``
(so they come out as ``model.diffusion_model.*``, ``cond_stage_model.transformer.*``
and ``first_stage_model.*``) and saved as fp16 safetensors (about 2.0 GiB).

ComfyUI's ops (``comfy.ops.disable_weight_init``) turn ``reset_parameters`` into a
no-op, so every layer is re-initialised here with torch's own ``reset_parameters``
after ``torch.manual_seed(seed)``: the result is deterministic for a given seed and
torch version.  A few layers that the real model zero-inits (the UNet ``out`` conv,
and every ``proj_out``/``skip`` of a residual branch) keep torch's default init but
are scaled down by ``--residual-scale`` so activations stay finite in fp16.

Run it with ComfyUI's python (its venv has the torch it needs)::

    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/venv/bin/python tests/integration/make_sd15_checkpoint.py [OUT] [--verify]

``--levels N`` (1 to 3) builds a reduced-depth SD1.5 instead: the UNet's first N
resolution levels only (320, 640, 1280 channels; 2 res blocks and a transformer
block each, the deepest level also in the middle block), with the same blocks, the
same CLIP and VAE. ComfyUI detects it as SD15 and maps LoRA keys by its own
structure; a UNet call costs a fraction of the full one (2 levels: about 1/10 of
the weights). For tests whose LoRAs touch only modules it has.

OUT defaults to ``~/.cache/grassmann_lora/sd15_random.safetensors`` (with
``--levels N``: ``sd15_random_<N>levels.safetensors``); an existing file is kept
unless ``--force`` is given.  ``--verify`` loads the file back through
``nodes.CheckpointLoaderSimple`` and checks that ComfyUI detects it as SD15.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_OUT = os.path.join(os.path.expanduser("~"), ".cache", "grassmann_lora", "sd15_random.safetensors")

# comfy/model_detection.py (SD15 dict in unet_config_from_diffusers_unet) with
# comfy.supported_models.SD15.unet_extra_config (num_heads 8, num_head_channels -1).
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def unet_config(levels: int | None = None) -> dict:
    """SD15's UNet config, or the reduced-depth one of its first ``levels`` levels
    (every level with a transformer block: SD15's deepest level, the one without, is cut)."""
    if levels is None:
        return dict(SD15_UNET_CONFIG)
    if not 1 <= levels <= 3:
        raise SystemExit(f"--levels takes 1 to 3 (SD1.5 has 4 levels), not {levels}")
    # transformer_depth_output is read from its end (ComfyUI pops it): deepest level first there
    return dict(SD15_UNET_CONFIG, num_res_blocks=[2] * levels, channel_mult=[1, 2, 4][:levels],
                transformer_depth=[1] * (2 * levels), transformer_depth_output=[1] * (3 * levels))


def default_out(levels: int | None = None) -> str:
    return DEFAULT_OUT if levels is None else DEFAULT_OUT.replace(".safetensors", f"_{levels}levels.safetensors")


# comfy/sd.py, "default SD1.x/SD2.x VAE parameters"
SD1_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}


def comfyui_path() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("COMFYUI_PATH", "~/ComfyUI")))


def _import_comfy():
    root = comfyui_path()
    if not os.path.isfile(os.path.join(root, "comfy", "sd.py")):
        raise SystemExit(f"ComfyUI not found at COMFYUI_PATH={root!r}")
    if root not in sys.path:
        sys.path.insert(0, root)
    os.chdir(root)  # a few ComfyUI modules resolve files relative to the cwd
    import comfy.options  # noqa: F401  (argument parsing stays off: parse_args([]))
    from comfy.cli_args import args
    args.cpu = True  # never touch an accelerator here


def _reset_all(module, seed: int) -> int:
    """Call torch's reset_parameters on every layer (ComfyUI's ops make it a no-op)."""
    import torch

    torch.manual_seed(seed)
    count = 0
    for m in module.modules():
        # ComfyUI's lazy-init path may leave weight=None (aimdo); allocate it.
        if isinstance(m, torch.nn.Linear) and getattr(m, "weight", 0) is None:
            m.weight = torch.nn.Parameter(torch.empty(m.out_features, m.in_features))
            if getattr(m, "comfy_need_lazy_init_bias", False):
                m.bias = torch.nn.Parameter(torch.empty(m.out_features))
        for cls in type(m).__mro__:
            fn = cls.__dict__.get("reset_parameters")
            if fn is not None and cls.__module__.startswith("torch.nn"):
                with torch.no_grad():
                    fn(m)
                count += 1
                break
    return count


def _scale_residual_outputs(unet, vae, scale: float) -> None:
    """Shrink the layers the real model zero-inits, so a deep random net stays finite."""
    import torch

    with torch.no_grad():
        for name, p in unet.named_parameters():
            if (".proj_out." in name or name.startswith("out.") or ".out_layers.3." in name
                    or ".attn1.to_out.0." in name or ".attn2.to_out.0." in name or ".ff.net.2." in name):
                p.mul_(scale)
        for name, p in vae.named_parameters():
            if ".conv2." in name or ".proj_out." in name:
                p.mul_(scale)


def _check_uninitialised(module, what: str) -> None:
    import torch

    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            raise RuntimeError(f"{what}: parameter {name} is not finite after init")


def build_state_dict(seed: int, residual_scale: float, levels: int | None = None):
    import torch
    import comfy.supported_models
    import comfy.sd1_clip
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = unet_config(levels)
    unet = UNetModel(**config, dtype=torch.float32, device="cpu")
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    vae = AutoencoderKL(ddconfig=dict(SD1_VAE_DDCONFIG), embed_dim=4)

    n = _reset_all(unet, seed) + _reset_all(clip, seed + 1) + _reset_all(vae, seed + 2)
    # CLIP's token/position embeddings init N(0,1); the real ones are ~N(0, 0.02)-ish.
    with torch.no_grad():
        for name, p in clip.named_parameters():
            if "embedding" in name:
                p.mul_(0.02)
    _scale_residual_outputs(unet, vae, residual_scale)
    for mod, what in ((unet, "unet"), (clip, "clip"), (vae, "vae")):
        _check_uninitialised(mod, what)

    cfg = comfy.supported_models.SD15(config)
    sd = {}
    sd.update(cfg.process_unet_state_dict_for_saving(unet.state_dict()))
    sd.update(cfg.process_clip_state_dict_for_saving(clip.state_dict()))
    sd.update(cfg.process_vae_state_dict_for_saving(vae.state_dict()))
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        out[k] = v.detach().to(torch.float16).contiguous()
    return out, n


def verify(path: str) -> str:
    """Load through CheckpointLoaderSimple and return the detected model config name."""
    import folder_paths
    import nodes

    folder_paths.add_model_folder_path("checkpoints", os.path.dirname(path), is_default=True)
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(path))
    name = type(model.model.model_config).__name__
    if name != "SD15":
        raise RuntimeError(f"ComfyUI detected {name}, expected SD15")
    if clip is None or vae is None:
        raise RuntimeError("CLIP or VAE missing from the loaded checkpoint")
    return name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help=f"default {DEFAULT_OUT}, or its _<N>levels twin")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--residual-scale", type=float, default=0.1)
    ap.add_argument("--levels", type=int, default=None, help="reduced depth: the first N UNet levels (1-3)")
    ap.add_argument("--force", action="store_true", help="rebuild even if OUT exists")
    ap.add_argument("--verify", action="store_true", help="load it back with CheckpointLoaderSimple")
    a = ap.parse_args(argv)
    out = os.path.abspath(os.path.expanduser(a.out or default_out(a.levels)))

    _import_comfy()
    if os.path.exists(out) and not a.force:
        print(f"exists, not rebuilt: {out}")
    else:
        import torch
        from safetensors.torch import save_file

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        t0 = time.time()
        sd, n = build_state_dict(a.seed, a.residual_scale, a.levels)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = out + ".part"
        # one metadata key only: safetensors writes a multi-key dict in random order,
        # and byte-identical files for the same seed are worth more than a label
        save_file(sd, tmp, metadata={"format": "pt"})
        os.replace(tmp, out)
        size = os.path.getsize(out) / 2**30
        print(f"built {out}: {len(sd)} tensors, {size:.2f} GiB, {n} layers reset, {time.time() - t0:.1f}s")
    if a.verify:
        t0 = time.time()
        print(f"CheckpointLoaderSimple detected: {verify(out)} ({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
