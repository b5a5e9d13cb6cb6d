"""``mmssl kmeans``: cluster frame features into HuBERT targets.

    mmssl kmeans --manifest M [M2 ...] (--features mfcc | --checkpoint C --layer L) --k K --out DIR
                 [--fit-fraction F] [--batch-size N] [--device auto|cpu|cuda] [--seed S]

writes ``DIR/<manifest stem>.km`` for every manifest (one line of space-separated cluster ids
per record, in manifest order, at the feature's frame rate; fitted on the first manifest, so
``--manifest train.jsonl valid.jsonl`` labels both with the same clusters) and
``DIR/kmeans.pt`` (centroids, k, feature description, label rate). As HuBERT (sec. IV-B),
k-means is fitted on the frames of a random subset of the records (``--fit-fraction``, 10% by
default, grown until there are at least ``MIN_FRAMES_PER_CLUSTER`` = 50 frames per cluster or
the manifest runs out, so a small corpus still gives every centroid enough frames) and then
every frame is assigned. Features are computed on the fly and kept in memory only for the
fitting subset; nothing is dumped to disk. When the records carry
phone alignments (the built-in corpus's ``align`` key), phone purity, cluster purity and PNMI
are printed and written to ``DIR/quality.json``. ``--batch-size N`` fits with mini-batch
k-means (HuBERT's ``learn_kmeans.py`` uses scikit-learn's ``MiniBatchKMeans`` with 10000)
instead of full Lloyd iterations; ``--max-iter`` then counts passes over the fitting frames.

Features: ``mfcc`` (39 MFCC + deltas at 100 Hz, HuBERT's first iteration) or layer ``L`` of
the encoder of a trained run (``--checkpoint``: a run folder, a checkpoint folder or a
``.safetensors`` file; ``L`` counts transformer layers from 1, 0 is the input of the first).
A speech encoder reads each record's audio (50 Hz labels); an audio-visual encoder
(AV-HuBERT's later iterations) reads its audio and lip video and gives 25 Hz labels.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from mmssl.data.importers import KMEANS_FILE
from mmssl.data.manifest import read_manifest
from mmssl.data.store import record_audio
from mmssl.devices import pick_device
from mmssl.errors import ConfigError, DataError
from mmssl.eval.cluster_quality import QualityAccumulator, frame_phones, read_alignment
from mmssl.eval.record_layers import is_audio_visual, num_layers, record_layers
from mmssl.files import atomic_write, write_text
from mmssl.nn.fbank import mfcc
from mmssl.nn.kmeans import KMeans
from mmssl.runs import load_encoder_from_run, resolve_weights

FeatureFn = Callable[[dict], Tensor]  # manifest record -> features (T, D) on the device
MFCC_RATE = 100.0
# the fitting subset grows past --fit-fraction until it holds this many frames per cluster:
# at 10 per cluster a 500-cluster fit on a small corpus left centroids on a handful of frames
MIN_FRAMES_PER_CLUSTER = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--manifest",
        required=True,
        nargs="+",
        help="JSON-lines manifests with an 'audio' path per record; k-means is fitted on the first, "
        "every one is labelled",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", choices=["mfcc"], help="cluster 39-dim MFCC (+deltas) at 100 Hz")
    source.add_argument("--checkpoint", help="run folder or checkpoint whose encoder layer to cluster")
    parser.add_argument("--layer", type=int, help="transformer layer (1 = first) with --checkpoint")
    parser.add_argument("--k", type=int, required=True, help="number of clusters")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--fit-fraction", type=float, default=0.1, help="fraction of records to fit on (default 0.1)"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-iter",
        type=int,
        default=100,
        help="Lloyd iterations at most (passes over the frames with --batch-size)",
    )
    parser.add_argument("--n-init", type=int, default=1, help="k-means++ restarts, the best kept")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="mini-batch k-means with this many frames per step (default: full Lloyd)",
    )


def encoder_layer_features(encoder, layer: int, device: torch.device) -> tuple[FeatureFn, float]:
    """A feature function giving layer ``layer`` of ``encoder`` for one record, and its frame rate.

    A speech encoder reads the record's audio; an audio-visual encoder reads its audio and lip
    video, both required (``mmssl.eval.record_layers.record_layers``)."""
    top = num_layers(encoder)
    if not 0 <= layer <= top:
        raise ConfigError(f"--layer {layer}: the encoder has layers 1..{top} (0: their input)")
    encoder = encoder.to(device)
    modalities = encoder.modalities if is_audio_visual(encoder) else None

    def features(record: dict) -> Tensor:
        return record_layers(encoder, record, device, modalities, upto=layer).layers[layer]

    return features, float(encoder.frame_rate)


def mfcc_features(device: torch.device) -> tuple[FeatureFn, float]:
    return (lambda record: mfcc(_load(record)).to(device).float()), MFCC_RATE


def _load(record: dict) -> Tensor:
    if not record.get("audio"):
        raise DataError(f"record {record.get('id')!r}: no 'audio' path to cluster")
    return record_audio(record)  # a packed slice or decoded


def fit_subset(num_records: int, fraction: float, seed: int) -> tuple[list[int], int]:
    """A random order of the records and how many of its first entries to fit on."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--fit-fraction must be in (0, 1]; got {fraction}")
    order = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed)).tolist()
    return order, max(1, math.ceil(fraction * num_records))


