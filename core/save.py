"""Writing LoRAs: kohya-named .safetensors, atomic, never clobbering, never
escaping the folder it was asked to write into."""
from __future__ import annotations

import json
import os
import tempfile

import torch

from .errors import LoraError
from .lora import LoraFile

FILE_MODE = 0o644
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def safe_output_path(folder: str, filename: str) -> str:
    """Join folder and a user-given file name, refusing anything that would
    land outside ``folder`` (absolute paths, '..', symlinked escapes)."""
    if not filename or filename.strip() != filename:
        raise LoraError(f"invalid output file name {filename!r}")
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(root, filename))
    if os.path.commonpath([root, target]) != root or target == root:
        raise LoraError(f"output path {filename!r} escapes the output folder {root}")
    return target


def atomic_write(path: str, write, suffix: str = "", overwrite: bool = False) -> str:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename
    it into place, so a crash never leaves a half-written file under the final
    name. Any file type (safetensors, PNG, JSON)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise LoraError("file exists; pass overwrite to replace it", path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)     # mkstemp makes 0600; a saved LoRA or report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None,
                overwrite: bool = False) -> str:
    """Write a safetensors file through a temporary file and a rename."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                                    metadata={k: str(v) for k, v in (metadata or {}).items()}),
                        ".safetensors", overwrite)


def kohya_tensors(lora: LoraFile, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Plain kohya LoRA/LoCon tensors: '<name>.lora_down.weight', '.lora_up.weight', '.alpha'.

    Any module kind is written as its exact factors (LoHa/LoKr at their
    factored rank), with alpha = scale·R so ComfyUI's alpha/R gives back scale.
    """
    out: dict[str, torch.Tensor] = {}
    for name, m in lora.modules.items():
        dt = dtype or m.dtype
        r = m.factor_rank
        down, up = m.down, m.up
        if m.is_conv:
            d_out, c_in, kh, kw = m.weight_shape
            down = down.reshape(r, c_in, kh, kw)
            up = up.reshape(d_out, r, 1, 1)
        out[f"{name}.lora_down.weight"] = down.to(dt).cpu()
        out[f"{name}.lora_up.weight"] = up.to(dt).cpu()
        out[f"{name}.alpha"] = torch.tensor(float(m.scale) * r, dtype=torch.float32)
    return out


def kohya_metadata(lora: LoraFile, extra: dict | None = None) -> dict[str, str]:
    ranks = sorted({m.factor_rank for m in lora.modules.values()})
    has_conv = any(m.is_conv for m in lora.modules.values())
    base_version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(lora.family, lora.family)
    arch = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2",
            "sdxl": "stable-diffusion-xl-v1-base"}.get(lora.family, lora.family)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[-1] if ranks else 0),
        "ss_network_alpha": str(ranks[-1] if ranks else 0),
        "ss_base_model_version": base_version,
        "ss_v2": str(lora.family == "sd2"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": os.path.splitext(lora.name)[0],
        "grassmann_lora.family": lora.family,
    }
    if has_conv:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(ranks[-1] if ranks else 0)})
    if extra:
        meta.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in extra.items()})
    return meta


def save_kohya(lora: LoraFile, path: str, dtype: torch.dtype | None = None, overwrite: bool = False,
               extra_metadata: dict | None = None) -> str:
    if not lora.modules:
        raise LoraError("nothing to save: the LoRA has no modules", path)
    return atomic_save(kohya_tensors(lora, dtype), path, kohya_metadata(lora, extra_metadata), overwrite)
