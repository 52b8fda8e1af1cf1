"""Merging LoRAs into one real, loadable LoRA, with a fidelity report.

Sources ΔW_k = s_k·up_k·down_k with user weights w_k (kohya/ComfyUI meaning:
weight 1 = the LoRA at strength 1). Every method works module by module on
the modules the sources share; ΔW is never formed except by ties and dare,
which are elementwise by nature (chunked there, memory bounded).

    karcher  U*, V* = weighted Karcher means of the sources' top-p column and
             row spaces on Gr(p, d_out), Gr(p, d_in) (core.karcher); core
             M = Σ w_k U*ᵀΔW_k V* (p×p, from factors) = P·S·Qᵀ; up = U*·P·√S,
             down = √S·Qᵀ·V*ᵀ, alpha = p (scale 1). distance="chordal" uses
             the chordal (extrinsic) mean instead.
    linear   exact Σ w_k ΔW_k by concatenated factors, rank Σ r_k ("concat" is
             the same merge under its other name).
    svd      best rank-p approximation of Σ w_k ΔW_k: frames of the stacked
             factors and the top-p triplets of the (Σr)×(Σr) core — equal to
             truncating a dense SVD.
    karcher and svd run in orthonormal frames of span[up_1 … up_K] and
    span[down_1ᵀ … down_Kᵀ] (core.factored.frame: one Gram product per side),
    so everything after the Grams costs the same whatever d (see _Job).
    ties     TIES (Yadav et al. 2023) on the task vectors τ_k = w_k ΔW_k: keep
             each τ_k's top `ties_density` fraction by magnitude, elect each
             entry's sign by the sign of Σ_k trimmed τ_k, average the trimmed
             entries that agree with it (disjoint mean); then rank p.
    dare     DARE (Yu et al. 2024): drop each entry of τ_k with probability q =
             `dare_drop`, rescale by 1/(1−q), sum (expectation = Σ w_k ΔW_k,
             seeded); then rank p.
    For ties/dare "rank p" is the best rank-p approximation of the dense
    result (top_singular: subspace iteration converged to dense-SVD accuracy).

Merge rank p (not for linear/concat): default per module the smallest rank
among the sources merged there (nominal rank, or the effective rank when
that is smaller). Asking for more than min(d_out, d_in) of any merged module
is an error. karcher needs p directions from every source: a module whose
sources have fewer gets the largest rank they allow, and asking for more than
any module's factors allow is an error (checked before any work, from factor
ranks; a module whose sources span fewer directions than their factor rank is
capped); svd is likewise capped by Σ effective ranks and ties/dare by
min(d_out, d_in). Capped modules are counted in the report.

Modules are prepared and merged one at a time (the sources' SVDs, frames,
merge, report), so a whole-LoRA merge holds one module's working state.

Weights: one per source, finite, not all zero; default 1/K each (the mean).
Weight 0 leaves a source out. Negative weights are refused by karcher (a
Fréchet mean has no negative masses) and allowed by the others.

Modules: a module some sources lack (or have dead, ΔW = 0) is merged among the
sources that have it; a module only one source has is copied with its own
factors at scale w_k·s_k; a module dead in every source is skipped (not
written); a merged result that cancels to zero is skipped too. Both are listed
in the report, never written as NaN.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import __version__
from .device import default_device, linalg_threads
from .errors import LoraError
from .formats import require_same_base
from .factored import (RANK_RTOL, FactoredSVD, Frame, frame, leading_svd, module_svd, modules_svd,
                       svd_from_factors)
from .karcher import DETERMINISTIC_CHOICE, DISTANCES, KarcherResult, karcher_mean
from .lora import LoraFile, LoraModule, module_part
from .measures import phi
from .save import atomic_save, kohya_metadata, kohya_tensors
from .sdarch import TABLE_FAMILIES, arch_for

METHODS = ("karcher", "linear", "concat", "svd", "ties", "dare")
RANKED = ("karcher", "svd", "ties", "dare")   # methods with a merge rank p
FRAMED = ("karcher", "svd")                   # results inside the stacked spans: computed in frames
NAMINGS = ("first", "kohya")
RECIPE_KEY = "grassmann_lora.merge"
CHUNK_ELEMENTS = 1 << 16        # ties/dare dense rows processed at a time (512 KiB in float64: in cache)
# ties/dare rank-p step: residuals ‖D v − σ u‖ ≤ rtol·σ_1, a few units of the dense dtype's rounding
# (a float32 product over n ≤ 10240 terms carries ~√n·6e-8 ≈ 6e-6 of σ_1).
DENSE_RTOL = {torch.float64: 1e-10, torch.float32: 3e-5}
SUBSPACE_OVERSAMPLING = 4       # extra block columns in top_singular
THRESHOLD_SAMPLE = 1 << 14      # entries sampled to bracket the TIES threshold
KOHYA_LIKE = ("kohya", "lycoris", "lycoris-loha", "lycoris-lokr")  # key stems are module names


# ------------------------------------------------------------------ report
@dataclass
class ModuleReport:
    """Fidelity of one merged module. Source indices refer to the loras list."""

    name: str
    group: str
    status: str                    # merged (all weighted sources) | partial (some) | copied (one)
    sources: list[int]
    rank: int
    target_norm: float             # ‖Σ w_k ΔW_k‖_F
    error_norm: float              # ‖ΔW_merge − Σ w_k ΔW_k‖_F
    rel_error: float | None        # None only when the target is exactly zero
    energy: dict[int, float]       # ‖ΔW_k‖²_F
    kept: dict[int, float]         # ‖P_U ΔW_k P_V‖²_F / ‖ΔW_k‖²_F (merge's column/row spaces)
    phi: dict[int, float]          # φ between the merge's and the source's column spaces
    karcher: dict | None = None    # per side "U"/"V": iterations, grad_norm, angles, flags
    note: str = ""

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        for key in ("energy", "kept", "phi"):
            d[key] = {str(k): v for k, v in d[key].items()}
        return d


@dataclass
class MergeReport:
    method: str
    weights: list[float]
    rank: int | None
    family: str
    sources: list[str]
    distance: str | None = None
    modules: list[ModuleReport] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)   # reason -> module names
    capped: list[str] = field(default_factory=list)                # rank lowered there
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """Whole-LoRA figures: Frobenius norms pooled over modules."""
        mods = self.modules
        target = math.sqrt(sum(m.target_norm ** 2 for m in mods))
        error = math.sqrt(sum(m.error_norm ** 2 for m in mods))
        worst = max((m for m in mods if m.rel_error is not None), key=lambda m: m.rel_error, default=None)
        out: dict = {
            "modules": len(mods),
            "status": {s: sum(m.status == s for m in mods) for s in ("merged", "partial", "copied")},
            "skipped": {k: len(v) for k, v in self.skipped.items()},
            "rank_capped": len(self.capped),
            "rel_error": error / target if target > 0 else (0.0 if error == 0 else None),
            "rel_error_max": worst.rel_error if worst else None,
            "rel_error_max_module": worst.name if worst else None,
            "kept": {}, "phi": {},
        }
        for k, name in enumerate(self.sources):
            energy = sum(m.energy[k] for m in mods if k in m.energy)
            if energy > 0:
                out["kept"][name] = sum(m.kept[k] * m.energy[k] for m in mods if k in m.energy) / energy
                phis = [m.phi[k] for m in mods if k in m.phi]
                out["phi"][name] = sum(phis) / len(phis)
        sides = [side for m in mods if m.karcher for side in m.karcher.values()]
        if sides:
            iters = [s["iterations"] for s in sides]
            out["karcher"] = {
                "distance": self.distance,
                "iterations_mean": sum(iters) / len(iters), "iterations_max": max(iters),
                "grad_norm_max": max(s["grad_norm"] for s in sides),
                "not_converged": sum(1 for m in mods if m.karcher and
                                     not all(s["converged"] for s in m.karcher.values())),
                "not_unique": sum(1 for m in mods if m.karcher and
                                  not all(s["unique"] for s in m.karcher.values())),
                "max_angle_deg": max(s["max_angle_deg"] for s in sides),
            }
        return out

    def to_dict(self) -> dict:
        return {"method": self.method, "weights": self.weights, "rank": self.rank,
                "family": self.family, "sources": self.sources, "distance": self.distance,
                "summary": self.summary(), "warnings": self.warnings, "skipped": self.skipped,
                "rank_capped": self.capped, "modules": [m.to_dict() for m in self.modules]}

    def table(self) -> str:
        """Fidelity per block group (the JSON report has every module)."""
        labels = [chr(ord("A") + k) if k < 26 else f"S{k}" for k in range(len(self.sources))]
        groups: dict[str, list[ModuleReport]] = {}
        for m in self.modules:
            groups.setdefault(m.group, []).append(m)
        head = ["group", "mods", "rank", "rel.err"] + [f"kept {x}" for x in labels] + \
               [f"φ {x}" for x in labels]
        karcher = any(m.karcher for m in self.modules)
        if karcher:
            head += ["iters", "non-uniq"]
        rows = [head]

        def row(label: str, mods: list[ModuleReport]) -> list[str]:
            target = math.sqrt(sum(m.target_norm ** 2 for m in mods))
            error = math.sqrt(sum(m.error_norm ** 2 for m in mods))
            ranks = sorted({m.rank for m in mods})
            cells = [label, str(len(mods)), str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}",
                     f"{error / target:.2e}" if target > 0 else "-"]
            for k in range(len(labels)):
                e = sum(m.energy.get(k, 0.0) for m in mods)
                cells.append(f"{sum(m.kept[k] * m.energy[k] for m in mods if k in m.kept) / e:.3f}"
                             if e > 0 else "-")
            for k in range(len(labels)):
                ph = [m.phi[k] for m in mods if k in m.phi]
                cells.append(f"{sum(ph) / len(ph):.3f}" if ph else "-")
            if karcher:
                its = [s["iterations"] for m in mods if m.karcher for s in m.karcher.values()]
                cells.append(f"{sum(its) / len(its):.1f}/{max(its)}" if its else "-")
                cells.append(str(sum(1 for m in mods if m.karcher and
                                     not all(s["unique"] for s in m.karcher.values()))))
            return cells

        for label, mods in groups.items():
            rows.append(row(label, mods))
        if not self.modules:
            return f"{self.method} merge: no module left to write ({self.skipped})"
        rows.append(row("all", self.modules))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"{self.method} merge of {len(self.sources)} LoRAs ({self.family}), weights "
                 f"{', '.join(f'{w:g}' for w in self.weights)}"]
        lines += [f"  {x} = {name}" for x, name in zip(labels, self.sources)]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        s = self.summary()
        lines.append(f"relative error (whole LoRA) {s['rel_error']:.3e}" if s["rel_error"] is not None
                     else "relative error: target is zero")
        for reason, names in self.skipped.items():
            lines.append(f"skipped ({reason}): {len(names)} module(s)")
        if self.capped:
            lines.append(f"rank lowered to what the sources allow in {len(self.capped)} module(s)")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


@dataclass
class MergeResult:
    lora: LoraFile
    report: MergeReport
    key_names: dict[str, str] = field(default_factory=dict)  # canonical -> written stem ("first" naming)

    @property
    def recipe(self) -> dict:
        return json.loads(self.lora.metadata[RECIPE_KEY])

    def save(self, path: str, dtype: torch.dtype | None = None, overwrite: bool = False) -> str:
        """Write a kohya-style .safetensors (atomic, no overwrite unless asked) with
        kohya metadata plus the recipe; keys follow the chosen naming."""
        if not self.lora.modules:
            raise LoraError("nothing to save: the merge has no modules", path)
        tensors = kohya_tensors(self.lora, dtype)
        if self.key_names:
            tensors = {_rename(key, self.key_names): t for key, t in tensors.items()}
        return atomic_save(tensors, path, kohya_metadata(self.lora, self.lora.metadata), overwrite)


def _rename(key: str, stems: dict[str, str]) -> str:
    stem, rest = key.split(".", 1)
    return f"{stems.get(stem, stem)}.{rest}"


# ------------------------------------------------------------------ jobs
@dataclass
class _Source:
    index: int
    weight: float
    module: LoraModule
    svd: FactoredSVD          # exact thin SVD at effective rank, float64 on the compute device;
                              # in the job's frame coordinates when the job has frames

    @property
    def rank(self) -> int:
        return int(self.svd.S.numel())


@dataclass
class _Job:
    """One module to merge. With frames (karcher, svd: several sources), every
    source SVD, the target and the merge live in coordinates of orthonormal
    frames of span[up_1 … up_K] and span[down_1ᵀ … down_Kᵀ] (n ≤ Σr each), so all
    work after the two Grams is on n×n matrices whatever d; lift() maps the
    merged factors back."""

    name: str
    shape: tuple[int, ...]
    sources: list[_Source]     # live sources with nonzero weight
    rank: int = 0
    capped: bool = False
    frames: tuple[Frame, Frame] | None = None
    members: list[LoraModule] = field(default_factory=list)   # the modules the frames were built from
    workspace: "_Workspace | None" = None
    _target: FactoredSVD | None = None
    _core: torch.Tensor | None = None

    @property
    def target(self) -> FactoredSVD:
        """Exact thin SVD of Σ w_k ΔW_k: of the n×n core in frame coordinates,
        else from one QR pair of the stacked factors."""
        if self._target is None:
            if self.frames is None:
                self._target = svd_from_factors(*_target(self))
            else:
                u, s, vh = torch.linalg.svd(self.target_core, full_matrices=False)
                self._target = FactoredSVD(u, s, vh.transpose(-1, -2))
        return self._target

    @property
    def target_core(self) -> torch.Tensor:
        """Σ w_k ΔW_k in frame coordinates (n_out×n_in), formed once."""
        if self._core is None:
            up, down = _target(self)
            self._core = up @ down
        return self._core

    @property
    def target_norm(self) -> float:
        """‖Σ w_k ΔW_k‖_F: of the small core in frames (no SVD needed), else from the target's SVD."""
        if self.frames is None:
            return self.target.frobenius()
        return float(torch.linalg.matrix_norm(self.target_core))

    def lift(self, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged factors from frame coordinates to the module's space."""
        if self.frames is None:
            return up, down
        out, inn = self.frames
        xs = _stacked(self.members, up.device, self.workspace)
        return out.lift(up, xs[0]), inn.lift(down.transpose(-1, -2), xs[1]).transpose(-1, -2)

    @property
    def d_out(self) -> int:
        return self.sources[0].module.d_out

    @property
    def d_in(self) -> int:
        return self.sources[0].module.d_in


class _Workspace:
    """Reusable float64 buffers for the stacked factors, one per shape: the
    d×Σr stacks are the largest temporaries of a merge, and fresh allocations of
    them fault in new pages module after module (measured: the conversions took
    ten times longer than the copies into a kept buffer once memory was
    fragmented)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, shape: tuple[int, int], dev: torch.device, slot: str) -> torch.Tensor:
        key = (slot, shape, str(dev))
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, dtype=torch.float64, device=dev)
        return self.buffers[key]


def _stacked(modules: list[LoraModule], dev: torch.device, work: _Workspace
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """[up_1 … up_K] (d_out×Σr) and [down_1ᵀ … down_Kᵀ] (d_in×Σr), float64, unscaled,
    in the workspace's buffers (valid until the next call for the same shape)."""
    total = sum(m.factor_rank for m in modules)
    ups = work.get((modules[0].d_out, total), dev, "up")
    downs = work.get((total, modules[0].d_in), dev, "down")   # stacked along rows, used transposed
    start = 0
    for m in modules:
        ups[:, start:start + m.factor_rank].copy_(m.up)
        downs[start:start + m.factor_rank].copy_(m.down)
        start += m.factor_rank
    return ups, downs.T


def _check_weights(loras: list[LoraFile], weights, method: str) -> list[float]:
    if weights is None:
        return [1.0 / len(loras)] * len(loras)
    w = [float(x) for x in weights]
    if len(w) != len(loras):
        raise LoraError(f"{len(w)} weight(s) given for {len(loras)} LoRAs")
    if not all(math.isfinite(x) for x in w):
        raise LoraError(f"weights must be finite numbers, got {w}")
    if all(x == 0 for x in w):
        raise LoraError("all weights are zero: nothing to merge")
    if method == "karcher":
        for lora, x in zip(loras, w):
            if x < 0:
                raise LoraError(f"weight {x:g} is negative: the Karcher (Fréchet) mean has no meaning "
                                "for negative weights; use the linear or svd merge to subtract a LoRA",
                                lora.path)
    return w


def _framed_svds(modules: list[LoraModule], dev: torch.device, work: _Workspace
                 ) -> tuple[tuple[Frame, Frame], list[FactoredSVD]]:
    """Frames of the stacked factors and each module's exact SVD in their coordinates."""
    xs = _stacked(modules, dev, work)
    frames = (frame(xs[0]), frame(xs[1]))
    svds, start = [], 0
    for m in modules:
        cols = slice(start, start + m.factor_rank)
        svds.append(svd_from_factors(frames[0].coords[:, cols], frames[1].coords[:, cols].T, m.scale))
        start = cols.stop
    return frames, svds


def _specs(loras: list[LoraFile], w: list[float]) -> dict[str, list[int]]:
    """Every module name (in first-seen order) -> the sources with a nonzero weight that have it."""
    names: dict[str, None] = {}
    for lora in loras:
        names.update(dict.fromkeys(lora.modules))
    specs = {name: [k for k, lora in enumerate(loras) if name in lora.modules and w[k] != 0] for name in names}
    return {name: ks for name, ks in specs.items() if ks}


def _prepare(name: str, ks: list[int], loras: list[LoraFile], w: list[float], dev: torch.device,
             method: str, work: _Workspace) -> _Job | None:
    """The job for one module: its live sources' SVDs (in frames for several sources of a
    framed method), or None when every source is dead there. Built just before the
    module is merged, so a whole-LoRA merge never holds more than one module's state."""
    modules = [loras[k].modules[name] for k in ks]
    frames = None
    if method in FRAMED and len(ks) > 1:
        frames, found = _framed_svds(modules, dev, work)
    else:
        found = modules_svd(modules, device=dev)
    live = [_Source(k, w[k], m, res.top(res.effective_rank))
            for k, m, res in zip(ks, modules, found) if not res.dead]
    if not live:
        return None
    if frames is not None and len(live) == 1:     # copied: its SVD in the module's space
        only = live[0]
        res = module_svd(only.module, device=dev)
        live, frames = [_Source(only.index, only.weight, only.module, res.top(res.effective_rank))], None
    return _Job(name, live[0].module.weight_shape, live, frames=frames,
                members=modules if frames is not None else [], workspace=work if frames is not None else None)


def _rank_limit(method: str, d_out: int, d_in: int, ranks: list[int]) -> int:
    """The largest merge rank a module allows, given its sources' (effective or factor) ranks."""
    if method == "karcher":
        return min(ranks)
    if method == "svd":
        return min(sum(ranks), d_out, d_in)
    return min(d_out, d_in)


def _check_rank_request(specs: dict[str, list[int]], loras: list[LoraFile], method: str,
                        rank: int | None) -> None:
    """Refuse, before any work, a rank no module could take (from shapes and factor ranks;
    a module whose sources turn out to span fewer directions is capped and reported)."""
    if method not in RANKED:
        if rank is not None:
            raise LoraError(f"the {method} merge is exact at rank Σ r_k; use svd (or karcher) for a "
                            f"rank-{rank} result")
        return
    if rank is None:
        return
    if rank < 1:
        raise LoraError(f"merge rank must be at least 1, got {rank}")
    allowed = []
    for name, ks in specs.items():
        if len(ks) < 2:
            continue
        mods = [loras[k].modules[name] for k in ks]
        d_out, d_in = mods[0].d_out, mods[0].d_in
        if rank > min(d_out, d_in):
            raise LoraError(f"rank {rank} is more than any {d_out}×{d_in} layer can hold "
                            f"(at most {min(d_out, d_in)})", key=name)
        allowed.append(_rank_limit(method, d_out, d_in, [m.factor_rank for m in mods]))
    if allowed and rank > max(allowed):
        why = ("the Karcher mean compares p-dimensional subspaces and every source must span p "
               "directions" if method == "karcher" else "the weighted sum has no more directions")
        raise LoraError(f"rank {rank} is more than the sources allow for a {method} merge (at most "
                        f"{max(allowed)} in any module): {why}")


def _set_rank(job: _Job, method: str, rank: int | None) -> None:
    if method not in RANKED:
        job.rank = sum(s.module.factor_rank for s in job.sources)
    elif len(job.sources) == 1:                 # copied with its own factors
        job.rank = job.sources[0].module.factor_rank
    elif rank is None:                          # the smallest source rank (nominal, or effective if less)
        job.rank = min(min(s.module.rank, s.rank) for s in job.sources)
    else:
        job.rank = min(rank, _rank_limit(method, job.d_out, job.d_in, [s.rank for s in job.sources]))
        job.capped = job.rank < rank


def _merged(up: torch.Tensor, down: torch.Tensor, job: _Job, dtype: torch.dtype, scale: float = 1.0,
            rank: int | None = None) -> LoraModule:
    r = int(down.shape[0])
    return LoraModule(job.name, up.to("cpu", dtype).contiguous(), down.to("cpu", dtype).contiguous(),
                      scale, rank or r, scale * r, job.shape, "lora", dtype=dtype)


def _split(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """up = U·√S, down = √S·Vᵀ: both factors carry half the magnitude (fp16-friendly)."""
    r = s.clamp_min(0).sqrt().unsqueeze(-2)
    return u * r, (v * r).transpose(-1, -2)


def _target(job: _Job) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ w_k ΔW_k as stacked factors [w_k·U_k·S_k], [V_kᵀ] (exact, effective ranks)."""
    return (torch.cat([s.weight * s.svd.U * s.svd.S for s in job.sources], 1),
            torch.cat([s.svd.V.T for s in job.sources], 0))


# ------------------------------------------------------------------ methods
def _linear(job: _Job, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    up = torch.cat([s.weight * s.module.scale * s.module.up.to(dev, torch.float64) for s in job.sources], 1)
    down = torch.cat([s.module.down.to(dev, torch.float64) for s in job.sources], 0)
    return up, down


def _svd(job: _Job):
    """(up, down, the result's SVD, its error). In frames the top-p triplets of
    the small target core come from leading_svd when its spectrum allows, and
    the error is the norm of the difference matrix (no cancellation); else from
    the full SVD, error ‖S_T[p:]‖ (exact, a sum of squares)."""
    if job.frames is not None:
        core = job.target_core
        res = leading_svd(core, job.rank)
        if res is not None:
            error = float(torch.linalg.matrix_norm((res.U * res.S) @ res.V.T - core))
            return (*_split(res.U, res.S, res.V), res, error)
    res = job.target
    p = min(job.rank, int((res.S > RANK_RTOL * res.S[0]).sum()))
    return (*_split(res.U[:, :p], res.S[:p], res.V[:, :p]), res.top(p),
            float(torch.linalg.vector_norm(res.S[p:])))


def _karcher(group: list[_Job], distance: str, tol: float | None, max_iter: int):
    """One batch of jobs with equal (d_out, d_in, p, K): means of both sides, then the cores."""
    p = group[0].rank
    us = torch.stack([torch.stack([s.svd.U[:, :p] for s in j.sources]) for j in group])
    vs = torch.stack([torch.stack([s.svd.V[:, :p] for s in j.sources]) for j in group])
    w = torch.tensor([[s.weight for s in j.sources] for j in group], dtype=us.dtype, device=us.device)
    ku = karcher_mean(us, w, tol, max_iter, distance)
    kv = karcher_mean(vs, w, tol, max_iter, distance)
    out = []
    for b, job in enumerate(group):
        u, v = ku.mean[b], kv.mean[b]
        core = sum(s.weight * ((u.T @ s.svd.U) * s.svd.S) @ (s.svd.V.T @ v) for s in job.sources)
        pp, ss, qh = torch.linalg.svd(core)
        known = FactoredSVD(u @ pp, ss, v @ qh.T)
        # ΔW_merge − target as one small matrix: coordinates are exact isometries (no cancellation);
        # every Karcher job has frames (several sources, a framed method)
        error = float(torch.linalg.matrix_norm((known.U * known.S) @ known.V.T - job.target_core))
        out.append((*_split(known.U, known.S, known.V), {"U": _side(ku, b), "V": _side(kv, b)}, known, error))
    return out


def _side(res: KarcherResult, b: int) -> dict:
    return {"iterations": int(res.iterations[b]), "grad_norm": float(res.grad_norm[b]),
            "converged": bool(res.converged[b]), "unique": bool(res.unique[b]),
            "afsari": bool(res.afsari[b]), "radius": float(res.radius[b]),
            "max_angle_deg": math.degrees(float(res.max_angle[b])),
            "pairwise_max_angle_deg": math.degrees(float(res.pairwise_max_angle[b])),
            "pairwise_distance": float(res.pairwise_distance[b])}


def ties_threshold(tau: torch.Tensor, density: float) -> float:
    """Magnitude of τ's k-th largest entry, k = density·n rounded (at least one)."""
    flat = tau.reshape(tau.shape[0] if tau.dim() > 1 else 1, -1)
    return _kth_largest_abs(lambda rows: flat[rows], lambda idx: flat.reshape(-1)[idx], tuple(flat.shape),
                            density)


def _kth_largest_abs(rows_of, entries_at, shape: tuple[int, int], density: float) -> float:
    """Exact density-quantile of |x| over an m×n matrix seen through row chunks
    (rows_of(slice)) and single entries (entries_at(flat indices)).

    A full selection (kthvalue) over n entries was most of a TIES merge's time;
    instead a seeded sample brackets the answer, one chunked pass counts the
    entries above the bracket and keeps those inside it (a few percent), and a
    selection among those finishes. The count proves the answer lies inside;
    when it does not (a sample that missed), the full selection runs."""
    m, n = shape
    total = m * n
    keep = max(1, min(total, int(math.floor(density * total + 0.5))))
    step = max(1, CHUNK_ELEMENTS // n)
    chunks = [slice(i, min(i + step, m)) for i in range(0, m, step)]
    if total > 16 * THRESHOLD_SAMPLE:
        idx = torch.randint(total, (THRESHOLD_SAMPLE,), generator=torch.Generator().manual_seed(total))
        sample = entries_at(idx.to(rows_of(slice(0, 1)).device)).abs()
        frac = 1 - keep / total                       # the answer sits at this quantile
        margin = 6 * math.sqrt(max(frac * (1 - frac), 1 / THRESHOLD_SAMPLE) / THRESHOLD_SAMPLE)
        lo = sample.kthvalue(min(THRESHOLD_SAMPLE, max(1, int((frac - margin) * THRESHOLD_SAMPLE)))).values
        hi = sample.kthvalue(min(THRESHOLD_SAMPLE, int(math.ceil((frac + margin) * THRESHOLD_SAMPLE)) + 1)).values
        above, inside = 0, []
        for rows in chunks:
            a = rows_of(rows).abs()
            above += int((a > hi).sum())
            inside.append(a[(a >= lo) & (a <= hi)])
        inside = torch.cat(inside)
        need = keep - above                           # its rank from the top among the inside ones
        if 1 <= need <= inside.numel():
            return float(inside.kthvalue(inside.numel() - need + 1).values)
    everything = torch.cat([rows_of(rows).abs().reshape(-1) for rows in chunks])
    return float(everything.kthvalue(total - keep + 1).values)


def ties_combine(taus: list[torch.Tensor], thresholds: list[float]) -> torch.Tensor:
    """Trim (|τ_k| ≥ its threshold), elect sign(Σ_k trimmed τ_k), disjoint mean."""
    trimmed = [t * (t.abs() >= th) for t, th in zip(taus, thresholds)]
    elected = torch.sign(sum(trimmed))
    total, count = torch.zeros_like(taus[0]), torch.zeros_like(taus[0])
    for t in trimmed:
        # where the elected sign is 0 the "agreeing" entries are zeros: they add 0 to a 0 total
        agree = torch.sign(t) == elected
        total += t * agree
        count += agree
    return total / count.clamp_min(1)


def dare_combine(taus: list[torch.Tensor], drop: float, generators: list[torch.Generator]) -> torch.Tensor:
    """Σ_k τ_k ⊙ mask_k / (1 − q), mask entries kept with probability 1 − q
    (float32 uniforms: half the cost of float64 ones, q resolved to 2⁻²⁴)."""
    out = torch.zeros_like(taus[0])
    for t, g in zip(taus, generators):
        keep = torch.rand(t.shape, generator=g, device=t.device, dtype=torch.float32) >= drop
        out += torch.where(keep, t, torch.zeros_like(t))
    return out / (1.0 - drop)


def _dense(job: _Job, method: str, density: float, drop: float, seed: int, work: torch.dtype):
    """ties/dare on ΔW, then its best rank-p approximation. The sources' task
    vectors are formed CHUNK_ELEMENTS at a time (rows: small chunks stay in
    cache, several times faster than whole-matrix elementwise passes), so memory
    holds the one dense result, never K dense copies. DARE draws each source's
    mask from its own generator chunk after chunk: the same masks whatever the
    chunk size. work: the dense dtype — float64 for a float64 result, else
    float32 (the result's own precision; half the memory traffic), with the
    rank-p step converged to that precision (DENSE_RTOL)."""
    factors = [((s.weight * s.svd.U * s.svd.S).to(work), s.svd.V.T.to(work)) for s in job.sources]
    if method == "ties":
        thresholds = [_kth_largest_abs(lambda rows, a=a, b=b: a[rows] @ b,
                                       lambda idx, a=a, b=b: (a[idx // job.d_in] * b[:, idx % job.d_in].T).sum(1),
                                       (job.d_out, job.d_in), density)
                      for a, b in factors]
    dev = factors[0][0].device
    name_hash = zlib.crc32(job.name.encode())
    gens = [torch.Generator(device=dev).manual_seed((seed * 1_000_003 + name_hash * 7919 + k * 104_729) % (2 ** 63))
            for k in range(len(factors))]
    step = max(1, CHUNK_ELEMENTS // job.d_in)
    dense = torch.empty(job.d_out, job.d_in, dtype=work, device=dev)
    for i in range(0, job.d_out, step):
        rows = slice(i, i + step)
        taus = [a[rows] @ b for a, b in factors]
        dense[rows] = ties_combine(taus, thresholds) if method == "ties" else dare_combine(taus, drop, gens)
    u, s, v = (x.to(torch.float64) for x in
               top_singular(dense, job.rank, seed, rtol=DENSE_RTOL[work], start=job.target.V.to(work)))
    return (*_split(u, s, v), FactoredSVD(u, s, v))


def top_singular(d: torch.Tensor, p: int, seed: int = 0, rtol: float = 1e-10, max_iter: int = 100,
                 start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-p singular triplets (U, S, V) of a dense matrix.

    Block subspace iteration on DDᵀ with a Rayleigh–Ritz step each round,
    stopped when every residual ‖D v_i − σ_i u_i‖ is below rtol·σ_1 — the
    triplets of a dense SVD to that accuracy. A round costs two products with
    D of p+SUBSPACE_OVERSAMPLING columns: Bᵀ = Dᵀq gives the Ritz triplets
    (an SVD of the n×k Bᵀ), and D·Bᵀ = DDᵀq is both the next block and, via
    D v_i = D·Bᵀ·ub_i/σ_i, the residual (Dᵀu_i = σ_i v_i holds by construction).
    start: columns to begin from (e.g. a nearby matrix's right singular
    vectors), completed with seeded random ones. Small problems, or a spectrum
    too flat to converge in max_iter rounds, take the full SVD."""
    m, n = d.shape
    k = min(p + SUBSPACE_OVERSAMPLING, m, n)
    if 2 * k < min(m, n):
        g = torch.Generator(device=d.device).manual_seed(seed)
        omega = torch.randn(n, k, generator=g, dtype=d.dtype, device=d.device)
        if start is not None:
            c = min(int(start.shape[1]), k)
            omega[:, :c] = start[:, :c]
        y = d @ omega
        for _ in range(max_iter):
            q = torch.linalg.qr(y)[0]
            bt = d.T @ q
            y = d @ bt
            v, s, ubh = torch.linalg.svd(bt, full_matrices=False)    # qᵀD = ubhᵀ·S·vᵀ
            ub, sp = ubh[:p].T, s[:p]
            u = q @ ub
            # y·ub/σ loses accuracy for σ far below σ_1: form D·v directly then (rare)
            dv = y @ ub / sp if float(sp[-1]) > 1e-3 * float(s[0]) else d @ v[:, :p]
            if float(torch.linalg.vector_norm(dv - u * sp, dim=0).max()) <= rtol * float(s[0]):
                return u, sp, v[:, :p]
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return u[:, :p], s[:p], vh[:p].T


# ------------------------------------------------------------------ fidelity
def _split_off(basis: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x = basis·c + q·r with q orthonormal and ⊥ basis. One Gram–Schmidt pass
    loses orthogonality when x lies nearly in the span, so a second runs when
    the first removed more than 1 − 1/√2 of some column ("twice is enough",
    Kahan/Parlett); otherwise the second pass only costs time."""
    c = basis.T @ x
    rest = x - basis @ c
    if bool((torch.linalg.vector_norm(rest, dim=-2) < torch.linalg.vector_norm(x, dim=-2) / math.sqrt(2)).any()):
        c2 = basis.T @ rest
        rest = rest - basis @ c2
        c = c + c2
    q, r = torch.linalg.qr(rest)
    return c, q, r


def _error_norm(target: FactoredSVD, up: torch.Tensor, down: torch.Tensor) -> float:
    """‖up·down − U_T·S_T·V_Tᵀ‖_F from factors. With up = U_T·c_u + q_u·r_u and
    downᵀ = V_T·c_d + q_d·r_d ([U_T q_u], [V_T q_d] orthonormal), the difference
    is [U_T q_u]·X·[V_T q_d]ᵀ for a small X, whose norm is the answer: no
    cancellation between ‖ΔW_merge‖² and ‖target‖² (an exact merge reports
    rounding-level error), and only d×r QRs of the merge's own factors."""
    c_u, _, r_u = _split_off(target.U, up)
    c_d, _, r_d = _split_off(target.V, down.T)
    top = c_u @ c_d.T - torch.diag(target.S)
    x = torch.cat([torch.cat([top, c_u @ r_d.T], 1), torch.cat([r_u @ c_d.T, r_u @ r_d.T], 1)], 0)
    return float(torch.linalg.matrix_norm(x))


def _fidelity(job: _Job, up: torch.Tensor, down: torch.Tensor, scale: float, group: str,
              status: str, kstats: dict | None, known: FactoredSVD | None = None,
              error: float | None = None) -> ModuleReport | None:
    """known: the merge's SVD when the method built it (no second factorisation);
    error: ‖ΔW_merge − target‖_F when the method knows it exactly."""
    target = job.target_norm
    if error is None:
        error = _error_norm(job.target, scale * up, down)
    merged = known if known is not None else svd_from_factors(up, down, scale)
    if merged.dead:
        return None
    merged = merged.top(merged.effective_rank)
    kept, phis, energy = {}, {}, {}
    for s in job.sources:
        proj = ((merged.U.T @ s.svd.U) * s.svd.S) @ (s.svd.V.T @ merged.V)
        energy[s.index] = float((s.svd.S ** 2).sum())
        kept[s.index] = float((proj ** 2).sum()) / energy[s.index]
        phis[s.index] = float(phi(merged.U, s.svd.U))
    rel = error / target if target > 0 else (0.0 if error == 0 else None)
    note = "rank lowered to what the sources allow" if job.capped else ""
    return ModuleReport(job.name, group, status, [s.index for s in job.sources], int(down.shape[0]),
                        target, error, rel, energy, kept, phis, kstats, note)


# ------------------------------------------------------------------ entry point
def merge(loras: list[LoraFile], weights=None, method: str = "karcher", rank: int | None = None,
          dtype: torch.dtype = torch.float32, seed: int = 0, ties_density: float = 0.2,
          dare_drop: float = 0.5, naming: str = "first", distance: str = "geodesic",
          device: torch.device | str | None = None, batched: bool | None = None,
          threads: int | None = 1, tol: float | None = None, max_iter: int = 50,
          progress: Callable[[int, int], None] | None = None) -> MergeResult:
    """Merge LoRAs of one base model into one LoRA; see the module docstring.

    dtype: factor dtype of the result (computation is float64, except the dense
    ties/dare step, float32 unless dtype is float64). ties_density:
    fraction of each task vector TIES keeps (paper default 0.2). dare_drop: DARE
    drop probability q (0.5: the papers' 0.9 was for full fine-tune deltas).
    naming: "first" writes keys spelled as in the first source when it is a
    kohya/LyCORIS file, else kohya names (ComfyUI maps both); "kohya" always
    kohya. distance: "geodesic" (Karcher mean) or "chordal" (extrinsic mean).
    device: default core.device.default_device(). batched: stack modules of
    equal shape for the Karcher means (default: on CUDA only; a plain loop
    measured faster on the CPU). threads: CPU intra-op threads during the merge
    (restored after; None leaves torch's setting). tol, max_iter: Karcher stop.
    progress(done, total) is called after each module is merged and measured
    (total = modules to merge); raising inside it stops the merge (how ComfyUI
    cancels): the exception propagates and nothing is returned.
    """
    if method not in METHODS:
        raise LoraError(f"unknown merge method '{method}' (choose from {', '.join(METHODS)})")
    if naming not in NAMINGS:
        raise LoraError(f"unknown naming '{naming}' (choose from {', '.join(NAMINGS)})")
    if distance not in DISTANCES:
        raise LoraError(f"no Karcher mean offered for distance '{distance}' (supported: {', '.join(DISTANCES)})")
    if not loras:
        raise LoraError("no LoRAs to merge")
    if method == "ties" and not 0 < ties_density <= 1:
        raise LoraError(f"ties density must be in (0, 1], got {ties_density}")
    if method == "dare" and not 0 <= dare_drop < 1:
        raise LoraError(f"dare drop probability must be in [0, 1), got {dare_drop}")
    w = _check_weights(loras, weights, method)
    family = require_same_base(loras)
    dev = torch.device(device) if device is not None else default_device()
    if batched is None:
        batched = dev.type == "cuda"
    specs = _specs(loras, w)
    _check_rank_request(specs, loras, method, rank)
    with linalg_threads(threads if dev.type == "cpu" else None):
        report = MergeReport(method, w, rank, family, [lora.name for lora in loras],
                             distance if method == "karcher" else None)
        groups = arch_for(family).groups if family in TABLE_FAMILIES else {}
        done: dict[str, tuple[ModuleReport, LoraModule, bool] | None] = {}
        dead: set[str] = set()
        dense_dtype = torch.float64 if dtype == torch.float64 else torch.float32   # ties/dare
        for job, result in _run(specs, loras, w, method, rank, dev, distance, tol, max_iter, batched,
                                ties_density, dare_drop, seed, dense_dtype):
            if result is None:
                dead.add(job)
            else:
                up, down, scale, kstats, known, error = result
                status = ("copied" if len(job.sources) == 1 else
                          "merged" if len(job.sources) == sum(x != 0 for x in w) else "partial")
                mod = _fidelity(job, up, down, scale, groups.get(job.name, module_part(job.name)), status,
                                kstats, known, error)
                done[job.name] = None if mod is None else (
                    mod, _merged(*job.lift(up, down), job, dtype, scale,
                                 job.sources[0].module.rank if status == "copied" else None), job.capped)
            if progress is not None:
                progress(len(done) + len(dead), len(specs))
    if not done:
        raise LoraError("nothing to merge: every module is dead (ΔW = 0) or has weight 0 in every source")
    if dead:
        report.skipped["dead"] = [name for name in specs if name in dead]
    out = LoraFile(path=f"merged-{method}.safetensors", format="kohya", family=family)
    cancelled = []
    for name in specs:                                # report and file in module order
        if name in dead:
            continue
        if done[name] is None:
            cancelled.append(name)
            continue
        mod, module, capped = done[name]
        report.modules.append(mod)
        out.modules[name] = module
        if capped:
            report.capped.append(name)
    if cancelled:
        report.skipped["cancelled"] = cancelled
    _warn(report)
    key_names = _first_naming(loras[0], out) if naming == "first" else {}
    if naming == "first" and loras[0].format not in KOHYA_LIKE:
        report.warnings.append(f"{loras[0].name} is a {loras[0].format} file; keys are written with "
                               "kohya names, which ComfyUI maps the same way")
    out.metadata[RECIPE_KEY] = json.dumps(_recipe(loras, report, method, rank, seed, ties_density, dare_drop))
    return MergeResult(out, report, key_names)


KARCHER_BATCH = 64      # modules of one coordinate shape stacked per batched Karcher call


def _run(specs, loras, w, method, rank, dev, distance, tol, max_iter, batched, density, drop, seed, dense_dtype):
    """Prepares and merges one module at a time. Yields (job, (up, down, scale,
    karcher stats, the result's SVD if known, its error if known)) on the compute
    device, float64 (in frame coordinates for jobs with frames), or (name, None)
    for a module dead in every source. Batched Karcher jobs come when their batch
    is done."""
    work = _Workspace()
    pending: dict[tuple, list[_Job]] = {}

    def karcher(group: list[_Job]):
        for job, (up, down, stats, known, error) in zip(group, _karcher(group, distance, tol, max_iter)):
            yield job, (up, down, 1.0, stats, known, error)

    for name, ks in specs.items():
        job = _prepare(name, ks, loras, w, dev, method, work)
        if job is None:
            yield name, None
            continue
        _set_rank(job, method, rank)
        if len(job.sources) == 1:                      # only one source: its own factors, weighted
            s = job.sources[0]
            yield job, (s.module.up.to(dev, torch.float64), s.module.down.to(dev, torch.float64),
                        s.weight * s.module.scale, None, None, None)
        elif method in ("linear", "concat"):
            yield job, (*_linear(job, dev), 1.0, None, None, None)
        elif method == "svd":
            up, down, known, error = _svd(job)
            yield job, (up, down, 1.0, None, known, error)
        elif method in ("ties", "dare"):
            up, down, known = _dense(job, method, density, drop, seed, dense_dtype)
            yield job, (up, down, 1.0, None, known, None)
        elif not batched:
            yield from karcher([job])
        else:
            key = (job.sources[0].svd.U.shape[0], job.sources[0].svd.V.shape[0], job.rank, len(job.sources))
            pending.setdefault(key, []).append(job)
            if len(pending[key]) >= KARCHER_BATCH:
                yield from karcher(pending.pop(key))
    for group in pending.values():
        yield from karcher(group)


def _warn(report: MergeReport) -> None:
    if report.method == "karcher":
        bad = [m for m in report.modules if m.karcher and not all(s["unique"] for s in m.karcher.values())]
        if bad:
            worst = max(max(s["max_angle_deg"] for s in m.karcher.values()) for m in bad)
            report.warnings.append(
                f"Karcher mean not unique in {len(bad)} of {len(report.modules)} module(s): sources lie up "
                f"to {worst:.0f}° (principal angle) from the mean, beyond the π/4 = 45° ball where it is "
                f"unique (Afsari 2011); deterministic choice: {DETERMINISTIC_CHOICE}")
        slow = [m for m in report.modules if m.karcher and not all(s["converged"] for s in m.karcher.values())]
        if slow:
            grad = max(s["grad_norm"] for m in slow for s in m.karcher.values())
            report.warnings.append(f"Karcher iteration stopped before the gradient tolerance in {len(slow)} "
                                   f"module(s) (largest gradient norm {grad:.1e} rad)")
    if "cancelled" in report.skipped:
        report.warnings.append(f"{len(report.skipped['cancelled'])} module(s) cancel to zero and were left out")


def _first_naming(first: LoraFile, out: LoraFile) -> dict[str, str]:
    """canonical name -> key stem the first source used, for kohya-like files."""
    if first.format not in KOHYA_LIKE:
        return {}
    stems = {}
    for name in out.modules:
        m = first.modules.get(name)
        if m is not None and m.source_keys:
            stems[name] = m.source_keys[0].split(".", 1)[0]
    return stems


def file_sha256(path: str) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _recipe(loras, report: MergeReport, method, rank, seed, density, drop) -> dict:
    s = report.summary()
    recipe = {"tool": f"grassmann-lora {__version__}", "method": method, "weights": report.weights,
              "rank": rank, "sources": [{"name": lora.name, "sha256": file_sha256(lora.path)} for lora in loras],
              "fidelity": {k: s[k] for k in ("rel_error", "rel_error_max", "kept", "phi", "status", "skipped")}}
    if method == "karcher":
        recipe["distance"] = report.distance
        recipe["fidelity"]["karcher"] = s.get("karcher")
    if method == "ties":
        recipe["ties_density"] = density
    if method == "dare":
        recipe.update(dare_drop=drop, seed=seed)
    return recipe


__all__ = ["METHODS", "NAMINGS", "RECIPE_KEY", "MergeReport", "MergeResult", "ModuleReport", "merge",
           "ties_threshold", "ties_combine", "dare_combine", "file_sha256"]
