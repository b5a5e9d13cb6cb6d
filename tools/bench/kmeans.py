"""k-means on a CPU: ours (``mmssl.nn.kmeans.KMeans``, each engine) against scikit-learn and
faiss, in one process, on the same points (issue 17).

Points are float32 draws from a Gaussian mixture (300 centres, unit noise around centres of
scale ``--centre-scale``, 3 by default), the same for every library of a row. At D=768 centres of
scale 3 are so far apart that Lloyd converges in a few iterations; ``--centre-scale 0.5`` keeps
the centroids moving for all ``--iters``. Each library runs ``--iters`` Lloyd iterations
with no early stop (``tol=0``) and ``k`` clusters:

* ours: our greedy k-means++ seeds (timed apart), then Lloyd by each of ``--engines`` from the
  same seeds: scikit-learn's compiled step (``engine=sklearn``, what a CPU gets by default),
  faiss's ``Clustering`` (``engine=faiss``) and torch (``engine=torch``);
* scikit-learn: ``kmeans_plusplus`` (its greedy k-means++, timed apart), then
  ``KMeans(init=seeds, n_init=1, algorithm="lloyd")``: together, ``KMeans(init="k-means++")``;
* faiss: ``faiss.Kmeans`` with its own random seeds, on every point (``max_points_per_centroid``
  lifted: by default it would fit on 256 points per centroid).

Lloyd time per iteration is the best of ``--repeats`` runs (the machine is shared); ours
includes one more assignment pass, which gives the final inertia. Inertia is the sum of
squared distances of every point to its nearest final centroid, computed the same way for
all. ``--fit-fraction`` adds, for ours, a fit on that random fraction of the points and its
inertia over all of them, against the full fit's (HuBERT fits on a sample, sec. IV-B).

    python tools/bench/kmeans.py --sizes 100000,1000000 --dims 39,768 --k 100 --out km.jsonl
"""

from __future__ import annotations

import os

# as `mmssl kmeans` (mmssl.cli.ENVIRONMENT): set before PyTorch, faiss and scikit-learn load
# their OpenMP runtimes, whose spinning threads otherwise slow each other down
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mmssl.errors import ConfigError, MmsslError  # noqa: E402
from mmssl.files import check_new_file  # noqa: E402
from mmssl.nn.kmeans import KMeans, faiss_available, kmeans_plus_plus, nearest, sklearn_available  # noqa: E402
from mmssl.tables import markdown_table  # noqa: E402

CENTRES = 300  # the mixture of issue 17's measurement


