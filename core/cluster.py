"""Clustering on a kernel (Gram) matrix, numpy only (ComfyUI has no scikit-learn).

- spectral clustering: normalised Laplacian L = I − D^{-1/2} A D^{-1/2} of a
  non-negative affinity A, rows of its k smallest eigenvectors normalised to unit
  length (Ng, Jordan & Weiss 2001), then k-means on them;
- kernel k-means: Lloyd iterations with feature-space distances
  ‖φ(x) − μ_C‖² = K_xx − 2·mean_{y∈C} K_xy + mean_{y,z∈C} K_yz, k-means++ seeding,
  several seeded restarts, best objective kept (Euclidean k-means is the linear
  kernel case, which spectral clustering uses);
- DBSCAN on a distance matrix (eps, min_samples counting the point itself; noise −1);
- the number of clusters by the largest eigengap of L when none is given;
- an ordering for heatmaps: clusters in turn, members chained by similarity.

Labels are renumbered by first appearance so results do not depend on the
arbitrary cluster numbering of a restart.
"""
from __future__ import annotations

import numpy as np

NOISE = -1


def induced_sq_distance(kernel: np.ndarray) -> np.ndarray:
    """d(x,y)² = k(x,x) + k(y,y) − 2k(x,y), clamped at 0 (rounding, or an indefinite kernel)."""
    k = np.asarray(kernel, dtype=np.float64)
    diag = np.diag(k)
    return np.maximum(diag[:, None] + diag[None, :] - 2.0 * k, 0.0)


def kernel_affinity(kernel: np.ndarray) -> np.ndarray:
    """Affinity for spectral clustering: K minus its smallest off-diagonal value.

    A constant added to every kernel value says nothing about groups (kernel
    k-means distances ignore it), but a graph Laplacian reads it as edges between
    everything: unrelated LoRAs under a wide kernel (e.g. Laplace at small β) sit
    on a floor of 0.1–0.4 that hides the clusters from the eigengap. Removing the
    floor keeps the order of similarities and makes the values non-negative
    (which the logarithm kernels, ≤ 0, need anyway)."""
    k = np.asarray(kernel, dtype=np.float64)
    n = len(k)
    if n < 2:
        return np.ones_like(k)
    floor = k[~np.eye(n, dtype=bool)].min()
    return np.maximum(k - floor, 0.0)


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0, 1, … in order of first appearance; noise stays −1."""
    labels = np.asarray(labels)
    out = np.full(labels.shape, NOISE, dtype=int)
    mapping: dict[int, int] = {}
    for i, lab in enumerate(labels):
        if lab == NOISE:
            continue
        out[i] = mapping.setdefault(int(lab), len(mapping))
    return out


def _laplacian_spectrum(affinity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the normalised Laplacian."""
    a = np.maximum(np.asarray(affinity, dtype=np.float64), 0.0)
    a = 0.5 * (a + a.T)
    inv_sqrt_deg = 1.0 / np.sqrt(np.maximum(a.sum(1), np.finfo(float).tiny))
    lap = np.eye(len(a)) - inv_sqrt_deg[:, None] * a * inv_sqrt_deg[None, :]
    return np.linalg.eigh(0.5 * (lap + lap.T))


def eigengap_k(affinity: np.ndarray, k_max: int | None = None) -> tuple[int, np.ndarray]:
    """k maximising λ_{k+1} − λ_k of the normalised Laplacian (1 ≤ k ≤ k_max ≤ n − 1).
    Returns (k, eigenvalues)."""
    n = len(affinity)
    evals, _ = _laplacian_spectrum(affinity)
    if n < 2:
        return n, evals
    k_max = n - 1 if k_max is None else max(1, min(int(k_max), n - 1))
    gaps = np.diff(evals)[:k_max]
    return int(np.argmax(gaps)) + 1, evals


