"""Grassmann kernel matrix over N LoRAs: per-module kernels, aggregated N×N, clusters.

How it is computed
- Each LoRA's module gets one factored SVD (``core.factored``, never ΔW); its
  basis is the top-r singular vectors, r = the effective rank (directions with
  zero singular value are arbitrary and dropped). Side "out" uses the column
  space (left singular vectors U), "in" the row space (V), "both" uses the two
  as separate terms (a product of two Grassmannians). ``top=K`` keeps only each
  LoRA's leading K directions (fewer where its rank is lower).
- For the M LoRAs live on one module, the stacked bases give one Gram matrix
  (computed in chunks of LoRAs, upper triangle only); its r_i×r_j blocks are
  X_iᵀX_j. The projection statistic s = ‖X_iᵀX_j‖²_F = Σ cos²θ is the block's
  squared Frobenius norm (no SVD needed), and the Binet–Cauchy log δ = Σ log cos θ
  is the block's log|det| (LU: 4× faster than an SVD here, same value).
- Different ranks on a module: projection kernels use each LoRA's full rank
  (they are defined across ranks, see ``core.kernels``); there a rank difference
  is itself distance (p − s ≥ |k − l|/2), which a warning points out and
  ``top=K`` avoids by comparing leading directions only. Binet–Cauchy kernels
  need one dimension, so every LoRA on the module is cut to its top-m vectors,
  m = the smallest rank among them: one Grassmannian per module keeps the Gram
  matrix positive definite (cutting per pair would not).
- Aggregation, so that PD survives: for kernels with k(X,X) > 0 each module's
  kernel is cosine-normalised, k̃ = k/√(k(X,X)k(Y,Y)), summed over the modules
  two LoRAs share, and divided by √(n_i·n_j) (n_i = live modules of LoRA i).
  That is the cosine normalisation of Σ_modules k̃ with an absent or dead module
  contributing 0, a sum of PSD matrices; it equals the mean over modules when
  all LoRAs have the same modules, the diagonal is 1, and a pair that shares
  nothing gets 0. The logarithm kernels (k(X,X) = 0, CPD) take the plain mean
  over shared modules, which keeps CPD when every pair shares the same modules;
  a pair sharing none has no value (NaN) there.
- Induced distance d² = k(X,X) + k(Y,Y) − 2k(X,Y) on the aggregated matrix.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from . import cluster as clustering
from .device import check_device, default_device, linalg_threads
from .errors import LoraError
from .factored import modules_svd
from .kernels import CPD, INDEFINITE, PD, Kernel, make_kernel
from .formats import require_same_base
from .lora import LoraFile
from .save import write_text
from .sdarch import TABLE_FAMILIES, arch_for
from .workers import ordered_map, worker_count

SIDES = ("out", "in", "both")
SIDE_WORDS = {"out": "output side (column space)", "in": "input side (row space)",
              "both": "both sides (column and row spaces as separate terms)"}
METHODS = ("spectral", "kernel-kmeans", "dbscan")
# Relative size of the eigenvalue that still counts as rounding, for PD checks.
EIG_RTOL = 1e-8
# Gram chunks are kept below this many bytes.
GRAM_CHUNK_BYTES = 64 << 20
# rbf/laplace matrices whose off-diagonal values all fall below this are saturated.
SATURATION = 1e-3


@dataclass
class TermStats:
    """Pair statistics of one module on one side among the LoRAs live there."""

    module: str
    side: str                    # "out" | "in"
    members: np.ndarray          # indices into the N LoRAs
    ranks: np.ndarray            # basis dimension of each member
    s: np.ndarray                # ‖XᵀY‖²_F, members × members
    log_delta: np.ndarray | None  # log|det| of the top-bc_rank bases, or None
    bc_rank: int


@dataclass
class PairStatistics:
    """Everything the kernels need; reusable for other kernels and parameters."""

    names: list[str]
    paths: list[str]
    family: str
    side: str
    module_filter: str | None
    top: int | None
    modules: list[str]
    terms: list[TermStats]
    live: np.ndarray             # live modules per LoRA
    dead: np.ndarray             # dead modules per LoRA (ΔW = 0), skipped
    shared: np.ndarray           # modules live in both, N×N
    binet_cauchy: bool           # log_delta computed
    warnings: list[str] = field(default_factory=list)


@dataclass
class KernelMatrix:
    names: list[str]
    paths: list[str]
    kernel: Kernel
    side: str
    module_filter: str | None
    top: int | None              # leading directions kept per LoRA (None: effective rank)
    matrix: np.ndarray           # N×N aggregated kernel
    shared: np.ndarray           # shared live modules per pair
    live: np.ndarray
    dead: np.ndarray
    modules: list[str]
    terms: list[TermStats]
    term_values: list[np.ndarray]  # raw per-module kernel values, aligned with terms
    eigenvalues: np.ndarray | None          # of the matrix, ascending
    centred_eigenvalues: np.ndarray | None  # of JKJ (J = I − 11ᵀ/N), for the logarithm kernels
    warnings: list[str] = field(default_factory=list)

    @property
    def min_eigenvalue(self) -> float | None:
        return None if self.eigenvalues is None else float(self.eigenvalues[0])

    @property
    def centred_min_eigenvalue(self) -> float | None:
        """CPD check: ≥ 0 (up to rounding) iff cᵀKc ≥ 0 for every c with Σc = 0."""
        return None if self.centred_eigenvalues is None else float(self.centred_eigenvalues[0])

    def tolerance(self) -> float:
        return EIG_RTOL * max(float(np.abs(self.eigenvalues).max()), 1e-300) \
            if self.eigenvalues is not None else 0.0

    def negative_eigenvalues(self) -> np.ndarray:
        """Eigenvalues below −1e-8·‖K‖₂ that break the kernel's promise: of the
        matrix, or for the logarithm kernels (k(X,X) = 0, so a zero trace and
        negative eigenvalues always) of the centred matrix. Empty when PD / CPD."""
        evals = self.centred_eigenvalues if self.centred_eigenvalues is not None else self.eigenvalues
        if evals is None:
            return np.array([])
        return evals[evals < -self.tolerance()]

    def distance(self) -> np.ndarray:
        """Induced distance √(k(X,X) + k(Y,Y) − 2k(X,Y))."""
        return np.sqrt(clustering.induced_sq_distance(self.matrix))

    def module_kernel(self, module: str, side: str | None = None) -> tuple[list[int], np.ndarray]:
        """(LoRA indices, raw kernel values) for one module and side."""
        for term, values in zip(self.terms, self.term_values):
            if term.module == module and (side is None or term.side == side):
                return term.members.tolist(), values
        raise KeyError(f"no live module '{module}'" + (f" on side {side}" if side else ""))

    def to_dict(self, result: "Clustering | None" = None) -> dict:
        out = {
            "names": self.names,
            "paths": self.paths,
            "kernel": {"name": self.kernel.name, "status": self.kernel.status,
                       "formula": self.kernel.spec.formula, "params": self.kernel.params()},
            "side": self.side,
            "module_filter": self.module_filter,
            "top": self.top,
            "aggregation": self.aggregation(),
            "matrix": [[_json_number(v) for v in row] for row in self.matrix.tolist()],
            "shared_modules": self.shared.astype(int).tolist(),
            "live_modules": self.live.astype(int).tolist(),
            "dead_modules": self.dead.astype(int).tolist(),
            "modules_compared": len(self.modules),
            "min_eigenvalue": _json_number(self.min_eigenvalue),
            "negative_eigenvalues": [float(v) for v in self.negative_eigenvalues()],
            "warnings": list(self.warnings),
        }
        if self.centred_min_eigenvalue is not None:
            out["centred_min_eigenvalue"] = _json_number(self.centred_min_eigenvalue)
        order = list(range(len(self.names)))
        if result is not None:
            out["clustering"] = result.to_dict()
            out["labels"] = result.labels.tolist()
            order = list(result.order)
        out["order"] = order
        return out

    def to_json(self, path: str | None = None, result: "Clustering | None" = None,
                indent: int | None = 1, overwrite: bool = False) -> str:
        """JSON text (NaN as null); written by core.save's rules to ``path`` when given."""
        text = json.dumps(self.to_dict(result), indent=indent, allow_nan=False, ensure_ascii=False)
        if path:
            write_text(path, text, overwrite)
        return text

    def aggregation(self) -> str:
        if self.kernel.normalisable:
            return ("sum over shared modules of cosine-normalised module kernels "
                    "k/sqrt(k(X,X) k(Y,Y)), divided by sqrt(n_i n_j) (n = live modules of each)")
        return "mean of the module kernels over shared modules"

    def heatmap_image(self, result: "Clustering | None" = None):
        """The matrix as a PIL image, rows and columns in cluster order."""
        from .plot import heatmap
        order = list(result.order) if result is not None else list(range(len(self.names)))
        labels = [self.names[i] + (f" [{_cluster_name(result.labels[i])}]" if result else "")
                  for i in order]
        values = self.matrix.copy()
        for i, j in unshared_pairs(self.shared):     # nothing measured: grey, not a colour
            values[i, j] = values[j, i] = np.nan
        values = values[np.ix_(order, order)]
        normalised = self.kernel.normalisable
        title = f"{self.kernel.describe(formula=False)}, {self.side} side"
        if result is not None:
            title += f"; {result.describe()}"
        return heatmap(values, labels, labels, title=title, vmin=0.0 if normalised else None,
                       vmax=1.0 if normalised else 0.0,
                       colorbar_label="normalised kernel" if normalised else "kernel (<= 0)",
                       nan_label="no shared module")

    def clusters_text(self, result: "Clustering") -> str:
        """One line per cluster (noise last)."""
        lines = [result.describe()]
        for label, members in result.groups().items():
            lines.append(f"{_cluster_name(label)}: " + ", ".join(self.names[i] for i in members))
        return "\n".join(lines + [f"warning: {w}" for w in result.warnings])

    def text_summary(self, result: "Clustering | None" = None, full_up_to: int = 20) -> str:
        """Header, the matrix (full when N ≤ full_up_to, else each LoRA's nearest
        neighbours), clusters and warnings, for a terminal or a node."""
        n = len(self.names)
        lines = [f"{self.kernel.describe()}; {SIDE_WORDS[self.side]}; {len(self.modules)} module(s)"
                 + (f" matching '{self.module_filter}'" if self.module_filter else "")
                 + (f"; top {self.top} directions per LoRA" if self.top else ""),
                 f"aggregation: {self.aggregation()}"]
        if self.min_eigenvalue is not None:
            lines.append(f"min eigenvalue {self.min_eigenvalue:.4g}"
                         + (f", centred {self.centred_min_eigenvalue:.4g}"
                            if self.centred_min_eigenvalue is not None else ""))
        order = list(result.order) if result is not None else list(range(n))
        lines.append("")
        lines.append(f"{'#':>3}  {'cluster':>7}  {'live':>4}  {'dead':>4}  name")
        for i in order:
            lab = _cluster_name(result.labels[i]) if result is not None else "-"
            lines.append(f"{i:>3}  {lab:>7}  {self.live[i]:>4}  {self.dead[i]:>4}  {self.names[i]}")
        lines.append("")
        if n <= full_up_to:
            apart = set(unshared_pairs(self.shared))
            lines.append("     " + " ".join(f"{i:>6}" for i in order))
            for i in order:
                lines.append(f"{i:>4} " + " ".join(f"{'none':>6}" if (min(i, j), max(i, j)) in apart
                                                   else _cell(self.matrix[i, j]) for j in order))
            lines.append("shared modules: min "
                         f"{int(self.shared[~np.eye(n, dtype=bool)].min()) if n > 1 else len(self.modules)}"
                         f", max {int(self.shared.max())}"
                         + ("; none: the pair shares no module, nothing was compared" if apart else ""))
        else:
            lines.append("nearest neighbours (kernel value, shared modules):")
            for i in order:
                row = np.where(np.arange(n) == i, -np.inf, np.nan_to_num(self.matrix[i], nan=-np.inf))
                near = np.argsort(-row, kind="stable")[:3]
                lines.append(f"{i:>4} {self.names[i]}: " + ", ".join(
                    f"{self.names[j]} {self.matrix[i, j]:.3g} ({self.shared[i, j]})" for j in near))
        if result is not None:
            lines += ["", self.clusters_text(result)]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


