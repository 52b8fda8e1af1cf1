"""Does a merge still do what each source did? Fidelity measured through the model.

Weight-space errors (core.merge's report) say how far a merge is from
Σ w_k ΔW_k. This module asks the model instead: for source k, its prompt c_k
and one noisy latent x_t,

    F_k   = ‖ε_merge(x_t, c_k) − ε_k(x_t, c_k)‖ / ‖ε_k(x_t, c_k) − ε_base(x_t, c_k)‖
    cos_k = cos∠(ε_merge − ε_base, ε_k − ε_base)

(ε_k: the base patched with source k at its weight; ε_base: unpatched),
averaged over seeds × timesteps. F = 0 and cos = 1: the merge does exactly
what source k does; F = 1: the merge is as far from source k as the bare
model (an empty merge gives exactly 1); F > 1: farther still.

The host (ComfyUI, WebUI) supplies ``evaluate(variant, k, noise, sigmas)``:
the denoiser's ε for variant "base", "source:<k>" or "merge:<j>" under prompt
k, on x_t built from ``noise`` (unit Gaussian, one row per seed × timestep)
at noise level ``sigmas`` (one per row) the way its sampler builds it. Any
parameterisation works as long as ε is an affine function of the network
output with coefficients fixed by (x_t, σ) — e.g. (x_t − denoised)/σ — since
F and cos are ratios of differences. Nothing here imports a host.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

BASE = "base"
# ‖ε_k − ε_base‖ at or below this fraction of ‖ε‖ is rounding, not an effect:
# float32 outputs carry relative errors of ~1e-7.
NO_EFFECT_RTOL = 1e-6
NO_SOURCE_EFFECT = "source has no effect"
NO_MERGE_EFFECT = "merge has no effect"

Evaluate = Callable[[str, int, torch.Tensor, torch.Tensor], torch.Tensor]


def source_variant(k: int) -> str:
    return f"source:{k}"


def merge_variant(j: int) -> str:
    return f"merge:{j}"


def forward_passes(n_sources: int, n_merges: int, n_seeds: int, n_timesteps: int) -> int:
    """Denoiser evaluations (one latent each) a measurement costs: per source,
    the base, the source and every merge, on every seed × timestep."""
    return n_sources * (2 + n_merges) * n_seeds * n_timesteps


def timestep_fractions(n: int) -> list[float]:
    """n points spread over the schedule, as fractions of it (0 = pure noise,
    1 = clean), at the middles of n equal parts: 3 → 1/6, 1/2, 5/6."""
    if n < 1:
        raise ValueError(f"need at least one timestep, got {n}")
    return [(i + 0.5) / n for i in range(n)]


def noise_batch(seeds: list[int], n_timesteps: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(len(seeds)·n_timesteps, *shape) unit Gaussian noise; row s·T + t holds
    seed s's noise (ComfyUI's prepare_noise for a batch of one: a CPU generator
    seeded with s), the same for each of its T timesteps."""
    rows = []
    for seed in seeds:
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        rows.append(torch.randn((1, *shape), generator=g, dtype=torch.float32).expand(n_timesteps, *shape))
    return torch.cat(rows).contiguous()


@dataclass
class Cell:
    """Source k against merge j: F and cos per sample (None where undefined) and their means."""
    f_samples: list[float | None]
    cos_samples: list[float | None]

    @staticmethod
    def _mean(values) -> float | None:
        good = [v for v in values if v is not None]
        return float(np.mean(good)) if good else None

    @property
    def f(self) -> float | None:
        return self._mean(self.f_samples)

    @property
    def cos(self) -> float | None:
        return self._mean(self.cos_samples)


