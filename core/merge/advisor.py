"""The advisor: how the sources of a module relate, and which method fits.

Per module (several sources): over every pair of sources, φ of their column
spaces (Hu et al. 2021: ‖U_iᵀU_j‖²_F / min(r_i, r_j), over each source's
effective rank) against its chance level max(r_i, r_j)/d_out, and the largest
principal angle between them. The advice:
  - karcher   every pair within 45° (the π/4 ball where the Karcher mean is
              unique): close versions or epochs of one LoRA;
  - ties/tsv/iso  φ above OVERLAP_TIMES × chance for some pair: partial
              overlap, where the core-space rules resolve interference;
  - linear    otherwise: unrelated LoRAs; the exact sum (linear/concat) keeps
              all of each, where a mean would keep a fraction (a Karcher merge
              of two unrelated LoRAs keeps ~1/K of each one's energy).
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from ..grassmann import principal_cosines
from ..measures import chance_phi
from .basis import Job

CLOSE_ANGLE = math.pi / 4
OVERLAP_TIMES = 4.0
ADVICE = ("karcher", "ties/tsv/iso", "linear")


def advise(job: Job) -> dict | None:
    """{"phi", "chance", "max_angle_deg", "advice"} for a module with several sources, else None."""
    if len(job.sources) < 2:
        return None
    best_ratio, phi_max, chance_at, widest = 0.0, 0.0, 1.0, 0.0
    bases = [s.form.col_basis for s in job.sources]
    pairs = [(a, b) for a in range(len(bases)) for b in range(a + 1, len(bases))]
    if len({tuple(x.shape) for x in bases}) == 1:      # equal ranks: every pair in one batched call
        stack = torch.stack(bases)
        cosines = principal_cosines(stack[[a for a, _ in pairs]], stack[[b for _, b in pairs]])
    else:
        cosines = [principal_cosines(bases[a], bases[b]) for a, b in pairs]
    for (a, b), cos in zip(pairs, cosines):
        x, y = bases[a], bases[b]
        phi = float((cos ** 2).sum()) / min(x.shape[1], y.shape[1])
        chance = chance_phi(x.shape[1], y.shape[1], job.d_out)
        if phi / chance >= best_ratio:
            best_ratio, phi_max, chance_at = phi / chance, phi, chance
        widest = max(widest, math.acos(min(1.0, float(cos[-1]))))
    advice = ("karcher" if widest < CLOSE_ANGLE else
              "ties/tsv/iso" if best_ratio > OVERLAP_TIMES else "linear")
    return {"phi": phi_max, "chance": chance_at, "max_angle_deg": math.degrees(widest), "advice": advice}


def group_advice(advices: list[dict]) -> str:
    """A block group's advice: the most frequent among its modules (ties: the safer, later in ADVICE)."""
    counts = Counter(a["advice"] for a in advices)
    return max(ADVICE, key=lambda x: (counts[x], ADVICE.index(x))) if counts else "-"