PAIRS_LISTED = 12     # pairs named in the "share no module" warning


def unshared_pairs(shared: np.ndarray) -> list[tuple[int, int]]:
    """(i, j), i < j, of the LoRAs that share no live module (nothing compared)."""
    n = len(shared)
    return [(i, j) for i in range(n) for j in range(i + 1, n) if shared[i, j] == 0]


def _json_number(x):
    return None if x is None or not math.isfinite(x) else float(x)


def _cluster_name(label) -> str:
    return "noise" if int(label) == clustering.NOISE else f"c{int(label)}"


def _cell(v: float) -> str:
    return f"{'n/a':>6}" if not math.isfinite(v) else f"{v:>6.3f}" if abs(v) < 100 else f"{v:>6.2g}"


@dataclass
class Clustering:
    method: str
    labels: np.ndarray           # −1 = DBSCAN noise
    order: list[int]             # heatmap order (by cluster, then similarity)
    k: int                       # clusters found (noise excluded)
    auto_k: bool                 # k chosen by eigengap
    params: dict
    warnings: list[str] = field(default_factory=list)

    def groups(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i in self.order:
            out.setdefault(int(self.labels[i]), []).append(i)
        return out

    def describe(self) -> str:
        what = {"spectral": "spectral clustering", "kernel-kmeans": "kernel k-means",
                "dbscan": "DBSCAN"}[self.method]
        if self.method == "dbscan":
            noise = int(np.sum(self.labels == clustering.NOISE))
            return (f"{what} (eps={self.params['eps']:g}, min_samples={self.params['min_samples']}): "
                    f"{self.k} cluster(s), {noise} noise")
        return f"{what}: {self.k} cluster(s)" + (" (k by eigengap)" if self.auto_k else "")

    def to_dict(self) -> dict:
        return {"method": self.method, "k": self.k, "auto_k": self.auto_k, "params": self.params,
                "labels": self.labels.tolist(), "order": list(self.order),
                "warnings": list(self.warnings)}


# -- statistics ---------------------------------------------------------------

def _module_order(names: set[str], family: str) -> list[str]:
    order = arch_for(family).order if family in TABLE_FAMILIES else {}
    return sorted(names, key=lambda n: (order.get(n, len(order)), n))


def _compile_filter(pattern: str | None):
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise LoraError(f"module filter '{pattern}' is not a valid regular expression: {exc}")


def _gram_statistics(bases: list[torch.Tensor], binet_cauchy: bool
                     ) -> tuple[np.ndarray, np.ndarray | None, int]:
    """s_ij = ‖X_iᵀX_j‖²_F and log|det| of the top-m blocks for all pairs, from one
    Gram matrix of the stacked (zero-padded) bases, upper triangle, in chunks."""
    n = len(bases)
    ranks = [b.shape[1] for b in bases]
    r, m = max(ranks), min(ranks)
    d = bases[0].shape[0]
    stacked = bases[0].new_zeros(d, n, r)
    for i, b in enumerate(bases):
        stacked[:, i, :b.shape[1]] = b
    flat = stacked.reshape(d, n * r)
    s = np.zeros((n, n))
    log_delta = np.zeros((n, n)) if binet_cauchy else None
    # Row chunks of ≤ GRAM_CHUNK_BYTES; at least 8 of them, so that computing only
    # the blocks right of the diagonal skips ~45 % of the products.
    chunk = max(1, min(GRAM_CHUNK_BYTES // (r * r * n * flat.element_size()), math.ceil(n / 8)))
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        gram = (flat[:, i0 * r:i1 * r].T @ flat[:, i0 * r:]).reshape(i1 - i0, r, n - i0, r)
        s[i0:i1, i0:] = gram.square().sum((1, 3)).cpu().numpy()
        if binet_cauchy:
            blocks = gram[:, :m, :, :m].permute(0, 2, 1, 3)
            log_delta[i0:i1, i0:] = torch.linalg.slogdet(blocks).logabsdet.cpu().numpy()
    s = np.triu(s) + np.triu(s, 1).T
    if binet_cauchy:
        log_delta = np.triu(log_delta) + np.triu(log_delta, 1).T
    return s, log_delta, m


def pair_statistics(loras: Sequence[LoraFile], side: str = "out", module_filter: str | None = None,
                    top: int | None = None, binet_cauchy: bool = False, device: torch.device | str | None = None,
                    threads: int | None = 1, workers: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> PairStatistics:
    """Per-module pair statistics for N LoRAs (one factored SVD per LoRA per module).

    ``binet_cauchy`` also computes log δ (needed by the bc-/bc2- kernels).
    ``progress(done, total)`` is called after each module; raising inside it
    stops the work (how ComfyUI cancels). ``threads`` caps torch's CPU threads
    for the duration (1 measured fastest on small 2-core machines); with 1,
    ``workers`` modules run at once (core.workers: default one per CPU)."""
    loras = list(loras)
    if not loras:
        raise LoraError("no LoRAs to compare")
    if side not in SIDES:
        raise LoraError(f"side must be one of {', '.join(SIDES)}; got '{side}'")
    if top is not None and top < 1:
        raise LoraError(f"top must be at least 1; got {top}")
    family = require_same_base(loras)
    regex = _compile_filter(module_filter)
    device = check_device(device) if device is not None else default_device()
    names = [lora.name for lora in loras]
    if len(set(names)) < len(names):
        names = [lora.path for lora in loras]

    all_modules = set().union(*(lora.modules for lora in loras))
    modules = _module_order({m for m in all_modules if regex is None or regex.search(m)}, family)
    if not modules:
        raise LoraError(f"module filter '{module_filter}' matches no module of the "
                        f"{len(loras)} LoRA(s)" if regex else "the LoRAs have no modules")

    n = len(loras)
    live = np.zeros(n, dtype=int)
    dead = np.zeros(n, dtype=int)
    shared = np.zeros((n, n), dtype=int)
    terms: list[TermStats] = []
    sides = ("out", "in") if side == "both" else (side,)

    def one(name):
        """A module's live members (index, SVD), dead holders and per-side terms."""
        # no_grad (per thread): factors loaded from pickles may carry requires_grad
        with torch.no_grad():
            holders = [i for i, lora in enumerate(loras) if name in lora.modules]
            svds = modules_svd([loras[i].modules[name] for i in holders], device=device)
            members = [(i, f) for i, f in zip(holders, svds) if not f.dead]
            gone = [i for i, f in zip(holders, svds) if f.dead]
            if not members:
                return gone, None, []
            idx = np.array([i for i, _ in members])
            ranks = np.array([min(f.effective_rank, top or f.effective_rank) for _, f in members])
            out = []
            for sd in sides:
                bases = [(f.U if sd == "out" else f.V)[:, :r] for (_, f), r in zip(members, ranks)]
                s, log_delta, m = _gram_statistics(bases, binet_cauchy)
                out.append(TermStats(name, sd, idx, ranks, s, log_delta, m))
            return gone, idx, out

    workers = worker_count(workers, device, threads)
    with linalg_threads(threads if device.type == "cpu" else None), ordered_map(one, modules, workers) as results:
        for done, (gone, idx, module_terms) in enumerate(results, 1):
            dead[gone] += 1
            if idx is not None:
                live[idx] += 1
                shared[np.ix_(idx, idx)] += 1
                terms.extend(module_terms)
            if progress is not None:
                progress(done, len(modules))

    warnings = []
    for i in np.flatnonzero(dead):
        warnings.append(f"{names[i]}: {dead[i]} dead module(s) (ΔW = 0) skipped")
    empty = [names[i] for i in np.flatnonzero(live == 0)]
    if empty:
        raise LoraError(f"no live module to compare in {', '.join(empty)}"
                        + (f" (module filter '{module_filter}')" if module_filter else ""))
    lonely = [names[i] for i in range(n) if n > 1 and shared[i].sum() == shared[i, i]]
    if lonely:
        warnings.append(f"shares no module with any other LoRA: {', '.join(lonely)}")
    apart = unshared_pairs(shared)
    if apart:
        listed = ", ".join(f"{names[i]} / {names[j]}" for i, j in apart[:PAIRS_LISTED])
        more = f" and {len(apart) - PAIRS_LISTED} more" if len(apart) > PAIRS_LISTED else ""
        warnings.append(f"{len(apart)} pair(s) share no module, so nothing was measured for them: "
                        f"their kernel value is a convention (0, or n/a for the logarithm kernels), "
                        f"not a measured dissimilarity: {listed}{more}")
    return PairStatistics(names, [lora.path for lora in loras], family, side, module_filter, top,
                          modules, terms, live, dead, shared, binet_cauchy, warnings)


# -- kernel matrix --------------------------------------------------------------

def _term_values(kernel: Kernel, term: TermStats) -> tuple[np.ndarray, np.ndarray]:
    """Raw kernel values of one term and the self values k(X,X) of its members."""
    if kernel.needs_equal_ranks:
        values = kernel.binet_cauchy_values(term.log_delta)
        self_vals = kernel.self_value(np.full(len(term.members), term.bc_rank))
    else:
        values = kernel.projection_values(term.s, 0.5 * (term.ranks[:, None] + term.ranks[None, :]))
        self_vals = kernel.self_value(term.ranks)
    np.fill_diagonal(values, self_vals)  # exact: X is orthonormal, all cosines are 1
    return values, self_vals


def kernel_matrix_from_statistics(stats: PairStatistics, kernel: Kernel) -> KernelMatrix:
    if kernel.needs_equal_ranks and not stats.binet_cauchy:
        raise ValueError(f"{kernel.name} needs statistics computed with binet_cauchy=True")
    kernel.check_ranks(max((int(t.ranks.max()) for t in stats.terms), default=0))
    n = len(stats.names)
    total = np.zeros((n, n))
    count = np.zeros((n, n))
    values_list = []
    for term in stats.terms:
        values, self_vals = _term_values(kernel, term)
        if not (np.all(np.isfinite(values)) and np.all(np.isfinite(self_vals))):
            # later NaNs would read as pairs sharing no module
            raise LoraError(f"{kernel.describe()} overflows (values beyond float64) on these LoRAs "
                            f"(ranks up to {int(term.ranks.max())}); use a smaller α or β")
        values_list.append(values)
        if kernel.normalisable:
            values = values / np.sqrt(np.outer(self_vals, self_vals))
        cell = np.ix_(term.members, term.members)
        total[cell] += values
        count[cell] += 1
    if kernel.normalisable:
        n_terms = np.diag(count)
        matrix = total / np.sqrt(np.outer(n_terms, n_terms))
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            matrix = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    matrix = 0.5 * (matrix + matrix.T)

    warnings = list(stats.warnings)
    eigenvalues, centred = None, None
    if np.all(np.isfinite(matrix)):
        eigenvalues = np.linalg.eigvalsh(matrix)
        if not kernel.normalisable:
            j = np.eye(n) - 1.0 / n
            centred = np.linalg.eigvalsh(j @ matrix @ j)
    else:
        warnings.append("some pairs share no module, and the logarithm kernel has no value "
                        "for them (shown as n/a); eigenvalues and clustering are unavailable")
    result = KernelMatrix(stats.names, stats.paths, kernel, stats.side, stats.module_filter, stats.top,
                          matrix, stats.shared, stats.live, stats.dead, stats.modules, stats.terms,
                          values_list, eigenvalues, centred, warnings)
    negative = result.negative_eigenvalues()
    if len(negative):
        of = "centred matrix: not conditionally PD" if centred is not None else "matrix"
        why = {INDEFINITE: "an indefinite kernel",
               PD: "a PD kernel: rounding, or pairs sharing different modules",
               CPD: "a CPD kernel: pairs share different module sets"}[kernel.status]
        warnings.append(f"{kernel.name} ({why}): {len(negative)} negative eigenvalue(s) of the {of}, "
                        f"smallest {negative[0]:.3g}")
    if kernel.form in ("rbf", "laplace") and n > 1:
        off = matrix[~np.eye(n, dtype=bool)]
        if np.all(off < SATURATION):
            warnings.append(f"every pair is below {SATURATION:g}: at β={kernel.beta:g} the kernel "
                            "is saturated (all LoRAs look unrelated); a smaller β separates them")
    mixed = [t for t in stats.terms if t.ranks.min() < t.ranks.max()]
    if mixed and not kernel.needs_equal_ranks:
        lo, hi = min(int(t.ranks.min()) for t in mixed), max(int(t.ranks.max()) for t in mixed)
        warnings.append(f"ranks differ between LoRAs on {len({t.module for t in mixed})} module(s) "
                        f"({lo}…{hi}): in the projection embedding a rank difference is itself "
                        "distance (p − s ≥ |k − l|/2); top=K compares every LoRA's leading K "
                        "directions instead")
    if kernel.needs_equal_ranks:
        cut = sorted({t.bc_rank for t in stats.terms if t.bc_rank < t.ranks.max()})
        if cut:
            warnings.append(f"{kernel.name}: ranks differ on some modules; those were compared on "
                            f"each LoRA's top-m subspace, m = the smallest rank there ({cut[0]}…{cut[-1]})")
    return result


def compute_kernel_matrix(loras: Sequence[LoraFile], kernel: str = "projection-rbf",
                          beta: float = 1.0, alpha: float = 2.0, side: str = "out",
                          module_filter: str | None = None, top: int | None = None,
                          force: bool = False,
                          device: torch.device | str | None = None,
                          progress: Callable[[int, int], None] | None = None) -> KernelMatrix:
    """The N×N Grassmann kernel matrix of ``loras`` (see the module docstring)."""
    k = make_kernel(kernel, beta, alpha, force=force)
    stats = pair_statistics(loras, side, module_filter, top, binet_cauchy=k.needs_equal_ranks,
                            device=device, progress=progress)
    return kernel_matrix_from_statistics(stats, k)


# -- clustering -------------------------------------------------------------------

def cluster_kernel_matrix(km: KernelMatrix, method: str = "spectral", k: int | None = None,
                          eps: float | None = None, min_samples: int | None = None, seed: int = 0,
                          restarts: int = 10, force: bool = False) -> Clustering:
    """Cluster the LoRAs. spectral / kernel-kmeans take k (eigengap when None);
    dbscan takes eps and min_samples on the induced distance. Every method
    treats K as a kernel, so an indefinite kernel is refused unless ``force``
    (its negative eigenvalues are then reported)."""
    if method not in METHODS:
        raise LoraError(f"clustering method must be one of {', '.join(METHODS)}; got '{method}'")
    check_seed(seed)
    n = len(km.names)
    if km.eigenvalues is None:
        raise LoraError(f"cannot cluster with {km.kernel.name}: some pairs share no module, so the "
                        "matrix has no value there; use a normalisable kernel such as projection-rbf")
    warnings = []
    negative = km.negative_eigenvalues()
    if km.kernel.status == INDEFINITE:
        if not force:
            detail = (f"{len(negative)} negative eigenvalue(s) here, smallest {negative[0]:.3g}"
                      if len(negative) else "no negative eigenvalue on these LoRAs, but none is guaranteed")
            raise LoraError(f"{km.kernel.name} is not a positive-definite kernel ({detail}); "
                            f"{method} clustering needs one. Use a PD kernel (e.g. projection-rbf, "
                            "bc-laplace, bc2-rbf) or force it")
        warnings.append(f"forced an indefinite kernel: {len(negative)} negative eigenvalue(s)"
                        + (f", smallest {negative[0]:.3g}" if len(negative) else ""))
    if k is not None and not 1 <= k <= n:
        raise LoraError(f"number of clusters must be between 1 and {n}; got {k}")

    affinity = clustering.kernel_affinity(km.matrix)
    auto_k = k is None and method != "dbscan"
    params: dict = {"seed": seed}
    if method == "dbscan":
        if eps is None or min_samples is None:
            raise LoraError("dbscan needs eps and min_samples")
        if not eps > 0 or min_samples < 1:
            raise LoraError(f"dbscan needs eps > 0 and min_samples ≥ 1; got {eps:g}, {min_samples}")
        labels = clustering.dbscan(km.distance(), eps, min_samples)
        params = {"eps": eps, "min_samples": min_samples}
    else:
        if auto_k:
            k, evals = clustering.eigengap_k(affinity)
            params["laplacian_eigenvalues"] = [float(v) for v in evals[:min(n, 10)]]
        params.update(k=k, restarts=restarts)
        if method == "spectral":
            labels = clustering.spectral_clustering(affinity, k, seed=seed, restarts=restarts)
        else:
            labels, objective = clustering.kernel_kmeans(km.matrix, k, seed=seed, restarts=restarts)
            params["objective"] = objective
    found = len(set(labels.tolist()) - {clustering.NOISE})
    if method == "dbscan" and np.all(labels == clustering.NOISE):
        warnings.append(f"DBSCAN marked every LoRA as noise at eps={eps:g}; distances range "
                        f"{_off_diagonal_range(km.distance())}")
    order = clustering.cluster_order(km.matrix, labels)
    return Clustering(method, labels, order, found, auto_k, params, warnings)


def check_seed(seed) -> None:
    """numpy's generators take whole numbers ≥ 0 only (else a ValueError traceback)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise LoraError(f"clustering seed must be a whole number ≥ 0, got {seed!r}")


def _off_diagonal_range(dist: np.ndarray) -> str:
    n = len(dist)
    if n < 2:
        return "n/a"
    off = dist[~np.eye(n, dtype=bool)]
    return f"{off.min():.3g}…{off.max():.3g}"


def cluster_as_asked(km, clusters: int | None, dbscan, method: str = "spectral", seed: int = 0,
                     force: bool = False):
    """(clustering, note): the clusters asked for (k, or DBSCAN's (EPS, MIN)); without either,
    k by the eigengap, which is optional: when it fails the note says why instead."""
    explicit = clusters is not None or dbscan is not None
    check_seed(seed)            # asked for by the caller even when k is automatic
    if dbscan is not None:
        try:
            eps, min_samples = float(dbscan[0]), int(dbscan[1])
        except (TypeError, ValueError, IndexError):
            raise LoraError(f"dbscan needs EPS (a number) and MIN (an integer); got {dbscan}")
        kwargs = dict(method="dbscan", eps=eps, min_samples=min_samples)
    else:
        kwargs = dict(method=method, k=clusters)
    try:
        return cluster_kernel_matrix(km, seed=seed, force=force, **kwargs), None
    except LoraError as err:
        if explicit:
            raise
        return None, f"no clustering: {err}"
