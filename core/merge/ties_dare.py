"""TIES and DARE on the dense ΔW (space="full"), then its best rank p.

    ties     TIES (Yadav et al. 2023) on the task vectors τ_k = w_k ΔW_k: keep
             each τ_k's top `ties_density` fraction by magnitude, elect each
             entry's sign by the sign of Σ_k trimmed τ_k, average the trimmed
             entries that agree with it (disjoint mean); then rank p.
    dare     DARE (Yu et al. 2024): drop each entry of τ_k with probability q =
             `dare_drop`, rescale by 1/(1−q), sum (expectation = Σ w_k ΔW_k,
             seeded); then rank p.
"Rank p" is the best rank-p approximation of the dense result (top_singular:
subspace iteration converged to dense-SVD accuracy). These are the only merges
that form ΔW, elementwise by nature: chunked, memory bounded.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

from ..factored import FactoredSVD
from .basis import Job, Merged, split
from .plan import Options

CHUNK_ELEMENTS = 1 << 16        # ties/dare dense rows processed at a time (512 KiB in float64: in cache)
# ties/dare rank-p step: residuals ‖D v − σ u‖ ≤ rtol·σ_1, a few units of the dense dtype's rounding
# (a float32 product over n ≤ 10240 terms carries ~√n·6e-8 ≈ 6e-6 of σ_1).
DENSE_RTOL = {torch.float64: 1e-10, torch.float32: 3e-5}
SUBSPACE_OVERSAMPLING = 4       # extra block columns in top_singular
THRESHOLD_SAMPLE = 1 << 14      # entries sampled to bracket the TIES threshold


def ties_full(job: Job, opts: Options) -> Merged:
    return _dense(job, "ties", opts)


def dare_full(job: Job, opts: Options) -> Merged:
    return _dense(job, "dare", opts)


def ties_threshold(tau: torch.Tensor, density: float) -> float:
    """Magnitude of τ's k-th largest entry, k = density·n rounded (at least one)."""
    if tau.numel() <= 16 * THRESHOLD_SAMPLE:     # a core-sized matrix: one selection, no chunk copies
        a = tau.abs().reshape(-1)
        keep = max(1, min(a.numel(), int(math.floor(density * a.numel() + 0.5))))
        return float(a.kthvalue(a.numel() - keep + 1).values)
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
    """Trim (|τ_k| ≥ its threshold), elect sign(Σ_k trimmed τ_k), disjoint mean.

    In place on the trimmed copies, no boolean masks (bool→float arithmetic was
    most of the time): an entry agrees when τ_k·sign > 0, and max(τ_k·sign, 0)
    is |τ_k| there, 0 elsewhere; the agreeing |τ_k| summed and signed again are
    the agreeing τ_k summed (IEEE sums are sign-symmetric: the same bits)."""
    trimmed = [F.hardshrink(t, _below(t, th)) for t, th in zip(taus, thresholds)]
    elected = torch.sign(sum(trimmed))
    total, count = torch.zeros_like(taus[0]), torch.zeros_like(taus[0])
    for t in trimmed:
        agree = t.mul_(elected).clamp_min_(0)
        total += agree
        count += agree.sign_()
    # where the elected sign is 0 nothing agrees: a 0 total over count 1
    return total.mul_(elected).div_(count.clamp_min_(1))


def _below(t: torch.Tensor, th: float) -> float:
    """The largest value of t's dtype below th (th ≥ 0): hardshrink keeps |x| > it, i.e. |x| ≥ th."""
    return float(torch.nextafter(t.new_tensor(th), t.new_zeros(()))) if th > 0 else 0.0


def dare_combine(taus: list[torch.Tensor], drop: float, generators: list[torch.Generator]) -> torch.Tensor:
    """Σ_k τ_k ⊙ mask_k / (1 − q), mask entries kept with probability 1 − q
    (float32 uniforms: half the cost of float64 ones, q resolved to 2⁻²⁴)."""
    out = torch.zeros_like(taus[0])
    for t, g in zip(taus, generators):
        keep = torch.rand(t.shape, generator=g, device=t.device, dtype=torch.float32) >= drop
        out += torch.where(keep, t, torch.zeros_like(t))
    return out / (1.0 - drop)


