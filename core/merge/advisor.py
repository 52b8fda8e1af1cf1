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

from ..grassmann import least_cos2
from ..measures import chance_phi, phi_from_product
from .basis import Job

CLOSE_ANGLE = math.pi / 4
OVERLAP_TIMES = 4.0
ADVICE = ("karcher", "ties/tsv/iso", "linear")


def advise(job: Job) -> dict | None:
    """{"phi", "chance", "max_angle_deg", "advice"} for a module with several sources, else None.

    Every pair's cross block U_aᵀU_b comes from one product per source a with
    the later sources' bases side by side; φ is the block's ‖·‖²_F/min(r_a, r_b)
    and the widest angle the least eigenvalue of its smaller Gram (least_cos2)."""
    if len(job.sources) < 2:
        return None
    bases = [s.form.col_basis for s in job.sources]
    ranks = [int(x.shape[1]) for x in bases]
    starts = [sum(ranks[:k]) for k in range(len(ranks) + 1)]
    stack = torch.cat(bases, 1)
    pairs, blocks = [], []
    for a in range(len(bases) - 1):
        row = bases[a].T @ stack[:, starts[a + 1]:]
        for b in range(a + 1, len(bases)):
            pairs.append((a, b))
            blocks.append(row[:, starts[b] - starts[a + 1]:starts[b + 1] - starts[a + 1]])
    cos2 = least_cos2(blocks).tolist()
    best_ratio, phi_max, chance_at = 0.0, 0.0, 1.0
    for (a, b), block in zip(pairs, blocks):
        phi = float(phi_from_product(block))
        chance = chance_phi(ranks[a], ranks[b], job.d_out)
        if phi / chance >= best_ratio:
            best_ratio, phi_max, chance_at = phi / chance, phi, chance
    widest = math.acos(math.sqrt(min(cos2)))
    advice = ("karcher" if widest < CLOSE_ANGLE else
              "ties/tsv/iso" if best_ratio > OVERLAP_TIMES else "linear")
    return {"phi": phi_max, "chance": chance_at, "max_angle_deg": math.degrees(widest), "advice": advice}


def group_advice(advices: list[dict]) -> str:
    """A block group's advice: the most frequent among its modules (ties: the safer, later in ADVICE)."""
    counts = Counter(a["advice"] for a in advices)
    return max(ADVICE, key=lambda x: (counts[x], ADVICE.index(x))) if counts else "-"
