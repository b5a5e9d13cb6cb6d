"""Image search latency and recall at 10k, 100k and 1M images: exact inner product against
FAISS HNSW and IVF (``mmssl.eval.search``, the kinds ``mmssl index --faiss`` builds), on a CPU.

Embeddings are synthetic: unit vectors drawn around ``--clusters`` random centres (real image
embeddings cluster; uniform random directions would be the worst case of every approximate
index). Queries are held-out draws of the same mixture, one at a time (as ``mmssl serve``
answers them): latency p50/p95 in ms, queries/s, build time, and recall@10 of each approximate
kind against exact search over the same queries.

    python tools/bench/search.py --sizes 10000,100000,1000000 --dim 256 --out search.jsonl
"""

from __future__ import annotations

import os

# as `mmssl index` and `mmssl serve` (mmssl.cli.ENVIRONMENT): before faiss loads its OpenMP runtime
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from mmssl.eval.search import build_faiss, recall_against_exact  # noqa: E402


def mixture(n: int, dim: int, centres: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    picks = rng.integers(len(centres), size=n)
    x = centres[picks] + spread * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def latency(index: faiss.Index, queries: np.ndarray, k: int) -> dict:
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - start)
    ms = 1000 * np.array(times)
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "qps": round(len(ms) / (ms.sum() / 1000), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--kinds", default="exact,hnsw,ivf")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=0.6, help="noise around a centre, relative")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="faiss threads (0: its default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="append one JSON line per size x kind here")
    args = parser.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}"
    )
    print(f"| images | kind | build (s) | p50 (ms) | p95 (ms) | queries/s | recall@{args.k} vs exact |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        images = mixture(n, args.dim, centres, rng, args.spread)
        queries = mixture(args.queries, args.dim, centres, rng, args.spread)
        for kind in args.kinds.split(","):
            start = time.perf_counter()
            index = build_faiss(images, kind, args.seed)
            built = time.perf_counter() - start
            row = {"images": n, "dim": args.dim, "kind": kind, "build_s": round(built, 2)}
            row.update(latency(index, queries, args.k))
            row["recall_at_k"] = round(recall_against_exact(index, images, queries, args.k), 4)
            row.update(k=args.k, machine=machine, threads=faiss.omp_get_max_threads())
            print(
                f"| {n:,} | {kind} | {built:.1f} | {row['p50_ms']} | {row['p95_ms']} | {row['qps']} "
                f"| {row['recall_at_k']:.3f} |",
                flush=True,
            )
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            del index
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
