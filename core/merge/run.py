"""The run loop: check the request, then prepare, merge and measure one module
at a time per worker (streaming: a whole-LoRA merge holds one module's working
state per worker; core.workers runs one per CPU), reporting progress after
each in module order; assemble the merged LoRA and its report.

Modules: a module some sources lack (or have dead, ΔW = 0) is merged among the
sources that have it; a module only one source has is copied with its own
factors at scale w_k·s_k; a module dead in every source is skipped (not
written); a merged result that cancels to zero is skipped too. Both are listed
in the report, never written as NaN.
"""
from __future__ import annotations

import contextlib
import json
import threading
from typing import Callable

import torch

from ..device import check_device, default_device, linalg_threads
from ..errors import LoraError
from ..formats import require_same_base
from ..lora import LoraFile, LoraModule, module_part
from ..sdarch import TABLE_FAMILIES, arch_for
from ..workers import ordered_map, worker_count
from . import methods
from .basis import Merged, Workspace, prepare
from .fidelity import fidelity
from .blocks import block_factors
from .plan import (Options, check_block_weights, check_rank_request, check_weights, module_names, module_specs,
                   module_weights, set_rank)
from .report import MergeReport, ModuleReport, add_warnings
from .result import KOHYA_LIKE, NAMINGS, RECIPE_KEY, MergeResult, first_naming, recipe

KARCHER_BATCH = 64      # modules of one coordinate shape stacked per batched call (karcher)


def merge(loras: list[LoraFile], weights=None, method: str = "karcher", rank: int | None = None,
          dtype: torch.dtype = torch.float32, seed: int = 0, ties_density: float = 0.2,
          dare_drop: float = 0.5, naming: str = "first", distance: str = "geodesic",
          device: torch.device | str | None = None, batched: bool | None = None,
          threads: int | None = 1, tol: float | None = None, max_iter: int | None = None,
          progress: Callable[[int, int], None] | None = None, space: str | None = None,
          keep: float | None = None, energy: float = methods.ENERGY.default,
          block_weights: list[str | None] | None = None, normalise: bool = False,
          workers: int | None = None) -> MergeResult:
    """Merge LoRAs of one base model into one LoRA (methods: core.merge.methods).

    dtype: factor dtype of the result (computation is float64, except the dense
    ties/dare step, float32 unless dtype is float64). ties_density:
    fraction of each task vector TIES keeps (paper default 0.2). dare_drop: DARE
    drop probability q (0.5: the papers' 0.9 was for full fine-tune deltas).
    naming: "first" writes keys spelled as in the first source when it is a
    kohya/LyCORIS file of an SD family, else kohya names (ComfyUI maps both;
    DiT merges always write the LDM kohya names); "kohya" always kohya. distance: "geodesic" (Karcher mean) or "chordal" (extrinsic mean).
    device: default core.device.default_device(). batched: stack modules of
    equal shape for methods that offer it (default: on CUDA only; a plain loop
    measured faster on the CPU). threads: CPU intra-op threads during the merge
    (restored after; None leaves torch's setting). workers: modules merged at
    once on the CPU, each by one thread (core.workers; default one per CPU;
    1 unless threads is 1, and when batched). tol, max_iter: Karcher stop (max_iter: the
    flag-median's IRLS limit there; None: each method's own default).
    rank: a number, None (per module the smallest source rank) or "auto" (per
    module the smallest rank holding `energy` of the merged energy; methods with
    a rank_auto policy). space: ties/dare on the core coordinates ("core",
    default) or the dense ΔW ("full"). keep: tsv's share of each source's triplets.
    block_weights: per source None or a block-weight spec (core.merge.blocks:
    LBW preset, LBW value list, label=value pairs) scaling its weight per block.
    normalise: linear/concat/svd "stack without burning" (core.merge.exact).
    progress(done, total) is called after each module is merged and measured
    (total = modules to merge); raising inside it stops the merge (how ComfyUI
    cancels): the exception propagates and nothing is returned.
    """
    m = methods.get(method)
    if naming not in NAMINGS:
        raise LoraError(f"unknown naming '{naming}' (choose from {', '.join(NAMINGS)})")
    if not loras:
        raise LoraError("no LoRAs to merge")
    given = {"seed": seed, "ties_density": ties_density, "dare_drop": dare_drop, "distance": distance,
             "tol": tol, "max_iter": max_iter, "space": space, "keep": keep, "normalise": normalise}
    if normalise and not any(p.name == "normalise" for p in m.params):
        raise LoraError(f"normalise is offered for the exact merges (linear, concat, svd), not {method}")
    params = m.options({k: v for k, v in given.items() if v is not None or k == "tol"})
    methods.ENERGY.check(energy)
    if rank == "auto" and params.get("space") == "full":
        raise LoraError(f"rank auto is not offered for {method} in space full (the dense rule); use space core")
    w = check_weights(loras, weights, m)
    family = require_same_base(loras)
    dev = check_device(device) if device is not None else default_device()
    if batched is None:
        batched = dev.type == "cuda"
    groups = arch_for(family).groups if family in TABLE_FAMILIES else {}
    factors = None
    if block_weights is not None:
        if len(block_weights) != len(loras):
            raise LoraError(f"{len(block_weights)} block-weight spec(s) given for {len(loras)} LoRAs")
        factors = block_factors(list(block_weights), module_names(loras), family, groups)
        check_block_weights(loras, w, factors, m)
    specs = module_specs(loras, w, factors)
    if not specs:
        raise LoraError("nothing to merge: the block weights leave every module at weight 0")
    check_rank_request(specs, loras, m, rank)
    opts = Options(rank, dev, torch.float64 if dtype == torch.float64 else torch.float32, params, energy)
    workers = 1 if batched else worker_count(workers, dev, threads)
    report = MergeReport(method, w, rank, family, [lora.name for lora in loras], params.get("distance"))
    done: dict[str, tuple[ModuleReport, LoraModule, bool] | None] = {}
    dead: set[str] = set()
    with linalg_threads(threads if dev.type == "cpu" else None), \
            _outcomes(specs, loras, w, factors, m, opts, batched, groups, dtype, workers) as outcomes:
        for name, outcome in outcomes:
            if outcome is DEAD:
                dead.add(name)
            else:
                done[name] = outcome
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
    add_warnings(report)
    key_names = first_naming(loras[0], out) if naming == "first" else {}
    if naming == "first" and loras[0].format not in KOHYA_LIKE:
        report.warnings.append(f"{loras[0].name} is a {loras[0].format} file; keys are written with "
                               "kohya names, which ComfyUI maps the same way")
    made = dict(params, block_weights=list(block_weights)) if block_weights is not None else params
    out.metadata[RECIPE_KEY] = json.dumps(recipe(loras, report, made))
    return MergeResult(out, report, key_names)


