from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mmssl.errors import ConfigError
from mmssl.nn import kmeans as kmeans_module
from mmssl.nn.kmeans import FAISS_ROUND, KMeans, _nearest_split, kmeans_plus_plus, mean_and_variance, nearest


def _blobs(n: int = 3000, k: int = 12, dim: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 4
    which = torch.randint(k, (n,), generator=g)
    return centres[which] + torch.randn(n, dim, generator=g)


@pytest.mark.parametrize("seed", [0, 1])
def test_inertia_within_one_percent_of_scikit_learn(seed):
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x = _blobs(seed=seed)
    ours = KMeans(12, n_init=3, seed=seed).fit(x)
    ref = sklearn_cluster.KMeans(12, n_init=3, random_state=seed).fit(x.double().numpy())
    assert ours.inertia <= ref.inertia_ * 1.01


def test_inertia_close_to_scikit_learn_on_unstructured_data():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x = torch.randn(2000, 5, generator=torch.Generator().manual_seed(3))
    ours = KMeans(20, n_init=4, seed=0).fit(x)
    ref = sklearn_cluster.KMeans(20, n_init=4, random_state=0).fit(x.double().numpy())
    assert ours.inertia <= ref.inertia_ * 1.01


def test_nearest_matches_brute_force_and_inertia_is_consistent():
    x = _blobs(n=500)
    km = KMeans(6, seed=0).fit(x)
    labels, dists = nearest(x, km.centroids, chunk=64)
    brute = torch.cdist(x, km.centroids).pow(2)
    assert torch.equal(labels, brute.argmin(1))
    assert torch.allclose(dists, brute.min(1).values, atol=1e-3)
    assert abs(dists.sum().item() - km.inertia) < 1e-3 * km.inertia
    assert torch.equal(km.predict(x), labels)
    # every centroid is the mean of its points (Lloyd's fixed point)
    for c in range(6):
        assert torch.allclose(km.centroids[c], x[labels == c].mean(0), atol=1e-3)


def test_nearest_adds_each_row_to_its_centroid_sum_across_blocks():
    x = _blobs(n=301, k=7, dim=5, seed=2)  # 301 rows in blocks of 64: the last one short
    centroids = x[torch.randperm(301, generator=torch.Generator().manual_seed(0))[:7]]
    sums = torch.full((7, 5), 0.5)  # added to, not overwritten
    labels, dists = nearest(x, centroids, chunk=64, sums=sums)
    brute = torch.cdist(x, centroids).pow(2)
    assert torch.equal(labels, brute.argmin(1))
    assert torch.allclose(dists, brute.min(1).values, atol=1e-3)
    for c in range(7):
        assert torch.allclose(sums[c], 0.5 + x[labels == c].sum(0), atol=1e-4)


def test_rows_split_between_threads_give_what_one_pass_gives(monkeypatch):
    x = _blobs(n=1001, k=9, dim=6, seed=4)
    centroids = x[:9].clone()
    x_sq = x.pow(2).sum(1)
    whole = torch.zeros(9, 6)
    labels, dists = nearest(x, centroids, 64, x_sq, sums=whole)
    split = torch.zeros(9, 6)
    with ThreadPoolExecutor(3) as pool:
        got_labels, got_dists = _nearest_split(x, centroids, 64, x_sq, split, pool, 3)
    assert torch.equal(got_labels, labels) and torch.allclose(got_dists, dists)
    assert torch.allclose(split, whole, atol=1e-4)
    # a whole fit takes the same steps split or not
    monkeypatch.setattr(kmeans_module, "SPLIT_ROWS", 10)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threaded = KMeans(9, seed=0, max_iter=8, tol=0, engine="torch").fit(x)
        assert torch.get_num_threads() == 2  # the workers' one-thread setting stays theirs
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(kmeans_module, "SPLIT_ROWS", 10**9)
    single = KMeans(9, seed=0, max_iter=8, tol=0, engine="torch").fit(x)
    assert torch.allclose(threaded.centroids, single.centroids, atol=1e-4)
    assert abs(threaded.inertia - single.inertia) < 1e-5 * single.inertia


def test_plus_plus_seeds_are_distinct_data_points():
    x = _blobs(n=400, k=5)
    seeds = kmeans_plus_plus(x, 5, torch.Generator().manual_seed(0))
    assert seeds.shape == (5, 8)
    assert all((x == s).all(1).any() for s in seeds)
    assert torch.pdist(seeds).min() > 0


@pytest.mark.parametrize("engine", ["torch", "faiss", "sklearn"])
def test_duplicate_points_and_bad_shapes(engine):
    if engine != "torch":
        pytest.importorskip(engine)
    x = torch.zeros(10, 3)
    x[5:] = 1.0
    km = KMeans(4, seed=0, engine=engine).fit(x)  # fewer distinct points than clusters
    # faiss fills an empty cluster by splitting a full one into two copies 1/1024 apart
    assert km.inertia < (1e-6 if engine == "torch" else 5 * 3 / 1024**2 + 1e-6)
    with pytest.raises(ConfigError, match="k=4"):
        KMeans(4).fit(torch.zeros(3, 2))
    with pytest.raises(ConfigError, match="not fitted"):
        KMeans(2).predict(x)


def test_faiss_and_torch_engines_take_the_same_lloyd_steps():
    pytest.importorskip("faiss")
    x = _blobs(n=3000)
    torch_km = KMeans(12, seed=0, max_iter=15, tol=0, engine="torch").fit(x)
    faiss_km = KMeans(12, seed=0, max_iter=15, tol=0, engine="faiss").fit(x)
    # converged (no centroid moved) at step 3 in torch; faiss at most a round of steps later
    assert torch_km.n_iter <= faiss_km.n_iter < torch_km.n_iter + 2 * FAISS_ROUND
    assert abs(faiss_km.inertia - torch_km.inertia) < 1e-4 * torch_km.inertia
    assert torch.allclose(faiss_km.centroids, torch_km.centroids, atol=1e-3)
    seen = []
    slow = _blobs(n=3000, k=40, dim=8, seed=1)  # more centres than clusters: still moving at 7
    KMeans(12, seed=0, max_iter=7, tol=0, engine="faiss").fit(
        slow, progress=lambda it, inertia: seen.append(it)
    )
    assert seen == list(range(1, 8))  # every iteration reported, the last round cut to max_iter
    with pytest.raises(ConfigError, match="engine"):
        KMeans(12, engine="elkan")
    with pytest.raises(ConfigError, match="CPU"):
        KMeans(12, engine="faiss").lloyd_engine(torch.device("cuda"))


def test_sklearn_and_torch_engines_take_the_same_lloyd_steps():
    pytest.importorskip("sklearn")
    slow = _blobs(n=4000, k=40, dim=8, seed=1)  # more centres than clusters: still moving at 9
    seen = {"torch": [], "sklearn": []}
    fits = {
        engine: KMeans(12, seed=0, max_iter=9, tol=0, engine=engine).fit(
            slow, progress=lambda it, inertia, e=engine: seen[e].append((it, inertia))
        )
        for engine in ("torch", "sklearn")
    }
    assert fits["torch"].n_iter == fits["sklearn"].n_iter == 9
    assert torch.allclose(fits["sklearn"].centroids, fits["torch"].centroids, atol=1e-4)
    assert fits["sklearn"].inertia == pytest.approx(fits["torch"].inertia, rel=1e-5)
    # the inertia of every iteration's assignment, falling, the same in both engines
    assert [it for it, _ in seen["sklearn"]] == list(range(1, 10))
    for (_, ours), (_, ref) in zip(seen["sklearn"], seen["torch"]):
        assert ours == pytest.approx(ref, rel=1e-5)
    assert seen["sklearn"][-1][1] < seen["sklearn"][0][1]
    x = _blobs(n=3000)  # converges: both stop at the same step
    a, b = (KMeans(12, seed=0, max_iter=50, tol=1e-4, engine=e).fit(x) for e in ("torch", "sklearn"))
    assert a.n_iter == b.n_iter < 50
    assert KMeans(12).lloyd_engine(torch.device("cpu")) == "sklearn"
    with pytest.raises(ConfigError, match="CPU"):
        KMeans(12, engine="sklearn").lloyd_engine(torch.device("cuda"))


def test_auto_engine_falls_back_when_scikit_learn_has_no_usable_lloyd_step(monkeypatch):
    lloyd = pytest.importorskip("sklearn.cluster._k_means_lloyd")

    def old_signature(x, weights, x_sq, old, new, in_cluster, labels, shift, threads, update=True):
        if x_sq.ndim != 1:  # what Cython says of a (K, D) array passed for the rows' norms
            raise ValueError("Buffer has wrong number of dimensions (expected 1, got 2)")

    def does_nothing(*args):
        pass

    for fake in (old_signature, does_nothing):
        monkeypatch.setattr(lloyd, "lloyd_iter_chunked_dense", fake)
        assert kmeans_module._sklearn_lloyd_step.__wrapped__() is None
    monkeypatch.setattr(kmeans_module, "_sklearn_lloyd_step", lambda: None)
    expected = "faiss" if kmeans_module.faiss_available() else "torch"
    assert KMeans(12).lloyd_engine(torch.device("cpu")) == expected
    with pytest.raises(ConfigError, match="scikit-learn"):
        KMeans(12, engine="sklearn").lloyd_engine(torch.device("cpu"))


def test_mean_and_variance_are_the_column_means_and_the_mean_per_dimension_variance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 7, generator=g) * torch.arange(1, 8) + 40.0  # a large mean, unequal scales
    mean, variance = mean_and_variance(x)
    assert variance == pytest.approx(x.double().var(0, unbiased=False).mean().item(), rel=1e-5)
    torch.testing.assert_close(mean, x.double().mean(0).float())
    far = torch.randn(20000, 39, generator=g) * 0.01 + 1000.0  # spread 1e-5 of the offset
    far_variance = far.double().var(0, unbiased=False).mean().item()
    assert mean_and_variance(far)[1] == pytest.approx(far_variance, rel=1e-2)
    assert mean_and_variance(torch.full((10, 3), 2.5))[1] == pytest.approx(0.0, abs=1e-5)
    assert mean_and_variance(torch.ones(1, 4))[1] == 0.0


