"""The merge plan: which modules are merged among which sources, with which
weights, at which rank, and the options the chosen method reads.

Weights: one per source, finite, not all zero; default 1/K each (the mean).
Weight 0 leaves a source out. A method may refuse negative weights (karcher:
a Fréchet mean has no negative masses).

Merge rank p (ranked methods only): default per module the smallest rank
among the sources merged there (nominal rank, or the effective rank when
that is smaller). Asking for more than min(d_out, d_in) of any merged module
is an error; each method states the largest rank a module allows
(Method.rank_limit): a request above every module's limit is refused before
any work (from factor ranks), a module that allows less is capped and counted
in the report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LoraError
from ..lora import LoraFile


MAX_WEIGHT = 1e4


@dataclass
class Options:
    """What the run loop hands every method besides the module: the requested
    rank (an int, None for the default, "auto"), the energy share rank "auto"
    keeps, the compute device, the dense dtype of the full-space rules, and the
    method's parameters by name (Method.params, checked)."""

    rank: int | str | None
    device: torch.device
    dense_dtype: torch.dtype
    params: dict = field(default_factory=dict)
    energy: float = 0.99

    def __getitem__(self, name: str):
        return self.params[name]


def check_weights(loras: list[LoraFile], weights, method) -> list[float]:
    if weights is None:
        return [1.0 / len(loras)] * len(loras)
    w = [float(x) for x in weights]
    if len(w) != len(loras):
        raise LoraError(f"{len(w)} weight(s) given for {len(loras)} LoRAs")
    if not all(math.isfinite(x) for x in w):
        raise LoraError(f"weights must be finite numbers, got {w}")
    for lora, x in zip(loras, w):
        _check_size(x, f"weight {x:g}", lora.path)
    if all(x == 0 for x in w):
        raise LoraError("all weights are zero: nothing to merge")
    for lora, x in zip(loras, w):
        _check_sign(x, f"weight {x:g}", method, lora.path)
    return w


def check_block_weights(loras: list[LoraFile], w: list[float], factors: list[dict[str, float]], method) -> None:
    """Each source's weight times its block factor, module by module, held to the
    rules of check_weights."""
    for lora, x, f in zip(loras, w, factors):
        for name, factor in f.items():
            what = f"weight {x:g} × block weight {factor:g}"
            _check_size(x * factor, what, lora.path, name)
            _check_sign(x * factor, what, method, lora.path, name, " here")


def _check_size(x: float, what: str, path, key: str | None = None) -> None:
    if abs(x) > MAX_WEIGHT:     # beyond any strength in use; products of such overflow
        raise LoraError(f"{what} is out of range (at most {MAX_WEIGHT:g} in size)", path, key)


def _check_sign(x: float, what: str, method, path, key: str | None = None, where: str = "") -> None:
    if method.negative_weights and x < 0:
        raise LoraError(f"{what} is negative{where}: {method.negative_weights}", path, key)


def module_names(loras: list[LoraFile]) -> list[str]:
    """Every module name, in first-seen order."""
    names: dict[str, None] = {}
    for lora in loras:
        names.update(dict.fromkeys(lora.modules))
    return list(names)


def module_weights(w: list[float], factors: list[dict[str, float]] | None, name: str) -> list[float]:
    """The sources' weights in one module: w_k times source k's block factor there (block weights)."""
    if not factors:
        return w
    return [x * f.get(name, 1.0) for x, f in zip(w, factors)]


def module_specs(loras: list[LoraFile], w: list[float], factors: list[dict[str, float]] | None = None
                 ) -> dict[str, list[int]]:
    """Every module name (in first-seen order) -> the sources with a nonzero weight there that have it."""
    specs = {}
    for name in module_names(loras):
        wm = module_weights(w, factors, name)
        specs[name] = [k for k, lora in enumerate(loras) if name in lora.modules and wm[k] != 0]
    return {name: ks for name, ks in specs.items() if ks}


def check_rank_request(specs: dict[str, list[int]], loras: list[LoraFile], method, rank: int | None) -> None:
    """Refuse, before any work, a rank no module could take (from shapes and factor ranks;
    a module whose sources turn out to span fewer directions is capped and reported)."""
    if not method.ranked:
        if rank is not None:
            raise LoraError(f"the {method.name} merge is exact at rank Σ r_k; use svd (or karcher) for a "
                            f"rank-{rank} result")
        return
    if rank is None:
        return
    if rank == "auto":
        if method.rank_auto is None:
            raise LoraError(f"rank auto is not offered for the {method.name} merge; give a number")
        return
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise LoraError(f"merge rank must be a whole number or 'auto', got {rank!r}")
    if rank < 1:
        raise LoraError(f"merge rank must be at least 1, got {rank}")
    best, best_name, best_ks = None, None, []
    for name, ks in specs.items():
        if len(ks) < 2:
            continue
        mods = [loras[k].modules[name] for k in ks]
        d_out, d_in = mods[0].d_out, mods[0].d_in
        if rank > min(d_out, d_in):
            raise LoraError(f"rank {rank} is more than any {d_out}×{d_in} layer can hold "
                            f"(at most {min(d_out, d_in)})", loras[ks[0]].path, name)
        limit = method.rank_limit(d_out, d_in, [m.factor_rank for m in mods])
        if best is None or limit > best:
            best, best_name, best_ks = limit, name, ks
    if best is not None and rank > best:
        k = min(best_ks, key=lambda k: loras[k].modules[best_name].factor_rank)
        raise LoraError(f"rank {rank} is more than the sources allow for a {method.name} merge (at most "
                        f"{best}, in this module; {loras[k].name} has rank "
                        f"{loras[k].modules[best_name].factor_rank} here): {method.rank_reason}",
                        loras[k].path, best_name)


def set_rank(job, method, rank: int | None) -> None:
    """The job's merge rank: Σ r_k for exact methods, the source's own for a copy,
    else the request (capped to what the module allows) or the smallest source rank."""
    if not method.ranked:
        job.rank = sum(s.module.factor_rank for s in job.sources)
    elif len(job.sources) == 1:                 # copied with its own factors
        job.rank = job.sources[0].module.factor_rank
    elif rank is None:                          # the smallest source rank (nominal, or effective if less)
        job.rank = min(min(s.module.rank, s.rank) for s in job.sources)
    elif rank == "auto":                        # an upper bound; the method's rank_auto policy picks
        job.rank = method.rank_limit(job.d_out, job.d_in, [s.rank for s in job.sources])
    else:
        job.rank = min(rank, method.rank_limit(job.d_out, job.d_in, [s.rank for s in job.sources]))
        job.capped = job.rank < rank
