"""One module's merge job: its live sources' exact SVDs, in coordinates of
orthonormal frames of the stacked factors when the method works there.

With frames (framed methods, several sources), every source SVD, the target
Σ w_k ΔW_k and the merge live in coordinates of orthonormal frames of
span[up_1 … up_K] and span[down_1ᵀ … down_Kᵀ] (core.factored.frame: one Gram
product per side; n ≤ Σr each), so all work after the two Grams is on n×n
matrices whatever d; Job.lift maps the merged factors back.

Jobs are built just before their module is merged, so a whole-LoRA merge
holds one module's working state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..factored import (FactoredSVD, Frame, GramFactored, frame, gram_factored, module_svd, modules_svd, pad_rows,
                        svd_from_factors)
from ..lora import LoraFile, LoraModule


class Source:
    """A live source of a job: ΔW_k (its weight apart) in the job's frame
    coordinates when the job has frames, else in the module's space.

    form: what the merges and the report read — energy, column basis, factors
    (core.factored: FactoredSVD's and GramFactored's shared measures). In frames
    it is a GramFactored of the source's own columns of the frame coordinates
    when both its Grams are well conditioned (two r×r Cholesky factors, no
    SVD), else its exact SVD. svd: its exact thin SVD at effective rank, taken
    on first use (the rules built on per-source singular vectors: tsv, the
    means, normalise)."""

    def __init__(self, index: int, weight: float, module: LoraModule, label: str = "",
                 svd: FactoredSVD | None = None, gram: GramFactored | None = None,
                 exact: Callable[[], FactoredSVD] | None = None):
        self.index, self.weight, self.module, self.label = index, weight, module, label
        self._svd, self.gram, self._exact = svd, gram, exact

    @property
    def svd(self) -> FactoredSVD:
        if self._svd is None:
            res = self._exact()
            self._svd = res.top(res.effective_rank)
        return self._svd

    @property
    def form(self) -> FactoredSVD | GramFactored:
        return self.gram if self.gram is not None else self.svd

    @property
    def rank(self) -> int:
        return self.gram.rank if self.gram is not None else int(self.svd.S.numel())


@dataclass
class Merged:
    """A method's answer for one module, on the compute device, float64 (in frame
    coordinates for jobs with frames): ΔW_merge = scale·up·down. stats: the
    method's own per-module figures for the report (karcher: per side);
    known: the merge's SVD when the method built it; error: ‖ΔW_merge − target‖_F
    when the method knows it exactly (both spare the report a factorisation);
    truncation: ‖result − its rank-p truncation‖ / ‖result‖ for rules truncated
    after the fact (core.merge.truncate); spans: orthonormal bases of the merge's
    column and row spaces when the method knows them without its SVD (all the
    report needs; the report only projects the sources onto them, so a row basis
    leaving the frame, KnOTS's, comes projected onto it); module_space: up/down
    are already in the module's space (no lift)."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0
    stats: dict | None = None
    known: FactoredSVD | None = None
    error: float | None = None
    truncation: float | None = None
    spans: tuple[torch.Tensor, torch.Tensor] | None = None
    module_space: bool = False


@dataclass
class Job:
    """One module to merge (see the module docstring)."""

    name: str
    shape: tuple[int, ...]
    sources: list[Source]      # live sources with nonzero weight
    rank: int = 0
    capped: bool = False
    frames: tuple[Frame, Frame] | None = None
    members: list[LoraModule] = field(default_factory=list)   # the modules the frames were built from
    workspace: "Workspace | None" = None
    _target: FactoredSVD | None = None
    _core: torch.Tensor | None = None

    @property
    def target(self) -> FactoredSVD:
        """Exact thin SVD of Σ w_k ΔW_k: of the n×n core in frame coordinates,
        else from one QR pair of the stacked factors."""
        if self._target is None:
            if self.frames is None:
                self._target = svd_from_factors(*target_factors(self))
            else:
                u, s, vh = torch.linalg.svd(self.target_core, full_matrices=False)
                self._target = FactoredSVD(u, s, vh.transpose(-1, -2))
        return self._target

    @property
    def target_core(self) -> torch.Tensor:
        """Σ w_k ΔW_k in frame coordinates (n_out×n_in), formed once: from the
        frames' coordinates when every member is a Gram-measured source (its
        columns of the coordinates are its factors), else from target_factors."""
        if self._core is None:
            if len(self.sources) == len(self.members) and all(s.gram is not None for s in self.sources):
                self._core = _coords_core(self.frames, [(s.weight * s.gram.scale, s.rank) for s in self.sources])
            else:
                up, down = target_factors(self)
                self._core = up @ down
        return self._core

    def core_error(self, res: FactoredSVD) -> float:
        """‖U·S·Vᵀ − Σ w_k ΔW_k‖_F for a result in frame coordinates: one small
        difference matrix (the coordinates are isometries; no cancellation between
        ‖ΔW_merge‖² and ‖target‖², an exact merge reports rounding-level error)."""
        return float(torch.linalg.matrix_norm((res.U * res.S) @ res.V.T - self.target_core))

    @property
    def target_norm(self) -> float:
        """‖Σ w_k ΔW_k‖_F: of the small core in frames (no SVD needed), else from the target's SVD."""
        if self.frames is None:
            return self.target.frobenius()
        return float(torch.linalg.matrix_norm(self.target_core))

    def lift(self, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged factors from frame coordinates to the module's space."""
        return self.lift_up(up), self.lift_down(down)

    def lift_up(self, up: torch.Tensor) -> torch.Tensor:
        """An up factor (columns) from output-frame coordinates to the module's space."""
        return up if self.frames is None else self.frames[0].lift(up, self._stacked(up)[0])

    def lift_down(self, down: torch.Tensor) -> torch.Tensor:
        """A down factor (rows) from input-frame coordinates to the module's space."""
        return down if self.frames is None else self.frames[1].lift_rows(down, self._stacked(down)[1].T)

    def input_coords(self, v: torch.Tensor) -> torch.Tensor:
        """Input-frame coordinates of the projection of v (d_in×k, the module's space) onto the frame."""
        return v if self.frames is None else self.frames[1].coords_of(v, self._stacked(v)[1])

    def _stacked(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return stacked(self.members, like.device, self.workspace)    # the buffers' copy when they still hold it

    def module(self, up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype, scale: float = 1.0,
               rank: int | None = None) -> LoraModule:
        """The merged LoraModule (factors lifted to the module's space by the caller), on the CPU."""
        r = int(down.shape[0])
        return LoraModule(self.name, up.to("cpu", dtype).contiguous(), down.to("cpu", dtype).contiguous(),
                          scale, rank or r, scale * r, self.shape, "lora", dtype=dtype)

    @property
    def d_out(self) -> int:
        return self.sources[0].module.d_out

    @property
    def d_in(self) -> int:
        return self.sources[0].module.d_in


class Workspace:
    """Reusable float64 buffers for the stacked factors, one per shape: the
    d×Σr stacks are the largest temporaries of a merge, and fresh allocations of
    them fault in new pages module after module (measured: the conversions took
    ten times longer than the copies into a kept buffer once memory was
    fragmented)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.holds: dict[tuple, list] = {}     # per buffer: the modules it was last filled from

    def get(self, shape: tuple[int, int], dev: torch.device, slot: str) -> torch.Tensor:
        key = (slot, shape, str(dev))
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, dtype=torch.float64, device=dev)
        return self.buffers[key]


def stacked(modules: list[LoraModule], dev: torch.device, work: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """[up_1 … up_K] (d_out×Σr) and [down_1ᵀ … down_Kᵀ] (d_in×Σr), float64, unscaled,
    in the workspace's buffers (valid until the next call for the same shape)."""
    total = sum(m.factor_rank for m in modules)
    ups = work.get((modules[0].d_out, total), dev, "up")
    downs = work.get((total, modules[0].d_in), dev, "down")   # stacked along rows, used transposed
    keys = [("up", tuple(ups.shape), str(dev)), ("down", tuple(downs.shape), str(dev))]
    if all(len(work.holds.get(k, ())) == len(modules) and all(a is b for a, b in zip(work.holds[k], modules))
           for k in keys):
        return ups, downs.T          # both still filled from these very modules (the job's lift after its frames)
    for k in keys:
        work.holds[k] = list(modules)
    start = 0
    for m in modules:
        ups[:, start:start + m.factor_rank].copy_(m.up)
        downs[start:start + m.factor_rank].copy_(m.down)
        start += m.factor_rank
    return ups, downs.T


def framed_sources(modules: list[LoraModule], dev: torch.device, work: Workspace
                   ) -> tuple[tuple[Frame, Frame], list[tuple[GramFactored | None, Callable[[], FactoredSVD]]]]:
    """Frames of the stacked factors and per module its GramFactored in their
    coordinates (None when its Grams are near-singular or it is nearly dead;
    both coordinates are upper triangular, so module k's columns end at row
    k's last column: GramFactored.rows) and a function giving its exact SVD there."""
    xs = stacked(modules, dev, work)
    frames = (frame(xs[0]), frame(xs[1]))
    ranks = [m.factor_rank for m in modules]
    bounds = [sum(ranks[:k]) for k in range(len(ranks) + 1)]
    coords = [f.coords for f in frames]
    if len(set(ranks)) == 1:                     # the usual case: one batched call for all sources
        grams = gram_factored(*(c.reshape(c.shape[0], len(ranks), ranks[0]).permute(1, 0, 2) for c in coords),
                              [m.scale for m in modules], bounds[1:])
    else:
        grams = [gram_factored(*(c[None, :, i:j] for c in coords), [m.scale], [j])[0]
                 for m, i, j in zip(modules, bounds, bounds[1:])]
    exact = [lambda m=m, i=i, j=j: _svd_upper(coords[0][:, i:j], coords[1][:, i:j], m.scale, j)
             for m, i, j in zip(modules, bounds, bounds[1:])]
    return frames, list(zip(grams, exact))


def _svd_upper(a: torch.Tensor, b: torch.Tensor, scale: float, stop: int) -> FactoredSVD:
    """Exact SVD of scale·a·bᵀ for a source's columns a, b of the frame
    coordinates: both upper triangular (Cholesky or QR factor), so the columns
    are zero below row `stop` (the source's last column + 1) and its QRs run on
    those rows only."""
    res = svd_from_factors(a[:min(stop, a.shape[0])], b[:min(stop, b.shape[0])].T, scale)
    return FactoredSVD(pad_rows(res.U, a.shape[0]), res.S, pad_rows(res.V, b.shape[0]))


def prepare(name: str, ks: list[int], loras: list[LoraFile], w: list[float], dev: torch.device,
            framed: bool, work: Workspace) -> Job | None:
    """The job for one module: its live sources (in frames for several sources of a
    framed method), or None when every source is dead there."""
    modules = [loras[k].modules[name] for k in ks]
    frames = None
    live = []
    if framed and len(ks) > 1:
        frames, found = framed_sources(modules, dev, work)
        for k, m, (gram, exact) in zip(ks, modules, found):
            if gram is not None:
                live.append(Source(k, w[k], m, loras[k].name, gram=gram, exact=exact))
                continue
            res = exact()
            if not res.dead:
                live.append(Source(k, w[k], m, loras[k].name, svd=res.top(res.effective_rank)))
    else:
        live = [Source(k, w[k], m, loras[k].name, svd=res.top(res.effective_rank))
                for k, m, res in zip(ks, modules, modules_svd(modules, device=dev)) if not res.dead]
    if not live:
        return None
    if frames is not None and len(live) == 1:     # copied: its SVD in the module's space
        only = live[0]
        res = module_svd(only.module, device=dev)
        live, frames = [Source(only.index, only.weight, only.module, only.label, svd=res.top(res.effective_rank))], None
    return Job(name, live[0].module.weight_shape, live, frames=frames,
               members=modules if frames is not None else [], workspace=work if frames is not None else None)


def _coords_core(frames: tuple[Frame, Frame], columns: list[tuple[float, int]]) -> torch.Tensor:
    """Σ_k c_k·A_k·B_kᵀ for the frames' coordinates A = [A_1 …], B = [B_1 …] and
    (c_k, width of block k) in order. Both coordinates are upper triangular, so
    block k lives in the leading rows up to its last column: the product is a
    sum of growing leading blocks, about half the flops of A·diag(c)·Bᵀ."""
    out, inn = (f.coords for f in frames)
    core = out.new_zeros(out.shape[0], inn.shape[0])
    start = 0
    for c, width in columns:
        stop = start + width
        i, j = min(stop, out.shape[0]), min(stop, inn.shape[0])
        core[:i, :j].addmm_(out[:i, start:stop], inn[:j, start:stop].T, alpha=c)
        start = stop
    return core


def split(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """up = U·√S, down = √S·Vᵀ: both factors carry half the magnitude (fp16-friendly)."""
    r = s.clamp_min(0).sqrt().unsqueeze(-2)
    return u * r, (v * r).transpose(-1, -2)


def target_factors(job: Job) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ w_k ΔW_k as stacked factors [w_k·left_k], [right_kᵀ] (exact, effective ranks)."""
    pairs = [s.form.factors() for s in job.sources]
    return (torch.cat([s.weight * left for s, (left, _) in zip(job.sources, pairs)], 1),
            torch.cat([right.T for _, right in pairs], 0))