def _kmeanspp_centres(sq_dist: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    n = len(sq_dist)
    centres = [int(rng.integers(n))]
    for _ in range(1, k):
        nearest = sq_dist[:, centres].min(1)
        total = nearest.sum()
        if total <= 0:  # fewer distinct points than k: pick any unused one
            rest = [i for i in range(n) if i not in centres]
            centres.append(int(rng.choice(rest)))
        else:
            centres.append(int(rng.choice(n, p=nearest / total)))
    return centres


def _distances_to_means(kernel: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """n×k matrix of ‖φ(x) − μ_c‖²; +inf for empty clusters."""
    n = len(kernel)
    onehot = np.zeros((n, k))
    onehot[np.arange(n), labels] = 1.0
    sizes = onehot.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = kernel @ onehot / sizes                               # mean_{y∈C} K_xy
        within = np.einsum("ic,ij,jc->c", onehot, kernel, onehot) / sizes ** 2
    dist = np.diag(kernel)[:, None] - 2.0 * cross + within[None, :]
    dist[:, sizes == 0] = np.inf
    return dist


def kernel_kmeans(kernel: np.ndarray, k: int, seed: int = 0, restarts: int = 10,
                  max_iter: int = 100) -> tuple[np.ndarray, float]:
    """Kernel k-means; returns (labels, objective Σ‖φ(x) − μ_{c(x)}‖²) of the best restart."""
    kernel = np.asarray(kernel, dtype=np.float64)
    n = len(kernel)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of points ({n}); got {k}")
    sq_dist = induced_sq_distance(kernel)
    rng = np.random.default_rng(seed)
    best_labels, best_obj = None, np.inf
    for _ in range(max(1, restarts)):
        centres = _kmeanspp_centres(sq_dist, k, rng)
        labels = np.argmin(sq_dist[:, centres], axis=1)
        labels[centres] = np.arange(k)
        for _ in range(max_iter):
            dist = _distances_to_means(kernel, labels, k)
            new = np.argmin(dist, axis=1)
            for c in range(k):  # refill an emptied cluster with the worst-fitting point
                if not np.any(new == c):
                    worst = int(np.argmax(dist[np.arange(n), new]))
                    new[worst] = c
            if np.array_equal(new, labels):
                break
            labels = new
        dist = _distances_to_means(kernel, labels, k)
        obj = float(np.maximum(dist[np.arange(n), labels], 0.0).sum())
        if obj < best_obj - 1e-12:
            best_labels, best_obj = labels.copy(), obj
    return canonical_labels(best_labels), best_obj


def spectral_embedding(affinity: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k smallest Laplacian eigenvectors, normalised to unit length."""
    _, evecs = _laplacian_spectrum(affinity)
    emb = evecs[:, :k]
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, np.finfo(float).tiny)


def spectral_clustering(affinity: np.ndarray, k: int | None = None, seed: int = 0,
                        restarts: int = 10) -> np.ndarray:
    """Normalised spectral clustering of a non-negative affinity (negative entries
    count as 0); k by eigengap when None."""
    if k is None:
        k, _ = eigengap_k(affinity)
    emb = spectral_embedding(affinity, k)
    labels, _ = kernel_kmeans(emb @ emb.T, k, seed=seed, restarts=restarts)
    return labels


def dbscan(distance: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN (Ester et al. 1996) on a precomputed distance matrix. A point is core
    when at least min_samples points (itself included) lie within eps; noise is −1."""
    if not eps > 0 or min_samples < 1:
        raise ValueError(f"DBSCAN needs eps > 0 and min_samples ≥ 1; got {eps}, {min_samples}")
    dist = np.asarray(distance, dtype=np.float64)
    n = len(dist)
    neighbours = [np.flatnonzero(dist[i] <= eps) for i in range(n)]
    core = np.array([len(nb) >= min_samples for nb in neighbours])
    labels = np.full(n, NOISE, dtype=int)
    cluster = 0
    for start in range(n):
        if labels[start] != NOISE or not core[start]:
            continue
        labels[start] = cluster
        queue = [start]
        while queue:
            p = queue.pop()
            if not core[p]:
                continue  # border point: in the cluster, but does not extend it
            for q in neighbours[p]:
                if labels[q] == NOISE:
                    labels[q] = cluster
                    queue.append(int(q))
        cluster += 1
    return labels


def cluster_order(similarity: np.ndarray, labels: np.ndarray) -> list[int]:
    """Heatmap order: clusters by size (largest first, noise last); inside a
    cluster, start at the member most similar to the rest and repeatedly append
    the unplaced member most similar to the last one placed."""
    sim = np.asarray(similarity, dtype=np.float64)
    sim = np.where(np.isfinite(sim), sim, -np.inf)
    labels = np.asarray(labels)
    clusters = sorted(set(labels.tolist()),
                      key=lambda c: (c == NOISE, -int(np.sum(labels == c)), c))
    order: list[int] = []
    for c in clusters:
        members = [int(i) for i in np.flatnonzero(labels == c)]
        if c == NOISE:
            order.extend(members)
            continue
        sub = sim[np.ix_(members, members)]
        mean_sim = np.where(np.isfinite(sub), sub, 0.0).sum(1)
        current = members[int(np.argmax(mean_sim))]
        chain, left = [current], set(members) - {current}
        while left:
            current = max(sorted(left), key=lambda j: sim[current, j])
            chain.append(current)
            left.discard(current)
        order.extend(chain)
    return order
