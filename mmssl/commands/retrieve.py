"""``mmssl retrieve``: query an image index (``mmssl index``) with speech or text.

    mmssl retrieve --index INDEX_DIR
                   (--audio FILE [FILE ...] | --manifest M.jsonl | --text "a red circle" [...])
                   [--top 5] [--json] [--out DIR] [--checkpoint RUN_OR_CKPT] [--device auto|cpu|cuda]
                   [--max-seconds 30]

Each query is embedded with the checkpoint that made the index (``index.json`` names it) and
compared with every indexed image by cosine similarity (or searched in the index's FAISS
index, when ``mmssl index --faiss`` made one); the top ``--top`` images are printed
with their scores and captions, or as JSON with ``--json`` (notes then go to stderr, so stdout
parses). A manifest query uses each record's audio and, when the record has a ``group``, says
whether the top image is its own. Text queries go through the text tower, which only a model
trained with the caption term has (an error otherwise).

A speech query is embedded up to ``--max-seconds`` (default 30 s: a spoken caption lasts a few
seconds, and the encoder's memory grows with the clip); a longer one is cut there and a silent
one embedded, each with a warning on stderr.

When the weights that embed the queries are not the ones that made the index (``--checkpoint``
names others, the index's checkpoint was pruned, or its file changed since), the scores compare
embeddings of two different models: the command says so.

``--out DIR`` also writes ``DIR/results.json`` and ``DIR/contact_sheet.png``: a row per query
with its top images, each labelled with its rank and score.

Shape legend: Q queries, N indexed images, D embedding dim.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from mmssl.data.io import load_audio
from mmssl.data.manifest import read_manifest
from mmssl.devices import pick_device
from mmssl.errors import ConfigError, DataError
from mmssl.eval.query import contact_sheet, query_model, read_index, top_images
from mmssl.eval.retrieval import (
    LoadedRun,
    QueryLimits,
    embed_speech_records,
    embed_texts,
    embed_waveforms,
)
from mmssl.eval.search import FAISS_FILE, ImageSearch


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def embed_queries(
    loaded: LoadedRun, args: argparse.Namespace, device: torch.device
) -> tuple[Tensor, list[dict]]:
    """``(embeddings (Q, D), descriptions)`` of the queries named on the command line; speech
    queries longer than ``--max-seconds`` are cut there, and silent ones named (stderr)."""
    objective = loaded.objective
    limits = QueryLimits(max_seconds=args.max_seconds, warn=_warn)
    if args.audio:
        waves = []
        for path in args.audio:
            if not Path(path).is_file():
                raise DataError(f"{path}: audio file not found")
            waves.append(load_audio(path))
        names = [str(p) for p in args.audio]
        emb = embed_waveforms(objective, waves, args.batch_size, device, False, names, limits)
        return emb, [{"query": str(path)} for path in args.audio]
    if args.manifest:
        if not Path(args.manifest).is_file():
            raise DataError(f"{args.manifest}: manifest not found")
        records = read_manifest(args.manifest)
        if not records:
            raise DataError(f"{args.manifest}: the manifest has no records")
        emb = embed_speech_records(objective, records, args.batch_size, device, not args.json, limits)
        described = []
        for r in records:
            entry = {"query": str(r.get("id")), "audio": r.get("audio")}
            if r.get("caption"):
                entry["caption"] = r["caption"]
            if r.get("group"):
                entry["group"] = str(r["group"])
            described.append(entry)
        return emb, described
    return embed_texts(objective, args.text, args.batch_size, device), [{"query": t} for t in args.text]


def _print_results(results: Sequence[dict]) -> None:
    for result in results:
        head = f"query: {result['query']}"
        if "caption" in result:
            head += f"  ({result['caption']!r})"
        if "hit" in result:
            head += "  [top-1 is its image]" if result["hit"] else "  [top-1 is another image]"
        print(head)
        for hit in result["results"]:
            caption = hit["captions"][0] if hit["captions"] else ""
            print(f"  {hit['rank']:>2}. {hit['score']:+.3f}  {hit['group']}  {hit['image']}  {caption}")
        print()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index folder written by `mmssl index`")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--audio", nargs="+", help="audio files, one query each")
    what.add_argument("--manifest", help="manifest whose records' audio are the queries")
    what.add_argument("--text", nargs="+", help="text queries (needs a model trained with the caption term)")
    parser.add_argument("--top", type=int, default=5, help="images per query (default 5)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", help="also write results.json and contact_sheet.png here")
    parser.add_argument(
        "--checkpoint", help="embed queries with this run or checkpoint instead of the index's"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="queries per batch (default 16)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="embed at most the first N seconds of a speech query (default 30; a warning says when)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")


def run(args: argparse.Namespace) -> int:
    if args.top < 1 or args.batch_size < 1 or not args.max_seconds > 0:
        raise ConfigError("--top, --batch-size and --max-seconds must be positive")
    meta, images, rows = read_index(args.index)
    device = pick_device(args.device)
    loaded, notes = query_model(meta, args.checkpoint, device)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    queries, described = embed_queries(loaded, args, device)
    if queries.shape[1] != images.shape[1]:
        raise DataError(
            f"{args.index}: image embeddings are {images.shape[1]}-d, the queries {queries.shape[1]}-d "
            "(an index of another model)"
        )
    results = []
    search = ImageSearch.open(images, args.index) if (Path(args.index) / FAISS_FILE).is_file() else None
    for entry, hits in zip(described, top_images(queries, images, rows, args.top, search)):
        if "group" in entry:
            entry["hit"] = hits[0]["group"] == entry["group"]
        results.append({**entry, "results": hits})
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        for note in contact_sheet(results, out / "contact_sheet.png", args.index):
            print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_results(results)
        if args.out:
            print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'contact_sheet.png'}")
    return 0
