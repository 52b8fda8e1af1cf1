"""What a LoRA carries into the kohya file written from it (by `convert`, the
Save node, or any host): the factors' dtype and the source metadata that stays
true after conversion. Kept out of core/commands so hosts need no CLI code."""
from __future__ import annotations

import dataclasses

import torch

from .lora import LoraFile

# Source metadata that describes the training run and stays true after conversion;
# the structural fields (network module/dim/alpha/args, base version) and the
# hashes of the old tensors are written afresh by save_kohya or dropped.
_REWRITTEN = {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
              "ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.sai_model_spec",
              "modelspec.implementation", "modelspec.title", "modelspec.hash_sha256"}


def carried_metadata(lora: LoraFile) -> dict[str, str]:
    keep = {k: v for k, v in lora.metadata.items()
            if k.startswith(("ss_", "modelspec.")) and k not in _REWRITTEN}
    keep["grassmann_lora.source_format"] = lora.format
    keep["grassmann_lora.source_file"] = lora.name
    return keep


def kohya_ready(lora: LoraFile, dtype: torch.dtype | None) -> LoraFile:
    """LoHa/LoKr factors are products of the stored numbers: keep them in fp32
    unless a dtype was asked for, so the written ΔW is the one read."""
    if dtype is not None:
        return lora
    modules = {n: (m if m.kind == "lora" else dataclasses.replace(m, dtype=torch.float32))
               for n, m in lora.modules.items()}
    return dataclasses.replace(lora, modules=modules)
