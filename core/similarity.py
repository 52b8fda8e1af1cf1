"""Compare two LoRAs module by module: φ, principal angles, Grassmann distances.

For every module both files adapt (matched by canonical name, whatever format
each file came in), the factored SVD of each ΔW (never ΔW itself) gives
orthonormal singular-vector bases on the output side (U, column space) and
the input side (V, row space). Each LoRA contributes its top-p vectors,
p = its effective rank (or ``top`` when asked). Per module and side we report
φ(p_a, p_b) with its chance level, the principal angles and every distance in
``core.measures`` (common-dimension convention, plus the Ye–Lim cross-rank
geodesic). Dead modules (ΔW = 0 in either file) are reported with status
"dead" and no numbers; modules present in only one file are counted.

Aggregates per block group and overall: mean/median φ and mean geodesic
weighted by module count, and a φ mean weighted by √(‖ΔW_a‖_F·‖ΔW_b‖_F), so
modules a LoRA barely changes count less. The report says which is which.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .device import check_device, linalg_threads
from .errors import LoraError
from .factored import FactoredSVD, factor_qr, module_svd
from .formats import require_same_base
from .grassmann import principal_angles
from .lora import LoraFile, module_part
from .measures import DISTANCES, HALF_PI, chance_grid, chance_phi, cross_rank_geodesic, distances, \
    phi_from_cosines, phi_grid
from .save import write_text
from .sdarch import arch_for
from .workers import ordered_map, worker_count

SIDES = ("out", "in")
SIDE_WORDS = {"out": "output side (column space, left singular vectors)",
              "in": "input side (row space, right singular vectors)"}
WEIGHTS = {
    "phi_mean": "module count (every live module counts once)",
    "phi_median": "module count",
    "phi_mean_weighted": "sqrt(||dW_a||_F * ||dW_b||_F) of each module",
    "geodesic_mean": "module count",
    "chance_mean": "module count",
}


_BLOCK = re.compile(r"(down_blocks|up_blocks|input_blocks|output_blocks|middle_block|mid_block|"
                    r"double_blocks|single_blocks|joint_blocks|transformer_blocks|layers|blocks)_(\d+)")
_KIND = re.compile(r"(attn1|attn2|img_attn|txt_attn|self_attn|attn|img_mlp|txt_mlp|mlp|ff|"
                   r"resnets|linear1|linear2|proj_in|proj_out)")


def guess_group(name: str) -> str:
    """Block-group label for names without an architecture table (e.g. Flux):
    part + block kind (+ index for U-Net levels) + layer kind."""
    part = module_part(name)
    block = _BLOCK.search(name)
    kind = _KIND.search(name)
    words = [part]
    if block:
        base = block.group(1).replace("_blocks", "").replace("_block", "")
        words.append(base if base in ("double", "single", "joint", "transformer", "layers") else
                     f"{base}{block.group(2)}")
    if kind:
        words.append(kind.group(1))
    return " ".join(words) if len(words) > 1 else part


def _file_info(f: LoraFile) -> dict:
    return {"path": f.path, "name": f.name, "format": f.format, "family": f.family,
            "family_label": f.family_label, "n_modules": len(f.modules), "ranks": f.ranks(),
            "alphas": f.alphas(), "parts": f.parts()}


def _json_number(x: float | None):
    """JSON has no inf/NaN: inf (Martin at a right angle) is written as the string 'inf'."""
    if x is None:
        return None
    return "inf" if math.isinf(x) else float(x)


@dataclass
class ModuleResult:
    module: str
    group: str
    side: str
    d: int
    status: str                      # "ok" | "dead"
    rank_a: int                      # ranks actually compared (effective, or top)
    rank_b: int
    nominal_rank_a: int
    nominal_rank_b: int
    norm_a: float                    # ‖ΔW‖_F, from the singular values
    norm_b: float
    depth: int
    dead_in: str | None = None       # "a" | "b" | "both" when status == "dead"
    phi: float | None = None
    chance: float | None = None
    angles_deg: list[float] = field(default_factory=list)
    distances: dict[str, float] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.status == "ok"

    @property
    def phi_above_chance(self) -> float:
        """(φ − chance)/(1 − chance): 0 at chance, 1 for equal subspaces, so
        modules of different widths compare fairly (raw φ mostly ranks by d)."""
        return (self.phi - self.chance) / (1.0 - self.chance) if self.chance < 1.0 else 0.0

    def to_dict(self) -> dict:
        out = {"module": self.module, "group": self.group, "side": self.side, "status": self.status,
               "rank_a": self.rank_a, "rank_b": self.rank_b, "nominal_rank_a": self.nominal_rank_a,
               "nominal_rank_b": self.nominal_rank_b, "d": self.d,
               "norm_a": self.norm_a, "norm_b": self.norm_b}
        if self.live:
            out.update({"phi": self.phi, "chance": self.chance,
                        "phi_over_chance": self.phi / self.chance,
                        "phi_above_chance": self.phi_above_chance,
                        "rank_deficient": self.rank_a < self.nominal_rank_a or
                        self.rank_b < self.nominal_rank_b,
                        "angles_deg": self.angles_deg,
                        "distances": {k: _json_number(v) for k, v in self.distances.items()}})
        else:
            out["dead_in"] = self.dead_in
        return out


def _aggregate(results: list[ModuleResult]) -> dict:
    live = [r for r in results if r.live]
    out: dict = {"n_modules": len(results), "n_live": len(live), "n_dead": len(results) - len(live)}
    if not live:
        return out
    phis = [r.phi for r in live]
    w = [math.sqrt(r.norm_a * r.norm_b) for r in live]
    out.update({
        "phi_mean": statistics.fmean(phis),
        "phi_median": statistics.median(phis),
        "phi_mean_weighted": (sum(p * x for p, x in zip(phis, w)) / sum(w)) if sum(w) > 0 else None,
        "chance_mean": statistics.fmean(r.chance for r in live),
        "geodesic_mean": statistics.fmean(r.distances["geodesic"] for r in live),
    })
    out["phi_over_chance"] = out["phi_mean"] / out["chance_mean"]
    return out


@dataclass
class SimilarityReport:
    a: LoraFile
    b: LoraFile
    side: str
    top: int | None
    results: list[ModuleResult]
    only_in_a: list[str]
    only_in_b: list[str]
    _svd_cache: dict = field(default_factory=dict, repr=False)

    # -------------------------------------------------------------- selection
    @property
    def sides(self) -> tuple[str, ...]:
        return SIDES if self.side == "both" else (self.side,)

    def for_side(self, side: str) -> list[ModuleResult]:
        return [r for r in self.results if r.side == side]

    def module(self, name: str, side: str | None = None) -> ModuleResult:
        side = side or self.sides[0]
        for r in self.results:
            if r.module == name and r.side == side:
                return r
        raise LoraError(f"module not shared by both LoRAs (or side '{side}' not compared)",
                        self.a.path, name)

    # -------------------------------------------------------------- aggregates
    def groups(self) -> list[dict]:
        out = []
        for side in self.sides:
            by_group: dict[str, list[ModuleResult]] = {}
            for r in self.for_side(side):
                by_group.setdefault(r.group, []).append(r)
            for g, rs in by_group.items():
                out.append({"group": g, "side": side, **_aggregate(rs)})
        return out

    def summary(self, n_extremes: int = 5) -> dict:
        per_side = {}
        for side in self.sides:
            rs = self.for_side(side)
            live = sorted((r for r in rs if r.live), key=lambda r: -r.phi_above_chance)
            agg = _aggregate(rs)
            agg["most_similar"] = [_extreme(r) for r in live[:n_extremes]]
            agg["least_similar"] = [_extreme(r) for r in live[::-1][:n_extremes]]
            per_side[side] = agg
        return {"shared": len({r.module for r in self.results}),
                "only_in_a": len(self.only_in_a), "only_in_b": len(self.only_in_b),
                "only_in_a_modules": self.only_in_a, "only_in_b_modules": self.only_in_b,
                "side": self.side, "top": self.top,
                "rank_rule": "top-p singular vectors, p = the module's effective rank"
                             + (f" capped at --top {self.top}" if self.top else ""),
                "different_ranks": "phi divides by min(rank_a, rank_b); distances use the "
                                   "min(rank_a, rank_b) principal angles (common dimension); "
                                   "geodesic_cross_rank is Ye & Lim's sqrt(|k-l| pi^2/4 + sum theta^2)",
                "chance_rule": "E[phi] for independent random subspaces = max(rank_a, rank_b) / d",
                "ranking": "most/least similar by phi above chance, (phi - chance) / (1 - chance)",
                "weights": WEIGHTS, "sides": per_side}

    def to_dict(self) -> dict:
        return {"a": _file_info(self.a), "b": _file_info(self.b),
                "modules": [r.to_dict() for r in self.results],
                "groups": self.groups(), "summary": self.summary()}

    def to_json(self, path: str | None = None, indent: int | None = 1, overwrite: bool = False) -> str:
        """JSON text; written by core.save's rules to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path:
            write_text(path, text, overwrite)
        return text

    # -------------------------------------------------------------- text
    def text_summary(self, n_extremes: int = 5, groups: bool = False) -> str:
        s = self.summary(n_extremes)
        lines = [f"A: {self.a.name} ({self.a.family_label}, {self.a.format}, {len(self.a.modules)} modules, "
                 f"rank {_ranks(self.a)})",
                 f"B: {self.b.name} ({self.b.family_label}, {self.b.format}, {len(self.b.modules)} modules, "
                 f"rank {_ranks(self.b)})",
                 f"Shared modules: {s['shared']} (only in A: {s['only_in_a']}, only in B: {s['only_in_b']})"]
        for side in self.sides:
            agg = s["sides"][side]
            lines.append("")
            lines.append(f"{SIDE_WORDS[side].capitalize()}:")
            dead = f", {agg['n_dead']} dead (ΔW = 0) not scored" if agg["n_dead"] else ""
            if not agg["n_live"]:
                lines.append(f"  no live module in common{dead}")
                continue
            lines.append(f"  φ = {agg['phi_mean']:.4f} mean, {agg['phi_median']:.4f} median over "
                         f"{agg['n_live']} modules{dead}; chance {agg['chance_mean']:.4f} "
                         f"→ {agg['phi_over_chance']:.1f}× chance")
            lines.append(f"  φ weighted by √(‖ΔW_a‖·‖ΔW_b‖): {agg['phi_mean_weighted']:.4f}; "
                         f"mean geodesic distance {agg['geodesic_mean']:.3f} rad")
            lines.append(f"  {_verdict(agg['phi_over_chance'])}")
            width = max(len(e["module"]) for e in agg["most_similar"] + agg["least_similar"])
            lines.append("  ranked by score = (φ − chance) / (1 − chance): 0 at chance, 1 identical")
            for title, key in (("most similar", "most_similar"), ("least similar", "least_similar")):
                lines.append(f"  {title}:")
                for e in agg[key]:
                    lines.append(f"    {e['module']:<{width}}  score {e['phi_above_chance']:+.4f}  "
                                 f"φ {e['phi']:.4f}  (chance {e['chance']:.4f})")
        if groups:
            lines.append("")
            lines.append("Groups (φ mean / median, chance, mean geodesic; count-weighted):")
            for g in self.groups():
                if g["n_live"]:
                    lines.append(f"  [{g['side']:>3}] {g['group']:<22} n={g['n_live']:<4} φ {g['phi_mean']:.4f} / "
                                 f"{g['phi_median']:.4f}  chance {g['chance_mean']:.4f}  "
                                 f"geodesic {g['geodesic_mean']:.3f}")
        return "\n".join(lines)

    # -------------------------------------------------------------- φ grid
    def _bases(self, name: str, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.module(name, side)
        if not r.live:
            raise LoraError(f"module is dead (ΔW = 0 in {r.dead_in}); it has no subspace to compare",
                            self.a.path if r.dead_in in ("a", "both") else self.b.path, name)
        with torch.no_grad():
            svd_a = _cached_svd(self._svd_cache, "a", self.a, name)
            svd_b = _cached_svd(self._svd_cache, "b", self.b, name)
        return _basis(svd_a, side, r.rank_a), _basis(svd_b, side, r.rank_b)

    def phi_grid(self, name: str, side: str | None = None) -> np.ndarray:
        """φ(i, j) for i ≤ rank_a, j ≤ rank_b (entry [i-1, j-1]) for one module."""
        side = side or self.sides[0]
        x, y = self._bases(name, side)
        return phi_grid(x, y).numpy()

    def grid_image(self, name: str, side: str | None = None):
        from .plot import Panel, heatmap
        side = side or self.sides[0]
        grid = self.phi_grid(name, side)
        r = self.module(name, side)
        k, l = grid.shape
        title = (f"φ(i, j), {side} side: {name}  (top-i of A × top-j of B; "
                 f"φ({k},{l}) = {grid[-1, -1]:.3f}, chance {r.chance:.3f})")
        return heatmap(grid, [str(i) for i in range(1, k + 1)], [str(j) for j in range(1, l + 1)],
                       title=title, panels=[Panel(l, 0.0, 1.0, "φ(i, j) (high = similar)",
                                                  marks=((r.chance, f"chance {r.chance:.3g}"),))])

    def chance_grid(self, name: str, side: str | None = None) -> np.ndarray:
        r = self.module(name, side or self.sides[0])
        return chance_grid(r.rank_a, r.rank_b, r.d).numpy()

    # -------------------------------------------------------------- heatmap
    def measure_table(self) -> tuple[np.ndarray, list[str], list[str]]:
        """Modules in depth order × (φ and each bounded distance ÷ its largest
        possible value for that rank), per compared side; dead modules are NaN.
        Martin is left out: it is unbounded (∞ at a right angle)."""
        depth = {r.module: r.depth for r in self.results}
        names = sorted(depth, key=depth.__getitem__)
        cols = [c for c in ("phi",) + DISTANCES if c != "martin"]
        labels = [f"{side} {c}" if len(self.sides) > 1 else c for side in self.sides for c in cols]
        table = np.full((len(names), len(labels)), np.nan)
        row = {n: i for i, n in enumerate(names)}
        for r in self.results:
            if not r.live:
                continue
            base = self.sides.index(r.side) * len(cols)
            p = min(r.rank_a, r.rank_b)
            for c_i, c in enumerate(cols):
                v = r.phi if c == "phi" else r.distances[c] / _max_distance(c, p)
                table[row[r.module], base + c_i] = v
        return table, names, labels

    def heatmap_image(self):
        """Two panels with their own scales: φ (high = similar) beside its chance
        level per module, on a scale that ends at the largest of them, with the
        mean chance marked; then the distances ÷ their maximum (high = different)."""
        from .plot import Panel, heatmap
        if not self.results:
            raise LoraError(f"{self.a.name} and {self.b.name} share no module: there is no heatmap to draw",
                            self.a.path)
        table, names, labels = self.measure_table()
        per_side = len(labels) // len(self.sides)
        row = {n: i for i, n in enumerate(names)}
        chance = np.full((len(names), len(self.sides)), np.nan)
        for r in self.results:
            if r.live:
                chance[row[r.module], self.sides.index(r.side)] = r.chance
        phi_cols, dist_cols, phi_labels, dist_labels = [], [], [], []
        for k, side in enumerate(self.sides):
            prefix = f"{side} " if len(self.sides) > 1 else ""
            phi_cols += [table[:, k * per_side], chance[:, k]]
            phi_labels += [f"{prefix}phi", f"{prefix}chance"]
            dist_cols += [table[:, k * per_side + c] for c in range(1, per_side)]
            dist_labels += labels[k * per_side + 1:(k + 1) * per_side]
        values = np.column_stack(phi_cols + dist_cols)
        finite = values[:, :len(phi_cols)][np.isfinite(values[:, :len(phi_cols)])]
        top = float(finite.max()) if finite.size else 1.0
        mean_chance = float(np.nanmean(chance)) if np.isfinite(chance).any() else None
        panels = [Panel(len(phi_cols), 0.0, max(top, 1e-6), "φ (high = similar)",
                        marks=((mean_chance, "chance"),) if mean_chance is not None else ()),
                  Panel(len(dist_cols), 0.0, 1.0, "distance ÷ its maximum (high = different)", "magma")]
        title = f"{self.a.name} vs {self.b.name}: φ and distances by module (depth order)"
        return heatmap(values, [_short_name(n) for n in names], phi_labels + dist_labels, title=title,
                       panels=panels, nan_label="n/a (dead module)")


def _extreme(r: ModuleResult) -> dict:
    return {"module": r.module, "phi": r.phi, "chance": r.chance, "phi_above_chance": r.phi_above_chance}


def _max_distance(name: str, p: int) -> float:
    """Largest value each bounded distance takes on Gr(p, ·) (all angles π/2)."""
    return {"geodesic": math.sqrt(p) * HALF_PI, "chordal": math.sqrt(p), "binet_cauchy": 1.0,
            "fubini_study": HALF_PI, "asimov": HALF_PI, "procrustes": math.sqrt(2 * p),
            "spectral": math.sqrt(2.0)}[name]


def _short_name(name: str) -> str:
    for prefix in ("lora_unet_", "lora_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _ranks(f: LoraFile) -> str:
    r = f.ranks()
    return "/".join(str(x) for x in r) if len(r) <= 3 else f"{r[0]}–{r[-1]}"


def _verdict(ratio: float) -> str:
    if ratio < 2:
        return "≈ chance: these LoRAs use unrelated directions here"
    if ratio < 10:
        return "above chance: some shared directions"
    return "far above chance: largely the same directions"


def _cached_svd(cache: dict, which: str, f: LoraFile, name: str) -> FactoredSVD:
    key = (which, name)
    if key not in cache:
        cache[key] = module_svd(f.modules[name], torch.float64)
    return cache[key]


def _basis(svd: FactoredSVD, side: str, p: int) -> torch.Tensor:
    return (svd.U if side == "out" else svd.V)[:, :p]


def _module_spaces(m, device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], FactoredSVD]:
    """((Q_up, Q_dn), SVD of the small core s·R_up·R_dnᵀ) for one module.

    The core's SVD (P, S, Q) gives ΔW's singular values (dead / effective rank /
    ‖ΔW‖_F) and, when a comparison needs ordered singular vectors, U = Q_up·P
    and V = Q_dn·Q (exactly what module_svd returns)."""
    q_up, r_up, q_dn, r_dn = factor_qr(m.up.to(device), m.down.to(device), torch.float64)
    p, s, qh = torch.linalg.svd(m.scale * (r_up @ r_dn.transpose(-1, -2)), full_matrices=False)
    return (q_up, q_dn), FactoredSVD(p, s, qh.transpose(-1, -2))


def _span_basis(spaces: tuple[torch.Tensor, torch.Tensor], core: FactoredSVD, side: str,
                p: int) -> torch.Tensor:
    """Orthonormal basis of the span of ΔW's top-p singular vectors on one side.
    When p covers all of Q's columns the core is invertible and span(Q·P) =
    span(Q): Q itself serves, skipping a d×R·R×R product (angles and φ depend
    only on the span)."""
    q = spaces[0] if side == "out" else spaces[1]
    vectors = core.U if side == "out" else core.V
    if p == q.shape[-1] == vectors.shape[-1]:
        return q
    return q @ vectors[:, :p]


def _depth_order(family: str, names: list[str]) -> dict[str, int]:
    try:
        order = arch_for(family).order
    except KeyError:
        order = {}
    base = len(order)
    return {n: order.get(n, base + i) for i, n in enumerate(names)}


def _group_of(family: str, name: str) -> str:
    try:
        return arch_for(family).groups.get(name) or guess_group(name)
    except KeyError:
        return guess_group(name)


def compare(a: LoraFile, b: LoraFile, side: str = "out", top: int | None = None,
            modules: list[str] | None = None, device: torch.device | str | None = None,
            workers: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> SimilarityReport:
    """Compare two LoRAs on 'out' (column space), 'in' (row space) or 'both' sides.

    ``top``: compare the top-``top`` singular vectors of each module (capped at
    its effective rank) instead of the full effective rank. ``modules``:
    restrict to these canonical names (others count as neither shared nor
    missing). Runs on the CPU unless ``device`` says otherwise, with
    ``workers`` threads over modules (default: one per core, at most
    core.workers.MAX_WORKERS; always 1 off the CPU), each doing
    single-threaded linear algebra.
    ``progress(done, total)`` is called after each shared module (in module
    order, from the calling thread); raising inside it stops the comparison
    (how ComfyUI cancels): modules not yet started are dropped.
    """
    if side not in ("out", "in", "both"):
        raise LoraError(f"side must be 'out', 'in' or 'both', got {side!r}")
    if top is not None and top < 1:
        raise LoraError(f"--top must be at least 1, got {top}")
    family = require_same_base([a, b])
    wanted = set(modules) if modules is not None else None
    names_a = [n for n in a.modules if wanted is None or n in wanted]
    names_b = [n for n in b.modules if wanted is None or n in wanted]
    shared = [n for n in names_a if n in b.modules]
    only_a = [n for n in names_a if n not in b.modules]
    only_b = [n for n in names_b if n not in a.modules]
    depth = _depth_order(family, shared)
    shared.sort(key=depth.__getitem__)
    sides = SIDES if side == "both" else (side,)
    report = SimilarityReport(a, b, side, top, [], only_a, only_b)
    dev = check_device(device) if device is not None else torch.device("cpu")
    workers = worker_count(workers, dev)

    def one(n: str) -> list[ModuleResult]:
        with torch.no_grad():           # grad mode is per thread
            return _compare_module(report, n, sides, top, _group_of(family, n), depth[n], dev)

    with linalg_threads(1 if dev.type == "cpu" else None), ordered_map(one, shared, workers) as per_module:
        for done, results in enumerate(per_module, 1):
            report.results.extend(results)
            if progress is not None:
                progress(done, len(shared))
    return report


def _compare_module(report: SimilarityReport, name: str, sides: tuple[str, ...], top: int | None,
                    group: str, depth: int, device: torch.device) -> list[ModuleResult]:
    ma, mb = report.a.modules[name], report.b.modules[name]
    # One factorisation per module and file serves both sides. It is not kept:
    # bases of a whole SDXL LoRA would take gigabytes; phi_grid() re-derives
    # (and caches) the few it is asked for.
    spaces_a, svd_a = _module_spaces(ma, device)
    spaces_b, svd_b = _module_spaces(mb, device)
    ra, rb = svd_a.effective_rank, svd_b.effective_rank
    if top is not None:
        ra, rb = min(ra, top), min(rb, top)
    dead_in = {(True, True): "both", (True, False): "a", (False, True): "b"}.get((svd_a.dead, svd_b.dead))
    out = []
    for side in sides:
        d = ma.d_out if side == "out" else ma.d_in
        r = ModuleResult(module=name, group=group, side=side, d=d, status="dead" if dead_in else "ok",
                         rank_a=ra, rank_b=rb, nominal_rank_a=ma.factor_rank, nominal_rank_b=mb.factor_rank,
                         norm_a=svd_a.frobenius(), norm_b=svd_b.frobenius(), depth=depth, dead_in=dead_in)
        if not dead_in:
            x, y = _span_basis(spaces_a, svd_a, side, ra), _span_basis(spaces_b, svd_b, side, rb)
            theta = principal_angles(x, y)
            dist = distances(theta)
            dist["geodesic_cross_rank"] = cross_rank_geodesic(theta, ra, rb)
            dist["phi"] = phi_from_cosines(torch.cos(theta))     # Σcos²θ = ‖XᵀY‖²_F
            values = torch.stack(list(dist.values())).tolist()   # one device→host copy
            r.distances = dict(zip(dist, values))
            r.phi = r.distances.pop("phi")
            r.chance = chance_phi(ra, rb, d)
            r.angles_deg = torch.rad2deg(theta).tolist()
        out.append(r)
    return out


SHOWN_CANDIDATES = 5     # names listed when a module name is ambiguous


def shared_module(a, b, name: str) -> str:
    """The one module both LoRAs share that ``name`` means: the canonical name,
    the name without 'lora_unet_'/'lora_', an alias the architecture table
    knows (diffusers/LDM dotted paths), or else a unique part of a name.
    Several matches are an error listing some of them."""
    shared = [n for n in a.modules if n in b.modules]
    candidates = [name, "lora_unet_" + name, "lora_" + name]
    try:
        alias = arch_for(a.family).canonical(name)
        if alias:
            candidates.append(alias)
    except KeyError:
        pass
    for c in candidates:
        if c in b.modules and c in a.modules:
            return c
    part = name.replace(".", "_")
    found = [n for n in shared if part in n]
    if len(found) == 1:
        return found[0]
    if found:
        shown = ", ".join(found[:SHOWN_CANDIDATES]) + (f" … (+{len(found) - SHOWN_CANDIDATES} more)"
                                                        if len(found) > SHOWN_CANDIDATES else "")
        raise LoraError(f"module name is ambiguous: {len(found)} shared modules match, e.g. {shown}",
                        a.path, name)
    only = [p for p in (a, b) if any(c in p.modules for c in candidates)]
    where = f"it is only in {only[0].name}" if only else "neither LoRA has it"
    raise LoraError(f"module not shared by both LoRAs ({where}); `inspect` lists the module names",
                    a.path, name)
