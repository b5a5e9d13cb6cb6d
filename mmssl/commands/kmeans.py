"""``mmssl kmeans``: cluster frame features into HuBERT targets.

    mmssl kmeans --manifest M [M2 ...] (--features mfcc | --checkpoint C --layer L) --k K --out DIR
                 [--fit-fraction F] [--batch-size N] [--device auto|cpu|cuda] [--seed S]
                 [--max-memory GIB] [--overwrite] [--fit-only | --shard I/N]

writes ``DIR/<manifest stem>.km`` for every manifest (one line of space-separated cluster ids
per record, in manifest order, at the feature's frame rate; fitted on the first manifest, so
``--manifest train.jsonl valid.jsonl`` labels both with the same clusters), ``DIR/kmeans.pt``
(centroids, k, feature description, label rate, clustering id) and ``DIR/labels.json`` (k,
features, and the records each ``.km`` labels: ``mmssl.data.importers.check_labels`` refuses
labels read for another manifest or clustering). ``DIR`` is made whole under a temporary name
and swapped in at the end (``mmssl.files.new_folder``): a folder that already holds anything
is replaced only with ``--overwrite``, and a failed run leaves nothing behind.

Memory. As HuBERT (sec. IV-B), k-means is fitted on the frames of a random subset of the
records (``--fit-fraction``, 10% by default, grown until there are at least
``MIN_FRAMES_PER_CLUSTER`` = 50 frames per cluster or the manifest runs out), held in one
buffer on the device; every frame is then assigned record by record, streamed, never all at
once. Before any work the command prints the memory the fit will take (frames counted from
the records' ``audio_samples``, else extrapolated from the first record) and refuses, naming
``--fit-fraction``, when it is more than is available (or than ``--max-memory`` GiB). A fit on
10% of 10^6 points (k=100) is 0.9% above the full fit's inertia over every point, 3.8% at
10^5 (1,000 points per cluster vs 100; BENCHMARKS.md, "k-means").

Scale-out. ``--fit-only`` fits and writes ``kmeans.pt`` and ``labels.json`` with nothing
labelled; then ``--shard I/N`` (on as many machines as wanted, same ``--manifest`` and
features) labels every N-th record from the I-th into ``DIR/<stem>.<I>-of-<N>.km``, and the
shard that finds all N present merges them into ``DIR/<stem>.km`` (the shards are removed).

On a CPU the Lloyd iterations run in scikit-learn's compiled step (``mmssl.nn.kmeans``,
``--engine``). When the records carry phone alignments (the built-in corpus's ``align`` key),
phone purity, cluster purity and PNMI are printed and written to ``DIR/quality.json`` (not with ``--shard``).
``--batch-size N`` fits with mini-batch k-means (HuBERT's ``learn_kmeans.py`` uses
scikit-learn's ``MiniBatchKMeans`` with 10000) instead of full Lloyd iterations;
``--max-iter`` then counts passes over the fitting frames.

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
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from mmssl.commands.data_pack import parse_shard
from mmssl.constants import SAMPLE_RATE
from mmssl.data.importers import KMEANS_FILE, LABELS_FILE, read_kmeans_state, records_fingerprint
from mmssl.data.manifest import read_manifest
from mmssl.data.store import record_audio, shard_name
from mmssl.devices import pick_device
from mmssl.errors import ConfigError, DataError
from mmssl.eval.cluster_quality import QualityAccumulator, frame_phones, read_alignment
from mmssl.eval.record_layers import is_audio_visual, num_layers, record_layers
from mmssl.files import atomic_write, check_new_folder, new_folder, write_text
from mmssl.nn.fbank import mfcc
from mmssl.nn.kmeans import ENGINES, KMeans
from mmssl.runs import load_encoder_from_run, resolve_weights

FeatureFn = Callable[[dict], Tensor]  # manifest record -> features (T, D) on the device
MFCC_RATE = 100.0
MFCC_WINDOW = 400  # samples an MFCC frame reads (25 ms)
# the fitting subset grows past --fit-fraction until it holds this many frames per cluster:
# at 10 per cluster a 500-cluster fit on a small corpus left centroids on a handful of frames
MIN_FRAMES_PER_CLUSTER = 50
GIB = 1 << 30


@dataclass(frozen=True)
class FeatureSource:
    """What is clustered: ``fn`` gives one record's features ``(T, D)`` at ``rate`` Hz, each
    frame reading ``window`` samples (its phone is the one at the window's centre), described
    as ``described``, read from the weights file ``weights`` (None for MFCC)."""

    fn: FeatureFn
    rate: float
    window: int
    described: str
    weights: str | None = None


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
    parser.add_argument("--k", type=int, help="number of clusters (with --shard: the fitted one's)")
    parser.add_argument("--out", required=True, help="output folder (new, or replaced with --overwrite)")
    parser.add_argument(
        "--fit-fraction", type=float, default=0.1, help="fraction of records to fit on (default 0.1)"
    )
    parser.add_argument(
        "--max-memory",
        type=float,
        default=None,
        help="GiB the fit may hold on its device (default: what is available there now)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it holds anything")
    split = parser.add_mutually_exclusive_group()
    split.add_argument(
        "--fit-only", action="store_true", help="fit and write kmeans.pt; label later with --shard"
    )
    split.add_argument(
        "--shard",
        help="I/N: label every N-th record from the I-th with the clustering --fit-only left in --out; "
        "the last shard merges them",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="Lloyd iterations by: auto (on a CPU scikit-learn's compiled step, else faiss; on a GPU "
        "torch), sklearn, faiss or torch",
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


def encoder_layer_features(encoder, layer: int, device: torch.device) -> tuple[FeatureFn, float, int]:
    """A feature function giving layer ``layer`` of ``encoder`` for one record, its frame rate
    and the samples one of its frames reads (the audio stream's receptive field; a video-only
    encoder's frame spans one video frame).

    A speech encoder reads the record's audio; an audio-visual encoder reads its audio and lip
    video, both required (``mmssl.eval.record_layers.record_layers``)."""
    top = num_layers(encoder)
    if not 0 <= layer <= top:
        raise ConfigError(f"--layer {layer}: the encoder has layers 1..{top} (0: their input)")
    encoder = encoder.to(device)
    modalities = encoder.modalities if is_audio_visual(encoder) else None

    def features(record: dict) -> Tensor:
        return record_layers(encoder, record, device, modalities, upto=layer).layers[layer]

    spec = encoder.frame_spec
    window = spec.window if spec is not None else round(SAMPLE_RATE / encoder.frame_rate)
    return features, float(encoder.frame_rate), window


def mfcc_features(device: torch.device) -> FeatureSource:
    def features(record: dict) -> Tensor:
        return mfcc(_load(record)).to(device).float()

    return FeatureSource(features, MFCC_RATE, MFCC_WINDOW, "mfcc")


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


def planned_frames(
    records: list[dict], order: list[int], wanted: int, need: int, rate: float, per_record: int
) -> tuple[int, int]:
    """(records, frames) the fitting subset will take: ``wanted`` records of ``order``, more
    until ``need`` frames; a record's frames from its ``audio_samples``, else ``per_record``."""
    frames = taken = 0
    for index in order:
        if taken >= wanted and frames >= need:
            break
        samples = records[index].get("audio_samples")
        frames += math.ceil(samples * rate / SAMPLE_RATE) if samples else per_record
        taken += 1
    return taken, frames


def fit_bytes(frames: int, dim: int, k: int) -> int:
    """Memory of a fit on ``frames x dim`` float32 features: the features, two ``(N, D)``
    float32 temporaries (scikit-learn's Lloyd step makes them when a cluster empties, to move it
    to the farthest points), then per frame the k-means++ candidate distances (two ``(N,
    trials)`` blocks), norms, labels and distances, and two ``(rows, K)`` distance blocks
    (``mmssl.nn.kmeans``). Features far from the origin against their spread take one more
    copy, centred (not counted)."""
    trials = 2 + int(math.log(k))
    return frames * (12 * dim + 8 * trials + 32) + 2 * 4 * (1 << 23)


def available_bytes(device: torch.device) -> int:
    """Memory free for the fit on ``device`` now (CUDA: free device memory; CPU: Linux's
    ``MemAvailable``, else the free physical pages)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(
    frames: int, dim: int, k: int, device: torch.device, fraction: float, max_memory: float | None
) -> int:
    """Print what the fit will hold and refuse (naming ``--fit-fraction``) what does not fit."""
    need = fit_bytes(frames, dim, k)
    limit = int(max_memory * GIB) if max_memory is not None else available_bytes(device)
    where = "--max-memory" if max_memory is not None else "available"
    print(
        f"kmeans: the fit holds {frames} frames x {dim} dims: {need / GIB:.2f} GiB on {device} "
        f"({limit / GIB:.1f} GiB {where})"
    )
    if need > limit:
        smaller = fraction * limit / need * 0.9
        raise ConfigError(
            f"k-means would need {need / GIB:.2f} GiB on {device} to fit {frames} frames x {dim} dims "
            f"but {limit / GIB:.2f} GiB is {where}: fit on fewer records with --fit-fraction "
            f"{smaller:.2g} (now {fraction:g}), or fewer clusters"
        )
    return need


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
    engine: str = "auto",
    max_memory: float | None = None,
    rate: float = MFCC_RATE,
) -> tuple[KMeans, dict[int, Tensor]]:
    """Fit on a random subset of records: ``fraction`` of them, grown until it holds at least
    ``min_frames_per_cluster * k`` frames or every record is taken; ``batch_size`` fits with
    mini-batch k-means. The memory guard (``check_memory``) runs after the first record.
    Returns the model and the features computed on the way (record index -> ``(T, D)``, views
    of the one buffer the fit ran on), reused when the records are labelled."""
    order, wanted = fit_subset(len(records), fraction, seed)
    need = min_frames_per_cluster * k
    first = feature_fn(records[order[0]])  # (T, D): the dimension and a frame count per record
    taken, estimate = planned_frames(records, order, wanted, need, rate, max(first.shape[0], 1))
    check_memory(estimate, first.shape[1], k, first.device, fraction, max_memory)
    # one buffer, filled in place: no second copy of the features when they are joined
    buffer = torch.empty(estimate + taken + 16, first.shape[1], dtype=torch.float32, device=first.device)
    spans: dict[int, tuple[int, int]] = {}
    frames = 0
    bar = tqdm(order, desc="kmeans: features to fit", unit="utt")
    for count, index in enumerate(bar):
        if count >= wanted and frames >= need:
            break
        feats = first if count == 0 else feature_fn(records[index])
        if frames + feats.shape[0] > buffer.shape[0]:  # more frames than planned: grow
            grown = torch.empty(2 * (frames + feats.shape[0]), buffer.shape[1], device=buffer.device)
            grown[:frames] = buffer[:frames]
            buffer = grown
        buffer[frames : frames + feats.shape[0]] = feats
        spans[index] = (frames, feats.shape[0])
        frames += feats.shape[0]
    bar.close()
    if frames < k:
        raise DataError(f"only {frames} frames in the whole manifest for k={k} clusters")
    x = buffer[:frames]  # (N, D)
    km = KMeans(k, max_iter=max_iter, n_init=n_init, seed=seed, batch_size=batch_size, engine=engine)
    desc = "kmeans: Lloyd" if batch_size is None else "kmeans: mini-batch passes"
    with tqdm(total=max_iter * n_init, desc=desc, unit="it") as bar:

        def progress(it: int, inertia: float) -> None:
            bar.update(1)
            bar.set_postfix(inertia=f"{inertia:.4g}")

        km.fit(x, progress=progress)
    return km, {index: x[start : start + length] for index, (start, length) in spans.items()}


def layer_features_name(checkpoint: str, layer: int | str) -> str:
    """How ``kmeans.pt`` names the features of layer ``layer`` of the run ``checkpoint`` (so a
    caller can tell which layer an existing clustering is of)."""
    return f"checkpoint:{checkpoint}:layer{layer}"


def feature_source(args: argparse.Namespace, device: torch.device) -> FeatureSource:
    """MFCC, or layer ``--layer`` of the run ``--checkpoint``."""
    if args.checkpoint is None:
        return mfcc_features(device)
    fn, rate, window = encoder_layer_features(load_encoder_from_run(args.checkpoint), args.layer, device)
    # the weights file whose layer was clustered, so a stale clustering shows
    weights = str(resolve_weights(args.checkpoint).resolve())
    return FeatureSource(fn, rate, window, layer_features_name(args.checkpoint, args.layer), weights)


def run(args: argparse.Namespace) -> int:
    if args.shard is None and args.k is None:
        raise ConfigError("--k K is needed (the number of clusters)")
    if args.k is not None and args.k < 2:
        raise ConfigError(f"--k must be >= 2; got {args.k}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.checkpoint is not None and args.layer is None:
        raise ConfigError("--checkpoint needs --layer L")
    if args.max_memory is not None and not args.max_memory > 0:
        raise ConfigError(f"--max-memory must be > 0 GiB; got {args.max_memory}")
    manifests = [Path(m) for m in args.manifest]
    stems = [m.stem for m in manifests]
    if len(set(stems)) != len(stems):
        raise ConfigError(
            f"manifests {', '.join(map(str, manifests))} share a file name; their labels would collide"
        )
    out = Path(args.out)
    if args.shard is None:
        check_new_folder(out, args.overwrite)  # before any work
    all_records = [read_manifest(m) for m in manifests]
    for manifest, records in zip(manifests, all_records):
        if not records:
            raise DataError(f"{manifest}: the manifest has no records")
    device = pick_device(args.device)
    if args.shard is not None:
        return run_shard(args, manifests, all_records, device)
    source = feature_source(args, device)
    with new_folder(out, args.overwrite) as tmp:
        km, cache = fit_kmeans(
            all_records[0],
            source.fn,
            args.k,
            args.fit_fraction,
            args.seed,
            args.max_iter,
            args.n_init,
            batch_size=args.batch_size,
            engine=args.engine,
            max_memory=args.max_memory,
            rate=source.rate,
        )
        state = {
            "centroids": km.centroids.cpu(),
            "k": args.k,
            "features": source.described,
            "label_rate": source.rate,
            "inertia": km.inertia,
            "weights": source.weights,
            "clustering": uuid.uuid4().hex,  # ties labels.json and every .km to this fit
        }
        labelled, qualities = {}, {}
        for i, (manifest, records) in enumerate(zip(manifests, [] if args.fit_only else all_records)):
            km_path = tmp / f"{manifest.stem}.km"
            scores = assign(manifest, records, source, km, cache if i == 0 else {}, km_path)
            labelled[manifest.stem] = labels_entry(manifest, records)
            if scores is not None:
                qualities[manifest.stem] = scores
        del cache
        atomic_write(tmp / KMEANS_FILE, lambda f: torch.save(state, f))
        write_labels_record(tmp, state, labelled)
        if qualities:
            first = next(iter(qualities.values()))
            # quality.json: the first manifest's scores at the top level, every manifest's under "by_manifest"
            write_text(tmp / "quality.json", json.dumps({**first, "by_manifest": qualities}, indent=2) + "\n")
    if args.fit_only:
        print(
            f"fitted {out / KMEANS_FILE}; label with: mmssl kmeans ... --out {out} --shard I/N (I = 0..N-1)"
        )
    return 0


def labels_entry(manifest: Path, records: list[dict]) -> dict:
    return {"path": str(manifest.resolve()), **records_fingerprint(records)}


def write_labels_record(folder: Path, state: dict, labelled: dict) -> None:
    """``labels.json``: the clustering (k, features, id) and the records of each ``.km``."""
    record = {key: state[key] for key in ("k", "features", "label_rate", "weights", "clustering")}
    record["manifests"] = labelled
    write_text(folder / LABELS_FILE, json.dumps(record, indent=2) + "\n")


def run_shard(args: argparse.Namespace, manifests: list[Path], all_records: list[list[dict]], device) -> int:
    """Label shard I of N of every manifest with the clustering in ``--out``; merge a manifest's
    shards once all are there."""
    shard, shards = parse_shard(args.shard)
    out = Path(args.out)
    if not (out / KMEANS_FILE).is_file() or not (out / LABELS_FILE).is_file():
        raise ConfigError(f"--shard: {out} holds no fitted k-means; fit first with --fit-only --out {out}")
    state = read_kmeans_state(out)
    if args.k is not None and args.k != state.get("k"):
        raise ConfigError(f"--k {args.k} but {out / KMEANS_FILE} has k={state.get('k')}")
    source = feature_source(args, device)
    if (source.described, source.weights) != (state.get("features"), state.get("weights")):
        raise ConfigError(f"--shard: {out} clusters {state.get('features')}, not {source.described}")
    for manifest in manifests:
        for path in (out / f"{manifest.stem}.km", out / f"{shard_name(manifest.stem, shard, shards)}.km"):
            if path.exists() and not args.overwrite:
                raise ConfigError(f"{path} exists: pass --overwrite to label it again")
    km = KMeans.from_centroids(state["centroids"].to(device))
    for manifest, records in zip(manifests, all_records):
        part = out / f"{shard_name(manifest.stem, shard, shards)}.km"
        assign(manifest, records[shard::shards], source, km, {}, part, with_quality=False)
        merge_shards(out, manifest, records, shards)
    return 0


def merge_shards(out: Path, manifest: Path, records: list[dict], shards: int) -> bool:
    """``out/<stem>.km`` from the N shard files once all are there (record j is line j // N of
    shard j % N); records the manifest in ``labels.json`` and removes the shards."""
    parts = [out / f"{shard_name(manifest.stem, i, shards)}.km" for i in range(shards)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        print(f"{manifest.stem}: {shards - len(missing)} of {shards} shards labelled")
        return False
    lines = [p.read_text(encoding="utf-8").splitlines() for p in parts]
    for i, (part, got) in enumerate(zip(parts, lines)):
        if len(got) != len(records[i::shards]):
            raise DataError(
                f"{part}: {len(got)} lines for the {len(records[i::shards])} records of shard {i}"
            )
    merged = [lines[j % shards][j // shards] for j in range(len(records))]
    whole = out / f"{manifest.stem}.km"
    write_text(whole, "".join(line + "\n" for line in merged))
    record = json.loads((out / LABELS_FILE).read_text(encoding="utf-8"))
    record["manifests"][manifest.stem] = labels_entry(manifest, records)
    write_text(out / LABELS_FILE, json.dumps(record, indent=2) + "\n")
    for part in parts:
        part.unlink()
    print(f"merged {shards} shards into {whole}")
    return True


def assign(
    manifest: Path,
    records: list[dict],
    source: FeatureSource,
    km: KMeans,
    cache: dict[int, Tensor],
    km_path: Path,
    with_quality: bool = True,
) -> dict | None:
    """Label every record of ``manifest`` into ``km_path`` (atomically), streaming one record's
    features at a time; the cluster quality scores when every record has a phone alignment
    (each frame's phone read at the centre of the samples it reads, ``source.window``)."""
    manifest_dir = manifest.resolve().parent
    quality = QualityAccumulator(km.k)
    has_align = with_quality and all(r.get("align") for r in records)

    def write(lines) -> None:
        for index, record in enumerate(tqdm(records, desc=f"kmeans: assign {km_path.stem}", unit="utt")):
            feats = cache.pop(index, None)
            if feats is None:
                feats = source.fn(record)
            labels = km.predict(feats).cpu() if feats.shape[0] else torch.zeros(0, dtype=torch.long)
            lines.write(" ".join(map(str, labels.tolist())) + "\n")
            if has_align:
                alignment, sr = read_alignment(manifest_dir / record["align"])
                window = round(source.window * sr / SAMPLE_RATE)  # in the alignment's samples
                quality.add(frame_phones(alignment, labels.shape[0], source.rate, sr, window), labels)

    atomic_write(km_path, write, text=True)
    print(
        f"wrote {km_path.name} ({len(records)} records, k={km.k}, {source.rate:g} Hz labels, "
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