def fit_kmeans(
    records: list[dict],
    feature_fn: FeatureFn,
    k: int,
    fraction: float,
    seed: int,
    max_iter: int,
    n_init: int,
    min_frames_per_cluster: int = MIN_FRAMES_PER_CLUSTER,
    batch_size: int | None = None,
) -> tuple[KMeans, dict[int, Tensor]]:
    """Fit on a random subset of records: ``fraction`` of them, grown until it holds at least
    ``min_frames_per_cluster * k`` frames or every record is taken; ``batch_size`` fits with
    mini-batch k-means. Returns the model and the features computed on the way (record index
    -> ``(T, D)``), reused later."""
    order, wanted = fit_subset(len(records), fraction, seed)
    cache: dict[int, Tensor] = {}
    frames = 0
    bar = tqdm(order, desc="kmeans: features to fit", unit="utt")
    for taken, index in enumerate(bar):
        if taken >= wanted and frames >= min_frames_per_cluster * k:
            break
        feats = feature_fn(records[index])
        cache[index] = feats
        frames += feats.shape[0]
    bar.close()
    if frames < k:
        raise DataError(f"only {frames} frames in the whole manifest for k={k} clusters")
    x = torch.cat([cache[i] for i in sorted(cache)])
    km = KMeans(k, max_iter=max_iter, n_init=n_init, seed=seed, batch_size=batch_size)
    desc = "kmeans: Lloyd" if batch_size is None else "kmeans: mini-batch passes"
    with tqdm(total=max_iter * n_init, desc=desc, unit="it") as bar:

        def progress(it: int, inertia: float) -> None:
            bar.update(1)
            bar.set_postfix(inertia=f"{inertia:.4g}")

        km.fit(x, progress=progress)
    return km, cache


def run(args: argparse.Namespace) -> int:
    if args.k < 2:
        raise ConfigError(f"--k must be >= 2; got {args.k}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.checkpoint is not None and args.layer is None:
        raise ConfigError("--checkpoint needs --layer L")
    device = pick_device(args.device)
    manifests = [Path(m) for m in args.manifest]
    stems = [m.stem for m in manifests]
    if len(set(stems)) != len(stems):
        raise ConfigError(
            f"manifests {', '.join(map(str, manifests))} share a file name; their labels would collide"
        )
    all_records = [read_manifest(m) for m in manifests]
    for manifest, records in zip(manifests, all_records):
        if not records:
            raise DataError(f"{manifest}: the manifest has no records")
    if args.checkpoint is not None:
        feature_fn, rate = encoder_layer_features(load_encoder_from_run(args.checkpoint), args.layer, device)
        described = f"checkpoint:{args.checkpoint}:layer{args.layer}"
    else:
        feature_fn, rate = mfcc_features(device)
        described = "mfcc"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    km, cache = fit_kmeans(
        all_records[0],
        feature_fn,
        args.k,
        args.fit_fraction,
        args.seed,
        args.max_iter,
        args.n_init,
        batch_size=args.batch_size,
    )
    qualities = {}
    for i, (manifest, records) in enumerate(zip(manifests, all_records)):
        scores = assign(manifest, records, feature_fn, km, rate, cache if i == 0 else {}, out)
        if scores is not None:
            qualities[manifest.stem] = scores
    # the weights file whose layer was clustered (None for MFCC), so a stale clustering shows
    weights = str(resolve_weights(args.checkpoint).resolve()) if args.checkpoint is not None else None
    state = {
        "centroids": km.centroids.cpu(),
        "k": args.k,
        "features": described,
        "label_rate": rate,
        "inertia": km.inertia,
        "weights": weights,
    }
    atomic_write(out / KMEANS_FILE, lambda f: torch.save(state, f))
    if qualities:
        first = next(iter(qualities.values()))
        # quality.json: the first manifest's scores at the top level, every manifest's under "by_manifest"
        write_text(out / "quality.json", json.dumps({**first, "by_manifest": qualities}, indent=2) + "\n")
    return 0


def assign(
    manifest: Path,
    records: list[dict],
    feature_fn: FeatureFn,
    km: KMeans,
    rate: float,
    cache: dict[int, Tensor],
    out: Path,
) -> dict | None:
    """Label every record of ``manifest`` into ``out/<stem>.km`` (atomically); the cluster
    quality scores when every record has a phone alignment, else None."""
    manifest_dir = manifest.resolve().parent
    quality = QualityAccumulator(km.k)
    has_align = all(r.get("align") for r in records)
    km_path = out / f"{manifest.stem}.km"

    def write(lines) -> None:
        for index, record in enumerate(tqdm(records, desc=f"kmeans: assign {manifest.stem}", unit="utt")):
            feats = cache.pop(index, None)
            if feats is None:
                feats = feature_fn(record)
            labels = km.predict(feats).cpu() if feats.shape[0] else torch.zeros(0, dtype=torch.long)
            lines.write(" ".join(map(str, labels.tolist())) + "\n")
            if has_align:
                alignment, sr = read_alignment(manifest_dir / record["align"])
                quality.add(frame_phones(alignment, labels.shape[0], rate, sr), labels)

    atomic_write(km_path, write, text=True)
    print(
        f"wrote {km_path} ({len(records)} records, k={km.k}, {rate:g} Hz labels, "
        f"inertia of the fit {km.inertia:.4g})"
    )
    if not has_align:
        return None
    scores = quality.result()
    print(
        f"cluster quality ({manifest.stem}): "
        + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())
    )
    return scores
