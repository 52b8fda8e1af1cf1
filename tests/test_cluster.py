import itertools

import numpy as np
import pytest
import scipy.sparse.csgraph

from core.cluster import (NOISE, canonical_labels, cluster_order, dbscan, eigengap_k,
                          induced_sq_distance, kernel_affinity, kernel_kmeans, spectral_clustering)
from core.kernel_matrix import cluster_kernel_matrix, compute_kernel_matrix
from core.synthetic import perturbed_lora, random_lora


def same_partition(labels, truth) -> bool:
    """Equal up to renaming the clusters."""
    labels, truth = np.asarray(labels), np.asarray(truth)
    return np.array_equal(labels[:, None] == labels[None, :], truth[:, None] == truth[None, :])


@pytest.fixture(scope="module")
def planted():
    """3 families: small perturbations of 3 random base LoRAs, interleaved, plus
    one unrelated LoRA (an outlier for DBSCAN)."""
    bases = [random_lora("sd1", 4, seed=100 + b, limit=8) for b in range(3)]
    loras, truth = [], []
    for i in range(5):
        for b in range(3):
            loras.append(perturbed_lora(bases[b], 0.3, seed=10 * b + i, path=f"fam{b}_{i}.safetensors"))
            truth.append(b)
    loras.append(random_lora("sd1", 4, seed=999, limit=8, path="outlier.safetensors"))
    km = compute_kernel_matrix(loras, "projection-rbf", beta=1.0)
    return km, np.array(truth + [NOISE])


@pytest.mark.parametrize("method", ["spectral", "kernel-kmeans"])
def test_planted_families_recovered_with_given_k(planted, method):
    km, truth = planted
    fam = truth != NOISE
    result = cluster_kernel_matrix(km, method, k=4, seed=3)
    assert same_partition(result.labels, np.where(fam, truth, 3))
    assert result.k == 4 and not result.auto_k


@pytest.mark.parametrize("method", ["spectral", "kernel-kmeans"])
def test_eigengap_finds_the_planted_number(planted, method):
    km, truth = planted
    result = cluster_kernel_matrix(km, method)          # k chosen by eigengap
    assert result.auto_k and result.k == 4              # 3 families + the lone outlier
    assert same_partition(result.labels, np.where(truth == NOISE, 3, truth))


def test_dbscan_recovers_families_and_marks_the_outlier(planted):
    km, truth = planted
    # normalised RBF: d = √(2 − 2K); within a family K ≈ 0.5 (d ≈ 1), unrelated K ≈ 0.02 (d ≈ 1.4)
    result = cluster_kernel_matrix(km, "dbscan", eps=1.2, min_samples=3)
    assert result.labels[-1] == NOISE
    assert same_partition(result.labels, truth)
    assert result.k == 3


def test_eigengap_on_block_affinities():
    rng = np.random.default_rng(0)
    for sizes in ([4, 5, 6], [3, 3, 3, 3], [10]):
        n = sum(sizes)
        truth = np.repeat(np.arange(len(sizes)), sizes)
        a = np.where(truth[:, None] == truth[None, :], 0.8, 0.05) + 0.02 * rng.random((n, n))
        a = 0.5 * (a + a.T)
        k, evals = eigengap_k(a)
        assert k == len(sizes)
        assert np.all(np.diff(evals) >= -1e-12)
        assert same_partition(spectral_clustering(a, seed=1), truth)


def test_kernel_kmeans_reaches_the_brute_force_optimum():
    """Linear kernel on 2-D points: the best of the restarts equals the best
    objective over every partition (enumerated)."""
    rng = np.random.default_rng(4)
    points = np.concatenate([rng.normal(c, 0.6, (3, 2)) for c in ((0, 0), (3, 0), (0, 3))])
    k_lin = points @ points.T
    for k in (2, 3):
        labels, objective = kernel_kmeans(k_lin, k, seed=0, restarts=10)
        best = np.inf
        for assign in itertools.product(range(k), repeat=len(points)):
            assign = np.array(assign)
            if len(set(assign)) < k or assign[0] != 0:
                continue
            best = min(best, sum(((points[assign == c] - points[assign == c].mean(0)) ** 2).sum()
                                 for c in range(k)))
        assert np.isclose(objective, best, rtol=1e-9)
        own = sum(((points[labels == c] - points[labels == c].mean(0)) ** 2).sum() for c in range(k))
        assert np.isclose(own, objective, rtol=1e-9)


def test_dbscan_matches_its_definition_on_random_points():
    """Core points: clusters are the connected components of the eps-graph among
    core points (scipy); borders join a neighbouring core's cluster; the rest is noise."""
    rng = np.random.default_rng(7)
    points = np.concatenate([rng.normal(0, 0.3, (15, 2)), rng.normal(4, 0.3, (12, 2)),
                             rng.uniform(-3, 7, (8, 2))])
    dist = np.linalg.norm(points[:, None] - points[None, :], axis=-1)
    for eps, min_samples in ((0.5, 4), (0.8, 3), (0.3, 2)):
        labels = dbscan(dist, eps, min_samples)
        near = dist <= eps
        core = near.sum(1) >= min_samples
        core_idx = np.flatnonzero(core)
        _, comp = scipy.sparse.csgraph.connected_components(near[np.ix_(core_idx, core_idx)],
                                                            directed=False)
        assert same_partition(labels[core_idx], comp)
        for i in np.flatnonzero(~core):
            core_nbrs = core_idx[near[i, core_idx]]
            if len(core_nbrs):
                assert labels[i] in set(labels[core_nbrs])
            else:
                assert labels[i] == NOISE
    with pytest.raises(ValueError):
        dbscan(dist, 0.0, 3)


def test_induced_distance_and_affinity():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(6, 4))
    k = feats @ feats.T
    ref = ((feats[:, None] - feats[None, :]) ** 2).sum(-1)
    assert np.allclose(induced_sq_distance(k), ref)
    a = kernel_affinity(k)
    off = ~np.eye(6, dtype=bool)
    assert a[off].min() == 0.0 and np.all(a >= 0)
    assert np.array_equal(np.argsort(a[off]), np.argsort(k[off]))   # same order of similarity


def test_cluster_order_groups_and_chains():
    rng = np.random.default_rng(2)
    labels = np.array([1, 0, 1, NOISE, 0, 1, 2, 1, NOISE])
    sim = rng.random((9, 9))
    sim = sim + sim.T
    order = cluster_order(sim, labels)
    assert sorted(order) == list(range(9))
    ordered = labels[order]
    assert list(ordered) == [1, 1, 1, 1, 0, 0, 2, NOISE, NOISE]    # by size, noise last
    chain = order[:4]
    for a, b in zip(chain, chain[1:]):                          # each next = most similar unplaced
        unplaced = [j for j in chain[chain.index(a) + 1:]]
        assert sim[a, b] == max(sim[a, j] for j in unplaced)


def test_seeded_and_canonical():
    assert list(canonical_labels(np.array([5, 5, 2, NOISE, 2, 7]))) == [0, 0, 1, NOISE, 1, 2]
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(20, 3))
    k = pts @ pts.T
    a, _ = kernel_kmeans(k, 3, seed=11)
    b, _ = kernel_kmeans(k, 3, seed=11)
    assert np.array_equal(a, b) and a[0] == 0
    with pytest.raises(ValueError):
        kernel_kmeans(k, 0)
