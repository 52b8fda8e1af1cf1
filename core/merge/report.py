"""The fidelity report: per module and per block group, how well the merge
keeps each source and how far it is from the exact weighted sum."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..karcher import DETERMINISTIC_CHOICE
from .advisor import ADVICE, OVERLAP_TIMES, group_advice


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
    truncation: float | None = None  # ‖result − rank-p result‖/‖result‖ for rules truncated after the fact
    advice: dict | None = None     # core.merge.advisor: φ vs chance, widest angle, the method that fits

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
        cuts = [m.truncation for m in mods if m.truncation is not None]
        if cuts:
            out["truncation_max"] = max(cuts)
        advised = [m.advice for m in mods if m.advice]
        if advised:
            out["advice"] = {a: sum(x["advice"] == a for x in advised) for a in ADVICE}
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
                "not_local_min": sum(1 for m in mods if m.karcher and
                                     not all(s.get("local_min", True) for s in m.karcher.values())),
                "consensus_rank_mean": _mean_consensus(mods),
            }
        return out

    def to_dict(self) -> dict:
        return {"method": self.method, "weights": self.weights, "rank": self.rank,
                "family": self.family, "sources": self.sources, "distance": self.distance,
                "summary": self.summary(), "warnings": self.warnings, "skipped": self.skipped,
                "rank_capped": self.capped, "modules": [m.to_dict() for m in self.modules]}

    def group_rows(self, labels: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of the fidelity per block group, the last row "all";
        sources are called by ``labels`` (default A, B, …) in the kept/φ columns."""
        labels = labels or source_letters(len(self.sources))
        groups: dict[str, list[ModuleReport]] = {}
        for m in self.modules:
            groups.setdefault(m.group, []).append(m)
        head = ["group", "mods", "rank", "rel.err"] + [f"kept {x}" for x in labels] + \
               [f"φ {x}" for x in labels]
        cut = any(m.truncation is not None for m in self.modules)
        if cut:
            head.append("trunc")
        advised = any(m.advice for m in self.modules)
        if advised:
            head += ["φ/chance", "max∠", "advice"]
        karcher = any(m.karcher for m in self.modules)
        hessian = any(m.karcher and all("local_min" in s for s in m.karcher.values()) for m in self.modules)
        if karcher:
            head += ["iters", "grad max", "conv"] + (["loc.min"] if hessian else []) + ["non-uniq", "consensus"]
        rows = []

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
            if cut:
                cuts = [m.truncation for m in mods if m.truncation is not None]
                cells.append(f"{max(cuts):.1e}" if cuts else "-")
            if advised:
                adv = [m.advice for m in mods if m.advice]
                cells += ([f"{sum(a['phi'] / a['chance'] for a in adv) / len(adv):.1f}",
                           f"{max(a['max_angle_deg'] for a in adv):.0f}°", group_advice(adv)]
                          if adv else ["-", "-", "-"])
            if karcher:
                its = [s["iterations"] for m in mods if m.karcher for s in m.karcher.values()]
                cells.append(f"{sum(its) / len(its):.1f}/{max(its)}" if its else "-")
                grads = [s["grad_norm"] for m in mods if m.karcher for s in m.karcher.values()]
                cells.append(f"{max(grads):.0e}" if grads else "-")
                meaned = [m for m in mods if m.karcher]
                cells.append(f"{sum(all(s['converged'] for s in m.karcher.values()) for m in meaned)}/{len(meaned)}")
                if hessian:
                    cells.append(f"{sum(all(s.get('local_min', False) for s in m.karcher.values()) for m in meaned)}"
                                 f"/{len(meaned)}")
                cells.append(str(sum(1 for m in mods if m.karcher and
                                     not all(s["unique"] for s in m.karcher.values()))))
                cons = _mean_consensus(mods)
                cells.append(f"{cons:.1f}" if cons is not None else "-")
            return cells

        for label, mods in groups.items():
            rows.append(row(label, mods))
        if self.modules:
            rows.append(row("all", self.modules))
        return head, rows

    def table(self) -> str:
        """Fidelity per block group (the JSON report has every module)."""
        if not self.modules:
            return f"{self.method} merge: no module left to write ({self.skipped})"
        labels = source_letters(len(self.sources))
        head, body = self.group_rows(labels)
        rows = [head] + body
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        from .methods import TABLE

        lines = [f"{self.method} merge of {len(self.sources)} LoRAs ({self.family}), weights "
                 f"{', '.join(f'{w:g}' for w in self.weights)}"]
        if self.method in TABLE:
            m = TABLE[self.method]
            lines.append(f"  {m.description}" + (f" [{m.paper}]" if m.paper else ""))
        lines += [f"  {x} = {name}" for x, name in zip(labels, self.sources)]
        if any(m.karcher for m in self.modules):
            lines.append("  iters = steps per module side, mean/max (karcher: trust-region Newton steps, 0 for "
                         "two sources, closed form; flag-median: IRLS steps); grad max = largest gradient norm "
                         "at the stop; conv = modules converged on both sides; loc.min = modules whose mean is "
                         "a local minimum (smallest Hessian eigenvalue > 0); non-uniq = modules whose sources "
                         "lie outside the π/4 ball where the mean is unique; consensus = mean consensus rank")
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
        if "advice" in s:
            lines.append(f"advice (per module: {', '.join(f'{k} {v}' for k, v in s['advice'].items())}): karcher "
                         "for close versions (all principal angles < 45°), ties/tsv/iso for partial overlap "
                         f"(φ > {OVERLAP_TIMES:g}× chance), linear/concat for unrelated LoRAs")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def source_letters(n: int) -> list[str]:
    """How the report's tables call the sources: A, B, … (S26, S27, … after Z)."""
    return [chr(ord("A") + k) if k < 26 else f"S{k}" for k in range(n)]


