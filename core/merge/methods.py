"""The method table: every merge rule by name, with what the CLI, the ComfyUI
node and the WebUI tab show and check — a one/two-line description, the
source paper, and the parameters with defaults and ranges.

Adding a method is one register(...) call at the bottom of this file: the
function takes (Job, Options) and returns a Merged (core.merge.basis); the
run loop, the parameter checks, the recipe and every front end read the rest
from the record.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import LoraError
from ..karcher import DISTANCES, MAX_NEWTON_STEPS
from ..means import MEDIAN_MAX_ITER
from .basis import Job, Merged
from .core_space import dare_core, iso_c, iso_cts, ties_core, tsv
from .exact import linear, svd
from .knots import knots_dare, knots_ties
from .means import chordal, flag_median_merge, karcher, karcher_batch
from .plan import Options
from .ties_dare import dare_full, ties_full
from .truncate import energy_rank


@dataclass(frozen=True)
class Param:
    """A method parameter: its merge() keyword (CLI flag --name-with-dashes, node
    input of the same name), default, and either a numeric range or choices.
    Bounds are closed unless low_open/high_open."""

    name: str
    default: object
    help: str
    label: str = ""                 # how errors name it ("ties density"); default: the name
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None

    def check(self, value):
        label = self.label or self.name
        if self.choices is not None:
            if value not in self.choices:
                raise LoraError(f"{label} '{value}' is not offered (choose from {', '.join(map(str, self.choices))})")
            return value
        if value is None:
            return value
        if value != value:          # NaN passes every comparison below
            raise LoraError(f"{label} must be a number in {self.range_text()}, got {value}")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            raise LoraError(f"{label} must be in {self.range_text()}, got {value}")
        return value

    def range_text(self) -> str:
        lo = "-∞" if self.low is None else f"{self.low:g}"
        hi = "∞" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Method:
    """One merge rule. ranked: takes a merge rank p (else exact at Σ r_k);
    framed: runs in frames of the stacked factors (basis.Job) — a bool, or a
    function of the checked parameters; rank_limit(d_out, d_in, source ranks):
    the largest rank a module allows, rank_reason says why; rank_auto(job,
    spectrum, share) -> p: the rank "auto" policy truncate.finish applies
    (True: the rule applies its own policy, e.g. the means' consensus rank;
    None: rank auto not offered);
    negative_weights: the refusal text when negative weights make no sense (else
    empty); batch: the same rule on several jobs of one coordinate shape at once."""

    name: str
    merge: Callable[[Job, Options], Merged]
    description: str
    paper: str = ""
    params: tuple[Param, ...] = ()
    ranked: bool = True
    framed: bool | Callable[[dict], bool] = False
    rank_limit: Callable[[int, int, list[int]], int] = lambda d_out, d_in, ranks: min(d_out, d_in)
    rank_reason: str = "the weighted sum has no more directions"
    rank_auto: Callable | bool | None = None
    negative_weights: str = ""
    batch: Callable[[list[Job], Options], list[Merged]] | None = None

    def is_framed(self, params: dict) -> bool:
        return self.framed(params) if callable(self.framed) else self.framed

    def options(self, given: dict) -> dict:
        """The method's parameters from the caller's values (defaults filled), checked."""
        return {p.name: p.check(given.get(p.name, p.default)) for p in self.params}


TABLE: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in TABLE:
        raise ValueError(f"merge method '{method.name}' registered twice")
    TABLE[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in TABLE:
        raise LoraError(f"unknown merge method '{name}' (choose from {', '.join(TABLE)})")
    return TABLE[name]


def names() -> tuple[str, ...]:
    return tuple(TABLE)


def describe() -> str:
    """Every method on one line each: name, description, paper (CLI help, node tooltip)."""
    return "\n".join(f"{m.name}: {m.description}" + (f" [{m.paper}]" if m.paper else "") for m in TABLE.values())


# ------------------------------------------------------------------ parameters shared by several rules
SEED = Param("seed", 0, "random seed (dare: the drops; others: start of iterative steps)", low=0)
TIES_DENSITY = Param("ties_density", 0.2, "ties: fraction of each source's entries kept (largest magnitudes)",
                     label="ties density", low=0.0, high=1.0, low_open=True)
DARE_DROP = Param("dare_drop", 0.5, "dare: probability of dropping each entry (the rest rescaled by 1/(1−p))",
                  label="dare drop probability", low=0.0, high=1.0, high_open=True)
SPACE = Param("space", "core", "core: the rule on the sources' intrinsic core coordinates (exact, from factors); "
              "full: on the dense ΔW entries as TIES/DARE were published", choices=("core", "full"))
NORMALISE = Param("normalise", False, "stack without burning: directions several sources share come out at "
                  "one source's strength, directions one source uses alone untouched", choices=(False, True))
ENERGY = Param("energy", 0.99, "rank auto: share of the merged energy each module keeps (the smallest rank "
                "holding it; karcher, chordal and flag-median ignore it: their auto rank is the directions a "
                "weighted majority of the sources share)", label="rank auto energy share", low=0.0, high=1.0, low_open=True)
KEEP = Param("keep", 1.0, "tsv: fraction of each source's singular triplets used (top ones)", label="tsv keep",
             low=0.0, high=1.0, low_open=True)


def _by_space(core: Callable, full: Callable) -> Callable:
    return lambda job, opts: full(job, opts) if opts["space"] == "full" else core(job, opts)


def _in_core(params: dict) -> bool:
    return params.get("space", "core") == "core"


def _core_method(name, fn, description, paper, params=(), **kw) -> Method:
    """A rule of the core space (core_space, knots): framed, truncated after the fact, rank auto offered."""
    kw.setdefault("framed", True)
    kw.setdefault("rank_limit", lambda d_out, d_in, ranks: min(sum(ranks), d_out, d_in))
    return register(Method(name, fn, description, paper, params, rank_auto=energy_rank, **kw))


# ------------------------------------------------------------------ the table
register(Method(
    "karcher", karcher,
    "weighted Karcher mean of the sources' column and row spaces on the Grassmann manifold (Newton "
    "trust-region, converged for any spread), then the weighted sum projected onto them; for close versions "
    "of one LoRA",
    "Edelman–Arias–Smith 1998; Absil–Baker–Gallivan 2007",
    (Param("distance", "geodesic", "geodesic (Karcher mean) or chordal (extrinsic mean)", choices=DISTANCES),
     Param("max_iter", MAX_NEWTON_STEPS, "most Newton steps per module side",
           label="karcher max_iter", low=1),
     Param("tol", None, "gradient-norm stop (default: core.karcher's)", label="karcher tol", low=0.0,
           low_open=True)),
    framed=True, rank_limit=lambda d_out, d_in, ranks: min(ranks),
    rank_reason="the Karcher mean compares p-dimensional subspaces and every source must span p directions",
    negative_weights="the Karcher (Fréchet) mean has no meaning for negative weights; use the linear or "
                     "svd merge to subtract a LoRA",
    rank_auto=True, batch=karcher_batch))
register(Method("linear", linear, "exact weighted sum Σ w_k ΔW_k by concatenated factors (rank adds up); "
                "for unrelated LoRAs", params=(NORMALISE,), ranked=False, framed=True))
register(Method("concat", linear, "the linear merge under its other name: factors side by side, exact",
                params=(NORMALISE,), ranked=False, framed=True))
register(Method("svd", svd, "best rank-p approximation of the exact weighted sum (truncated SVD from factors)",
                params=(NORMALISE,), framed=True,
                rank_limit=lambda d_out, d_in, ranks: min(sum(ranks), d_out, d_in), rank_auto=energy_rank))
register(Method("ties", _by_space(ties_core, ties_full),
                "TIES: trim each source to its largest entries, elect signs by the sum, disjoint mean; on the "
                "core coordinates (space core) or the dense ΔW (space full); for partly overlapping LoRAs",
                "Yadav et al. 2023, arXiv 2306.01708; core space: Panariello et al. 2025, arXiv 2509.17786",
                (TIES_DENSITY, SPACE, SEED), framed=_in_core, rank_auto=energy_rank))
register(Method("dare", _by_space(dare_core, dare_full),
                "DARE: drop entries at random and rescale by 1/(1−p), then sum; on the core coordinates (space "
                "core) or the dense ΔW (space full)",
                "Yu et al. 2024, arXiv 2311.03099; core space: Panariello et al. 2025, arXiv 2509.17786",
                (DARE_DROP, SPACE, SEED), framed=_in_core, rank_auto=energy_rank))
_core_method("tsv", tsv, "Task Singular Vectors: every source's singular vectors side by side, decorrelated "
             "(polar factor) with their own singular values; for partly overlapping LoRAs",
             "Gargiulo et al., CVPR 2025, arXiv 2412.00081", (KEEP,))
_core_method("iso-c", iso_c, "Iso-C: the exact sum's singular directions with a flat (isotropic) spectrum, "
             "every singular value their mean; lifts weak shared directions", "Marczak et al., ICML 2025, "
             "arXiv 2502.04959")
_core_method("iso-cts", iso_cts, "Iso-CTS: ~80 % of the rank from the sum's top directions, the rest from each "
             "source's own directions outside them, flat spectrum; keeps what only one LoRA does",
             "Marczak et al., ICML 2025, arXiv 2502.04959")
_core_method("knots-ties", knots_ties, "KnOTS: align the sources by the SVD of their concatenation, then TIES "
             "on the aligned per-source blocks", "Stoica et al., ICLR 2025, arXiv 2410.19735",
             (TIES_DENSITY, SEED))
_core_method("knots-dare", knots_dare, "KnOTS: align the sources by the SVD of their concatenation, then DARE "
             "on the aligned per-source blocks", "Stoica et al., ICLR 2025, arXiv 2410.19735",
             (DARE_DROP, SEED))
register(Method("chordal", chordal, "flag (chordal) mean of the sources' whole column and row spaces, closed "
                "form, sources of different ranks count with all their directions; then the weighted sum "
                "projected onto it", "Draper et al. 2014",
                framed=True, rank_limit=lambda d_out, d_in, ranks: min(d_out, d_in, max(ranks)),
                rank_reason="a mean of subspaces has no more directions than the largest source", rank_auto=True,
                negative_weights="a mean of subspaces has no meaning for negative weights; use the linear or "
                                 "svd merge to subtract a LoRA"))
register(Method("flag-median", flag_median_merge, "robust chordal median of the sources' column and row spaces "
                "(IRLS): one outlier LoRA does not drag the result; then the weighted sum projected onto it",
                "Mankovich et al. 2022, arXiv 2203.04437",
                (Param("max_iter", MEDIAN_MAX_ITER, "most IRLS steps per module side", label="flag-median max_iter",
                       low=1),),
                framed=True, rank_limit=lambda d_out, d_in, ranks: min(d_out, d_in, max(ranks)),
                rank_reason="a mean of subspaces has no more directions than the largest source", rank_auto=True,
                negative_weights="a median of subspaces has no meaning for negative weights; use the linear "
                                 "or svd merge to subtract a LoRA"))
