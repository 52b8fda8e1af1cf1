"""Compare: base, each source and each merge rendered with one seed and one set of
txt2img settings through the WebUI's own ``processing.process_images``, then one
labelled grid with the per-tile differences (core.compare_grid)."""
from __future__ import annotations

import numpy as np

from .service import Interrupted, RequestError, check_body, resolve

COMPARE_FIELDS = ("loras", "prompt", "negative_prompt", "seed", "steps", "width", "height", "cfg_scale",
                  "sampler_name", "weight")
DEFAULTS = {"prompt": "", "negative_prompt": "", "seed": 1234, "steps": 20, "width": 512, "height": 512,
            "cfg_scale": 7.0, "sampler_name": "Euler a", "weight": 1.0}


def settings(body: dict) -> dict:
    """The render settings of a compare request, checked (seed -1 is not fixed: refused)."""
    check_body(body, COMPARE_FIELDS)
    out = {k: body.get(k, v) if body.get(k) is not None else v for k, v in DEFAULTS.items()}
    for key in ("seed", "steps", "width", "height"):
        if isinstance(out[key], float) and out[key].is_integer():
            out[key] = int(out[key])
        if not isinstance(out[key], int) or isinstance(out[key], bool):
            raise RequestError(f"'{key}' must be an integer, got {out[key]!r}")
    if out["seed"] < 0:
        raise RequestError("'seed' must be fixed (0 or more) so every tile gets the same noise")
    if out["steps"] < 1 or not 8 <= out["width"] <= 4096 or not 8 <= out["height"] <= 4096:
        raise RequestError("'steps' must be ≥ 1 and 'width'/'height' between 8 and 4096")
    for key in ("cfg_scale", "weight"):
        if not isinstance(out[key], (int, float)) or isinstance(out[key], bool):
            raise RequestError(f"'{key}' must be a number, got {out[key]!r}")
    return out


def variants(names: list[str], prompt: str, weight: float) -> list[tuple[str, str]]:
    """(label, prompt): the base prompt, then the prompt with each LoRA's tag appended."""
    out = [("base", prompt)]
    for name in names:
        tag = f"<lora:{name}:{weight:g}>"
        out.append((name, f"{prompt}, {tag}" if prompt.strip() else tag))
    return out


def images_to_batch(images) -> "torch.Tensor":
    """PIL images (one size) → a (B, H, W, 3) float batch in [0, 1]."""
    import torch

    arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images]
    return torch.from_numpy(np.stack(arrays))


def render(body: dict, progress=None) -> tuple[dict, object]:
    """Render every variant (under the WebUI's queue lock, interruptible between images)
    and build the grid. Returns (answer, CompareResult)."""
    from modules import processing, shared
    from modules.call_queue import queue_lock

    from ..core.compare_grid import compare_grid

    s = settings(body)
    names = body.get("loras") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RequestError("'loras' must list LoRA names")
    for name in names:
        resolve(name)            # unknown names fail here, not as a silent "couldn't find network"
    todo = variants(names, s["prompt"], float(s["weight"]))
    images = []
    with queue_lock:
        shared.state.begin(job="grassmann_lora_compare")
        shared.state.job_count = len(todo)
        try:
            for k, (label, prompt) in enumerate(todo):
                if shared.state.interrupted:
                    raise Interrupted("interrupted")
                if progress is not None:
                    progress(k, len(todo))
                p = processing.StableDiffusionProcessingTxt2Img(
                    sd_model=shared.sd_model, prompt=prompt, negative_prompt=s["negative_prompt"],
                    seed=s["seed"], subseed=-1, subseed_strength=0, steps=s["steps"], width=s["width"],
                    height=s["height"], cfg_scale=float(s["cfg_scale"]), sampler_name=s["sampler_name"],
                    batch_size=1, n_iter=1, do_not_save_samples=True, do_not_save_grid=True)
                try:
                    images.append(processing.process_images(p).images[0])
                finally:
                    p.close()
                shared.state.job_no = k + 1
        finally:
            shared.state.end()
    labels = [label for label, _ in todo]
    result = compare_grid(images_to_batch(images), labels)
    answer = {"labels": labels, "prompts": [prompt for _, prompt in todo], "settings": s,
              "mad": result.mad, "ssim": result.ssim}
    return answer, result