def _mean_consensus(mods: list[ModuleReport]) -> float | None:
    """Mean over modules of the consensus rank (directions a weighted majority of the
    sources share, the smaller of the two sides; core.merge.means)."""
    ranks = [min(s["consensus_rank"] for s in m.karcher.values()) for m in mods
             if m.karcher and all("consensus_rank" in s for s in m.karcher.values())]
    return sum(ranks) / len(ranks) if ranks else None


def add_warnings(report: MergeReport) -> None:
    """Warnings drawn from the modules' figures (Karcher statistics, cancelled modules)."""
    bad = [m for m in report.modules if m.karcher and not all(s["unique"] for s in m.karcher.values())]
    if bad:
        worst = max(max(s["max_angle_deg"] for s in m.karcher.values()) for m in bad)
        report.warnings.append(
            f"{report.method} mean not unique in {len(bad)} of {len(report.modules)} module(s): sources lie up "
            f"to {worst:.0f}° (principal angle) from the mean, beyond the π/4 = 45° ball where it is "
            f"unique (Afsari 2011); deterministic choice: {DETERMINISTIC_CHOICE}. Sources this far apart "
            f"share few directions (consensus rank in the table): a mean keeps little of each; the exact "
            f"linear/concat merge keeps every source, and rank auto keeps only what a majority shares")
    slow = [m for m in report.modules if m.karcher and not all(s["converged"] for s in m.karcher.values())]
    if slow:
        grad = max(s["grad_norm"] for m in slow for s in m.karcher.values())
        report.warnings.append(f"{report.method} iteration stopped before its tolerance in {len(slow)} "
                               f"module(s) (largest gradient norm {grad:.1e} rad)")
    saddle = [m for m in report.modules if m.karcher and not all(s.get("local_min", True) for s in m.karcher.values())]
    if saddle:
        report.warnings.append(f"{report.method} mean is a critical point but not a local minimum (a negative "
                               f"Hessian eigenvalue estimate) in {len(saddle)} module(s)")
    if "cancelled" in report.skipped:
        report.warnings.append(f"{len(report.skipped['cancelled'])} module(s) cancel to zero and were left out")