@pytest.mark.parametrize("engine", ["torch", "sklearn"])
def test_a_fit_does_not_depend_on_where_the_data_sit(engine):
    """Far from the origin float32 distances round badly; the fit centres such data first."""
    if engine != "torch":
        pytest.importorskip(engine)
    x = _blobs(n=3000, k=12, dim=16, seed=2)
    near = KMeans(12, seed=0, max_iter=60, engine=engine).fit(x)
    far = KMeans(12, seed=0, max_iter=60, engine=engine).fit(x + 1000.0)
    assert far.inertia == pytest.approx(near.inertia, rel=1e-3)
    again = KMeans(12, seed=0, max_iter=60, engine=engine)
    again.fit(x * 0.01 + 1000.0), again.fit(x)  # a second fit forgets the first (a far lower inertia)
    assert torch.equal(again.centroids, near.centroids)
    assert torch.allclose(far.centroids - 1000.0, near.centroids, atol=1e-2)
    assert far.n_iter < 60


@pytest.mark.parametrize("engine", ["torch", "sklearn"])
def test_lloyd_stops_when_no_label_changes(engine):
    """40 distinct points, each 50 times, and 60 clusters: empty clusters keep moving by rounding,
    but once no label changes the fit is over (scikit-learn's strict convergence)."""
    if engine != "torch":
        pytest.importorskip(engine)
    points = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    km = KMeans(60, seed=0, max_iter=300, engine=engine).fit(points.repeat(50, 1))
    assert km.n_iter < 300
    assert km.inertia < 1e-3


