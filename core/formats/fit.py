"""Which DiT table (family, variant) a file's modules fit.

Names alone cannot always tell DiT families apart (diffusers' generic
``transformer_blocks.N.attn.to_q`` exists in Flux, SD3 and Qwen-Image; Flux.1
and Flux.2 Klein share LDM names), so every candidate table is tried: each
module is resolved against it and its shape compared (a split part against
its rows and the fused module's input width). The table that contradicts no
module and holds the most of them wins; ties go to the family the metadata
claims, then to the candidates' order. Only diffusion-model modules are
scored: text encoders are shared across families (CLIP-L and T5 by Flux.1,
SD3 and HiDream, Qwen3-4B by Z-Image and Klein 4B), so a file's encoder
layers must not outvote its transformer. A file with no diffusion-model module
the candidates know is fitted by its text-encoder modules.
"""
from __future__ import annotations

import math
from typing import Iterable

from .. import arch as dit
from ..arch.common import UNET
from ..sdarch import arch_for
from .adapters import ModulePlan
from .names import resolve_module


def part_rows(rows) -> int:
    """Rows of a split module, from its placements in the fused one."""
    return max(first + end - start for start, end, first in rows)


def score(plans: Iterable[ModulePlan], family: str, variant: str | None,
          text_encoders: bool = False) -> tuple[int, int]:
    """(modules that fit the table, modules that contradict it), over the
    diffusion-model modules, or over the text-encoder ones."""
    table = arch_for(family, variant)
    good = bad = 0
    for plan in plans:
        name, known, rows = resolve_module(plan.module_key, family, variant)
        if not known or name.startswith(UNET) == text_encoders:
            continue
        shape = table.shapes[name]
        d_in = math.prod(shape[1:])
        d_out = shape[0] if rows is None else part_rows(rows)
        if (plan.d_out, plan.d_in) == (d_out, d_in):
            good += 1
        else:
            bad += 1
    return good, bad


def best_table(plans: list[ModulePlan], families: Iterable[str], claimed: str | None
               ) -> tuple[str, str | None, int, int] | None:
    """(family, variant, fitting, contradicting) of the best table, None when no
    candidate table knows any module."""
    families = list(families)
    for text_encoders in (False, True):
        best, best_key = None, None
        for rank, family in enumerate(families):
            for variant in dit.variants(family):
                good, bad = score(plans, family, variant, text_encoders)
                key = (bad == 0, good, family == claimed, -rank)
                if good + bad and (best_key is None or key > best_key):
                    best, best_key = (family, variant, good, bad), key
        if best is not None:
            return best
    return None