DEAD = object()      # a module dead in every source: listed in the report, not written


@contextlib.contextmanager
def _outcomes(specs, loras, w, factors, method, opts: Options, batched: bool, groups, dtype, workers: int):
    """An iterator of (name, outcome) per module: DEAD, None (the merge
    cancelled to zero) or (its report, the merged LoraModule, capped). One
    module at a time per worker (streaming: each holds one module's working
    state), in module order; batched jobs (karcher on CUDA) as their batch
    completes. Leaving the block stops the workers (core.workers.ordered_map)."""
    local = threading.local()

    def job_of(name):
        if not hasattr(local, "work"):          # the stacking buffers are per thread
            local.work = Workspace()
        job = prepare(name, specs[name], loras, module_weights(w, factors, name), opts.device,
                      method.is_framed(opts.params), local.work)
        if job is not None:
            set_rank(job, method, opts.rank)
        return job

    def measured(job, res):
        status = ("copied" if len(job.sources) == 1 else
                  "merged" if len(job.sources) == sum(x != 0 for x in w) else "partial")
        mod = fidelity(job, res, groups.get(job.name, module_part(job.name)), status)
        if mod is None:
            return None
        up, down = (res.up, res.down) if res.module_space else job.lift(res.up, res.down)
        return mod, job.module(up, down, dtype, res.scale,
                               job.sources[0].module.rank if status == "copied" else None), job.capped

    def one(name):
        with torch.no_grad():                   # grad mode is per thread
            job = job_of(name)
            return name, DEAD if job is None else measured(job, _merged(job, method, opts))

    def flush(group):
        yield from ((j.name, measured(j, res)) for j, res in zip(group, method.batch(group, opts)))

    def in_batches():
        pending: dict[tuple, list] = {}
        for name in specs:
            job = job_of(name)
            if job is None:
                yield name, DEAD
            elif len(job.sources) == 1:
                yield name, measured(job, _merged(job, method, opts))
            else:
                key = (job.sources[0].svd.U.shape[0], job.sources[0].svd.V.shape[0], job.rank, len(job.sources))
                pending.setdefault(key, []).append(job)
                if len(pending[key]) >= KARCHER_BATCH:
                    yield from flush(pending.pop(key))
        for group in pending.values():
            yield from flush(group)

    if batched and method.batch is not None:
        yield in_batches()
    else:
        with ordered_map(one, specs, workers) as results:
            yield results


def _merged(job, method, opts: Options) -> Merged:
    """One job's merge: a lone source is copied with its own factors, weighted."""
    if len(job.sources) == 1:
        s = job.sources[0]
        return Merged(s.module.up.to(opts.device, torch.float64),
                      s.module.down.to(opts.device, torch.float64), s.weight * s.module.scale)
    try:
        return method.merge(job, opts)
    except torch.linalg.LinAlgError as exc:   # eigh/svd did not converge: name the module
        raise LoraError(f"the {method.name} merge failed numerically here "
                        f"({str(exc).strip().splitlines()[0][:120]}); check the weights and sources",
                        key=job.name) from None