def mixture(n: int, dim: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    """``(n, dim)`` float32 points from a ``CENTRES``-component Gaussian mixture, centres of
    standard deviation ``scale`` around the origin and unit noise around the centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, dim), dtype=np.float32) * scale
    return centres[rng.integers(0, CENTRES, n)] + rng.standard_normal((n, dim), dtype=np.float32)


def inertia(x: torch.Tensor, centroids) -> float:
    return float(nearest(x, torch.as_tensor(np.asarray(centroids), dtype=torch.float32))[1].double().sum())


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def ours(x: torch.Tensor, k: int, iters: int, repeats: int, seed: int, engines: list[str]) -> list[dict]:
    seeds, init_s = _timed(lambda: kmeans_plus_plus(x, k, torch.Generator().manual_seed(seed)))
    rows = []
    for engine in engines:
        best, km = float("inf"), None
        for _ in range(repeats):
            km, took = _timed(lambda e=engine: KMeans(k, max_iter=iters, tol=0, engine=e).fit(x, init=seeds))
            best = min(best, took)
        rows.append(
            {
                "method": f"ours ({engine} Lloyd)",
                "init_s": init_s,
                "lloyd_s_per_it": best / km.n_iter,
                "iters": km.n_iter,
                "total_s": init_s + best,
                "inertia": inertia(x, km.centroids),
            }
        )
    return rows


def scikit_learn(x: np.ndarray, k: int, iters: int, seed: int) -> dict:
    from sklearn.cluster import KMeans as SkKMeans  # lazy: optional, the test extra
    from sklearn.cluster import kmeans_plusplus

    (seeds, _), init_s = _timed(lambda: kmeans_plusplus(x, k, random_state=seed))
    km = SkKMeans(k, init=seeds, n_init=1, max_iter=iters, tol=0, algorithm="lloyd", random_state=seed)
    km, lloyd_s = _timed(lambda: km.fit(x))
    return {
        "method": "scikit-learn k-means++",
        "init_s": init_s,
        "lloyd_s_per_it": lloyd_s / km.n_iter_,
        "iters": int(km.n_iter_),
        "total_s": init_s + lloyd_s,
        "inertia": inertia(torch.from_numpy(x), km.cluster_centers_),
    }


def faiss_kmeans(x: np.ndarray, k: int, iters: int, repeats: int, seed: int) -> dict:
    import faiss  # lazy: the benchmark's reference

    best = float("inf")
    for _ in range(repeats):
        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=x.shape[0] + 1)
        _, took = _timed(lambda km=km: km.train(x))
        best = min(best, took)
    return {
        "method": "faiss (random init, all points)",
        "init_s": 0.0,
        "lloyd_s_per_it": best / iters,
        "iters": iters,
        "total_s": best,
        "inertia": inertia(torch.from_numpy(x), km.centroids),
    }


def fit_fraction(x: torch.Tensor, k: int, iters: int, fraction: float, seed: int, full: float) -> dict:
    """Ours fitted on a random ``fraction`` of the points, its inertia over all of them."""
    pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    part = x[pick[: max(k, int(fraction * x.shape[0]))]]
    km, took = _timed(lambda: KMeans(k, max_iter=iters, tol=0, seed=seed).fit(part))
    return {
        "method": f"ours, fit on {fraction:g} of the points",
        "init_s": float("nan"),
        "lloyd_s_per_it": float("nan"),
        "iters": km.n_iter,
        "total_s": took,
        "inertia": inertia(x, km.centroids),
        "vs_full_fit": inertia(x, km.centroids) / full,
    }


def paired_seeds(x: torch.Tensor, k: int, iters: int, seeds: int) -> dict:
    """Our k-means++ against scikit-learn's over ``seeds`` seeds on the same points, each seeding
    followed by the same Lloyd iterations (ours, default engine): what is left between the two
    is the seeding. The ratio of final inertias, ours / scikit-learn's: mean, spread, wins."""
    from sklearn.cluster import kmeans_plusplus  # lazy: optional, the test extra

    ratios = []
    for seed in range(seeds):
        mine = kmeans_plus_plus(x, k, torch.Generator().manual_seed(seed))
        theirs = torch.from_numpy(kmeans_plusplus(x.numpy(), k, random_state=seed)[0])
        ends = [KMeans(k, max_iter=iters, tol=0).fit(x, init=init).inertia for init in (mine, theirs)]
        ratios.append(ends[0] / ends[1])
    r = np.array(ratios)
    sem = float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else float("nan")
    return {
        "seeds": seeds,
        "mean": float(r.mean()),
        "sem": sem,
        "min": float(r.min()),
        "max": float(r.max()),
        "ours_lower": int((r <= 1).sum()),
    }


def run_row(n: int, dim: int, args: argparse.Namespace) -> list[dict]:
    x_np = mixture(n, dim, args.seed, args.centre_scale)
    x = torch.from_numpy(x_np)
    rows = ours(x, args.k, args.iters, args.repeats, args.seed, args.engines.split(","))
    rows.append(faiss_kmeans(x_np, args.k, args.iters, args.repeats, args.seed))
    if n <= args.sklearn_max:
        rows.append(scikit_learn(x_np, args.k, args.iters, args.seed))
    if args.fit_fraction:
        rows.append(fit_fraction(x, args.k, args.iters, args.fit_fraction, args.seed, rows[0]["inertia"]))
    if args.paired_seeds:
        pair = paired_seeds(x, args.k, args.iters, args.paired_seeds)
        print(
            f"{n:,} x {dim}: final inertia from our seeds / from scikit-learn's, {pair['seeds']} seeds,"
            f" the same Lloyd after both: mean {pair['mean']:.4f} (standard error {pair['sem']:.4f}, range"
            f" {pair['min']:.4f}-{pair['max']:.4f}), ours lower in {pair['ours_lower']}"
        )
        rows[0]["paired_seeds"] = pair
    for row in rows:
        row.update({"n": n, "dim": dim, "k": args.k})
    return rows


def _number(value: float, spec: str) -> str:
    """``value`` formatted, or blank when not measured (NaN)."""
    return format(value, spec) if value == value else ""


def table(rows: list[dict]) -> str:
    """One line per (size, method): times, inertia, and ours against faiss and scikit-learn."""
    lines = []
    for row in rows:
        same = [r for r in rows if (r["n"], r["dim"]) == (row["n"], row["dim"])]
        ref = {r["method"].split(" ")[0]: r for r in same}
        speed = ref["faiss"]["lloyd_s_per_it"] / row["lloyd_s_per_it"] if row["lloyd_s_per_it"] > 0 else 0
        sk = ref.get("scikit-learn")
        lines.append(
            [
                f"{row['n']:,}",
                str(row["dim"]),
                row["method"],
                _number(row["init_s"], ".2f"),
                _number(row["lloyd_s_per_it"], ".3f"),
                f"{row['total_s']:.1f}",
                f"{row['inertia']:.5g}",
                f"{speed:.2f}" if speed == speed and speed > 0 else "",
                f"{row['inertia'] / sk['inertia']:.4f}" if sk else "",
            ]
        )
    header = [
        "points",
        "D",
        "method",
        "init (s)",
        "Lloyd s/it",
        "total (s)",
        "inertia",
        "speed vs faiss /it",
        "inertia / sklearn",
    ]
    return markdown_table(header, lines)


def machine() -> str:
    policy = os.environ.get("OMP_WAIT_POLICY")
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, OMP_WAIT_POLICY={policy}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="comma list of point counts")
    p.add_argument("--dims", default="39,768", help="comma list of dimensions (39 MFCC, 768 a base layer)")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--iters", type=int, default=25)
    p.add_argument("--repeats", type=int, default=2, help="Lloyd runs per engine, the fastest kept")
    p.add_argument("--engines", default="sklearn,faiss,torch", help="our Lloyd engines to time, comma list")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--centre-scale", type=float, default=3.0, help="spread of the mixture's centres")
    p.add_argument("--sklearn-max", type=int, default=10**7, help="skip scikit-learn above this many points")
    p.add_argument("--max-points", type=float, default=2e9, help="skip rows with more than this many floats")
    p.add_argument("--fit-fraction", type=float, default=0.1, help="also fit ours on this fraction (0: no)")
    p.add_argument(
        "--paired-seeds",
        type=int,
        default=0,
        help="also compare the two k-means++ over this many seeds (0: no)",
    )
    p.add_argument("--out", help="JSON lines, one per measurement, written as measured")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    try:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
        dims = [int(d) for d in args.dims.split(",")]
        if args.out:
            check_new_file(args.out, args.overwrite)
            Path(args.out).write_text("")
    except ValueError:
        print(f"kmeans bench: --sizes {args.sizes} / --dims {args.dims}: whole numbers, comma separated")
        return 2
    except MmsslError as err:
        print(f"kmeans bench: {err}", file=sys.stderr)
        return 2
    # the engines' libraries load (and scikit-learn's step is probed) before anything is timed:
    # otherwise the first fit of a process pays about a second of imports
    sklearn_available(), faiss_available()
    rows = []
    for dim in dims:
        for n in sizes:
            if n * dim > args.max_points:
                print(f"skipped {n} x {dim} (over --max-points)")
                continue
            got = run_row(n, dim, args)
            rows.extend(got)
            if args.out:
                with open(args.out, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in got)
            print(table(got), flush=True)
    print(f"\nk-means, k={args.k}, {args.iters} Lloyd iterations, tol=0 ({machine()})\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as err:
        print(f"kmeans bench: {err}", file=sys.stderr)
        sys.exit(2)