@dataclass
class FidelityReport:
    sources: list[str]
    merges: list[str]
    weights: list[float]
    prompts: list[str]
    seeds: list[int]
    fractions: list[float]
    sigmas: list[float]
    cells: list[list[Cell]]                      # [source][merge]
    effect: list[list[float]]                    # [source][sample] ‖ε_k − ε_base‖ / ‖ε_base‖
    forward_passes: int
    notes: list[str] = field(default_factory=list)

    def source_has_effect(self, k: int) -> bool:
        return any(f is not None for cell in self.cells[k] for f in cell.f_samples)

    def matrix(self, what: str = "f") -> np.ndarray:
        """sources × merges of mean F (or cos); NaN where undefined."""
        return np.array([[np.nan if getattr(c, what) is None else getattr(c, what) for c in row]
                         for row in self.cells], dtype=np.float64).reshape(len(self.sources), len(self.merges))

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Columns and rows: one row per source, 'F / cos' per merge."""
        cols = ["source", "weight", "effect"] + [f"{m}: F / cos" for m in self.merges]
        rows = []
        for k, name in enumerate(self.sources):
            effect = float(np.mean(self.effect[k])) if self.effect[k] else 0.0
            row = [name, f"{self.weights[k]:g}", f"{effect:.2e}"]
            for cell in self.cells[k]:
                if cell.f is None:
                    row.append(NO_SOURCE_EFFECT)
                else:
                    row.append(f"{cell.f:.3f} / " + ("n/a" if cell.cos is None else f"{cell.cos:.3f}"))
            rows.append(row)
        return cols, rows

    def text(self) -> str:
        cols, rows = self.table()
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
        out = [line(cols)] + [line(r) for r in rows]
        out.append(f"{self.forward_passes} denoiser evaluations: {len(self.sources)} source(s) × "
                   f"(base + source + {len(self.merges)} merge(s)) × {len(self.seeds)} seed(s) × "
                   f"{len(self.sigmas)} timestep(s)")
        out.append("F = ‖ε_merge − ε_k‖ / ‖ε_k − ε_base‖ (0 = the merge does what source k does, "
                   "1 = as far from k as the bare model); cos between ε_merge − ε_base and ε_k − ε_base; "
                   "effect = ‖ε_k − ε_base‖ / ‖ε_base‖.")
        out.extend(self.notes)
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {
            "sources": self.sources, "merges": self.merges, "weights": self.weights,
            "prompts": self.prompts, "seeds": self.seeds, "timestep_fractions": self.fractions,
            "sigmas": self.sigmas, "forward_passes": self.forward_passes,
            "F": [[c.f for c in row] for row in self.cells],
            "cos": [[c.cos for c in row] for row in self.cells],
            "F_samples": [[c.f_samples for c in row] for row in self.cells],
            "cos_samples": [[c.cos_samples for c in row] for row in self.cells],
            "effect": self.effect,
            "status": [[NO_SOURCE_EFFECT if c.f is None else "ok" for c in row] for row in self.cells],
            "notes": self.notes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False)

    def heatmap_image(self):
        """F as a sources × merges heatmap (grey n/a: the source has no effect)."""
        from .plot import heatmap
        f = self.matrix("f")
        top = max(1.0, float(np.nanmax(f))) if np.isfinite(f).any() else 1.0
        return heatmap(f, self.sources, self.merges, title="Merge fidelity F per source (0 = kept)",
                       vmin=0.0, vmax=top, colorbar_label="F (0 kept, 1 lost)",
                       cmap="magma", annotate=True)


def _norms(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1)


def compare(eps_base: torch.Tensor, eps_source: torch.Tensor, eps_merge: torch.Tensor,
            rtol: float = NO_EFFECT_RTOL) -> tuple[list[float | None], list[float | None]]:
    """Per sample (row): F and cos of one merge against one source, None where
    undefined (source without effect: both; merge without effect: cos)."""
    b, k, m = (t.detach().to(torch.float64).cpu() for t in (eps_base, eps_source, eps_merge))
    dk, dm = (k - b).flatten(1), (m - b).flatten(1)
    nk, nm, nd = _norms(dk), _norms(dm), _norms(m - k)
    nb, nks, nms = _norms(b), _norms(k), _norms(m)
    f_out, cos_out = [], []
    for i in range(b.shape[0]):
        if nk[i] == 0 or nk[i] <= rtol * max(nb[i], nks[i]):
            f_out.append(None)
            cos_out.append(None)
            continue
        f_out.append(float(nd[i] / nk[i]))
        if nm[i] == 0 or nm[i] <= rtol * max(nb[i], nms[i]):
            cos_out.append(None)
        else:
            cos_out.append(float((dm[i] @ dk[i]) / (nm[i] * nk[i])))
    return f_out, cos_out


def measure(evaluate: Evaluate, sources: list[str], merges: list[str], seeds: list[int], sigmas: list[float],
            latent_shape: tuple[int, ...], weights: list[float] | None = None, prompts: list[str] | None = None,
            fractions: list[float] | None = None, progress: Callable[[int, int], None] | None = None,
            rtol: float = NO_EFFECT_RTOL) -> FidelityReport:
    """Evaluate base, every source and every merge under every source's prompt on
    the same noisy latents and compare them (module docstring). Evaluation order
    is variant-major (base, sources, merges) so a host re-patches its model only
    1 + K + M times. ``progress(done, total)`` counts denoiser evaluations; an
    exception raised in it (a cancel) propagates and nothing is returned."""
    if not sources:
        raise ValueError("no sources to measure")
    if not merges:
        raise ValueError("no merges to measure")
    if not seeds or not sigmas:
        raise ValueError("need at least one seed and one timestep")
    if any(not (s > 0 and math.isfinite(s)) for s in sigmas):
        raise ValueError(f"noise levels must be positive and finite, got {sigmas}")
    n_k, n_m = len(sources), len(merges)
    T = len(sigmas)
    total = forward_passes(n_k, n_m, len(seeds), T)
    noise = noise_batch(seeds, T, tuple(latent_shape))
    sig = torch.tensor(list(sigmas) * len(seeds), dtype=torch.float32)
    done = 0

    def run(variant: str, k: int) -> torch.Tensor:
        nonlocal done
        out = evaluate(variant, k, noise.clone(), sig.clone())
        if tuple(out.shape) != tuple(noise.shape):
            raise ValueError(f"{variant} returned shape {tuple(out.shape)}, expected {tuple(noise.shape)}")
        done += noise.shape[0]
        if progress is not None:
            progress(done, total)
        return out.detach().to(torch.float32).cpu()

    base = [run(BASE, k) for k in range(n_k)]
    own = [run(source_variant(k), k) for k in range(n_k)]
    cells = [[None] * n_m for _ in range(n_k)]
    for j in range(n_m):
        for k in range(n_k):
            cells[k][j] = Cell(*compare(base[k], own[k], run(merge_variant(j), k), rtol))
    effect = [[float(d) for d in (_norms((own[k] - base[k]).double()) / _norms(base[k].double()).clamp_min(1e-300))]
              for k in range(n_k)]
    report = FidelityReport(list(sources), list(merges), list(weights or [1.0] * n_k),
                            list(prompts or [""] * n_k), [int(s) for s in seeds], list(fractions or []),
                            [float(s) for s in sigmas], cells, effect, total)
    for k, name in enumerate(sources):
        if not report.source_has_effect(k):
            report.notes.append(f"{name}: {NO_SOURCE_EFFECT} on the model under its prompt "
                                f"(‖ε_k − ε_base‖ ≤ {rtol:g}·‖ε‖); its F is undefined.")
    return report


__all__ = ["BASE", "NO_EFFECT_RTOL", "NO_SOURCE_EFFECT", "Cell", "FidelityReport", "compare",
           "forward_passes", "measure", "merge_variant", "noise_batch", "source_variant",
           "timestep_fractions"]