def test_a_column_major_init_is_accepted():
    pytest.importorskip("sklearn")
    x = _blobs(n=500)
    init = x[:12].clone().T.contiguous().T  # the same values, Fortran order
    km = KMeans(12, max_iter=5, tol=0, engine="sklearn").fit(x, init=init)
    ref = KMeans(12, max_iter=5, tol=0, engine="sklearn").fit(x, init=x[:12].clone())
    assert torch.equal(km.centroids, ref.centroids)


@pytest.mark.cuda
def test_runs_on_the_gpu():
    x = _blobs(n=2000).cuda()
    km = KMeans(12, n_init=2).fit(x)
    assert km.centroids.is_cuda
    cpu = KMeans(12, n_init=2).fit(x.cpu())
    assert km.inertia <= cpu.inertia * 1.01


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_minibatch_inertia_within_a_few_percent_of_full_lloyd(seed):
    # restarts on both sides: a single seeding can land either in a worse local minimum
    x = _blobs(n=4000, seed=seed)
    full = KMeans(12, n_init=3, seed=seed).fit(x)
    mini = KMeans(12, n_init=3, seed=seed, batch_size=256, max_iter=20).fit(x)
    assert mini.centroids.shape == (12, 8)
    assert mini.inertia <= full.inertia * 1.03
    labels, dists = nearest(x, mini.centroids)
    assert abs(dists.sum().item() - mini.inertia) < 1e-3 * mini.inertia
    assert torch.equal(mini.predict(x), labels)
    with pytest.raises(ConfigError, match="batch_size"):
        KMeans(4, batch_size=0)


def test_fit_from_given_centroids_runs_lloyd_once():
    x = _blobs(n=600, k=4)
    init = x[:4].clone()
    km = KMeans(4, max_iter=3, tol=0, n_init=5, engine="torch").fit(x, init=init)
    again = KMeans(4, max_iter=3, tol=0, engine="torch").fit(x, init=init)
    assert torch.equal(km.centroids, again.centroids) and torch.equal(init, x[:4])  # init left as it was
    with pytest.raises(ConfigError, match="init"):
        KMeans(4).fit(x, init=x[:3])