def dare_generators(name: str, seed: int, tags: list[int], dev: torch.device) -> list[torch.Generator]:
    """One generator per source, seeded from the seed, the module's name and the source's tag."""
    name_hash = zlib.crc32(name.encode())
    return [torch.Generator(device=dev).manual_seed((seed * 1_000_003 + name_hash * 7919 + t * 104_729) % (2 ** 63))
            for t in tags]


def source_tags(job: Job) -> list[int]:
    """Per source a tag from its file name (repeats of one name counted in order): DARE's
    masks then follow the source, not its place in the list (order invariance)."""
    seen: dict[str, int] = {}
    tags = []
    for s in job.sources:
        seen[s.label] = seen.get(s.label, -1) + 1
        tags.append(zlib.crc32(f"{s.label}#{seen[s.label]}".encode()))
    return tags


def elementwise(rule: str, mats: list[torch.Tensor], job: Job, opts: Options) -> torch.Tensor:
    """TIES or DARE on whole matrices of one shape, one per source: the core and
    KnOTS rules (KnOTS's R×d_in blocks are several MiB each: combined in row
    chunks, as the dense rule's)."""
    thresholds = [ties_threshold(m, opts["ties_density"]) for m in mats] if rule == "ties" else None
    gens = dare_generators(job.name, opts["seed"], source_tags(job), mats[0].device) if rule == "dare" else None
    return _combine_rows(rule, lambda rows: [m[rows] for m in mats], mats[0].shape, mats[0].dtype,
                         mats[0].device, thresholds, gens, opts)


def _combine_rows(rule: str, taus_of, shape: tuple[int, int], dtype: torch.dtype, device,
                  thresholds: list[float] | None, gens: list[torch.Generator] | None, opts: Options) -> torch.Tensor:
    """TIES or DARE over a (rows × n) result, CHUNK_ELEMENTS entries of rows at a
    time: taus_of(rows) gives every source's chunk (a slice of a whole matrix, or
    formed from factors on the fly). Small chunks stay in cache: whole-matrix
    elementwise passes ran at memory speed, several times slower; DARE draws each
    source's mask chunk after chunk from its generator: the same masks whatever
    the chunk size."""
    out = torch.empty(shape, dtype=dtype, device=device)
    step = max(1, CHUNK_ELEMENTS // max(1, shape[1]))
    for i in range(0, shape[0], step):
        rows = slice(i, i + step)
        out[rows] = (ties_combine(taus_of(rows), thresholds) if rule == "ties"
                     else dare_combine(taus_of(rows), opts["dare_drop"], gens))
    return out


def _dense(job: Job, method: str, opts: Options) -> Merged:
    """ties/dare on ΔW, then its best rank-p approximation. The sources' task
    vectors are formed CHUNK_ELEMENTS at a time (rows: small chunks stay in
    cache, several times faster than whole-matrix elementwise passes), so memory
    holds the one dense result, never K dense copies. DARE draws each source's
    mask from its own generator chunk after chunk: the same masks whatever the
    chunk size. work: the dense dtype — float64 for a float64 result, else
    float32 (the result's own precision; half the memory traffic), with the
    rank-p step converged to that precision (DENSE_RTOL)."""
    work, seed = opts.dense_dtype, opts["seed"]
    factors = [((s.weight * s.svd.U * s.svd.S).to(work), s.svd.V.T.to(work)) for s in job.sources]
    thresholds = None
    if method == "ties":
        thresholds = [_kth_largest_abs(lambda rows, a=a, b=b: a[rows] @ b,
                                       lambda idx, a=a, b=b: (a[idx // job.d_in] * b[:, idx % job.d_in].T).sum(1),
                                       (job.d_out, job.d_in), opts["ties_density"])
                      for a, b in factors]
    dev = factors[0][0].device
    gens = dare_generators(job.name, seed, list(range(len(factors))), dev)
    dense = _combine_rows(method, lambda rows: [a[rows] @ b for a, b in factors], (job.d_out, job.d_in),
                          work, dev, thresholds, gens, opts)
    u, s, v = (x.to(torch.float64) for x in
               top_singular(dense, job.rank, seed, rtol=DENSE_RTOL[work], start=job.target.V.to(work)))
    return Merged(*split(u, s, v), known=FactoredSVD(u, s, v))


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


