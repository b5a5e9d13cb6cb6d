"""``mmssl extract``: a trained run's encoder layers for every record of a manifest, on disk.

    mmssl extract --checkpoint RUN_OR_STEP --manifest M --layer L|L1,L2,...|all --out DIR
                  [--dtype float32|float16] [--modalities audio,video] [--shard-mb MB]
                  [--skip-bad] [--device auto|cpu|cuda]

``--checkpoint``: a run folder (its latest checkpoint), a checkpoint folder or a
``.safetensors`` file of ``mmssl pretrain``. Layers count from 1 (transformer layers), 0 is
the transformer's input; ``all`` is ``0..L``. A speech encoder reads each record's audio
(50 Hz for the conv frontend); an audio-visual encoder reads its audio and lip video (25 Hz),
or only the modalities named by ``--modalities``.

Writes, for each layer ``L``, ``DIR/layer_LL/shard_NNNNN.safetensors`` (keys: record ids;
values: ``(T, C)`` features of the record's valid frames, no padding) and one
``DIR/index.jsonl`` with a line per record and layer::

    {"id": ..., "layer": L, "frames": T, "dim": C, "frame_rate": Hz, "file": "layer_LL/shard_NNNNN.safetensors"}

plus ``DIR/extract.json`` (checkpoint, manifest, layers, dtype, counts). Shards close once
they hold ``--shard-mb`` of features (all layers together), so memory stays bounded.
:func:`load_features` / :func:`iter_features` read a folder back for downstream probes.

A record that cannot be read is an error naming it; with ``--skip-bad`` it is skipped,
counted and listed in ``extract.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from mmssl.errors import ConfigError, DataError
from mmssl.files import atomic_path, write_text

INDEX = "index.jsonl"
SUMMARY = "extract.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or .safetensors file")
    parser.add_argument("--manifest", required=True, help="JSON-lines manifest of the records to extract")
    parser.add_argument("--layer", required=True,
                        help="transformer layer (1 = first, 0 = their input), a comma list, or 'all'")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored precision (default float32)")
    parser.add_argument("--modalities", help="audio-visual encoders: comma list of audio,video to read (default both)")
    parser.add_argument("--shard-mb", type=float, default=256.0, help="close a shard at this size (default 256 MB)")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count unreadable records instead of stopping")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")


def parse_layers(spec: str, top: int) -> list[int]:
    """``"all"`` -> ``[0..top]``; ``"3"`` / ``"1,6,12"`` -> those layers, each checked in ``0..top``."""
    if spec.strip() == "all":
        return list(range(top + 1))
    try:
        layers = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--layer must be an integer, a comma list of integers or 'all'; got {spec!r}") from None
    if not layers:
        raise ConfigError("--layer is empty")
    for layer in layers:
        if not 0 <= layer <= top:
            raise ConfigError(f"--layer {layer}: the encoder has layers 1..{top} (0: their input)")
    return sorted(set(layers))


def layer_dir(layer: int) -> str:
    return f"layer_{layer:02d}"


class ShardWriter:
    """Buffers ``(T, C)`` features per layer and writes a ``shard_NNNNN.safetensors`` per layer
    (atomically) whenever the buffer reaches ``max_bytes``; keeps the index lines."""

    def __init__(self, out: Path, layers: Sequence[int], frame_rate: float, max_bytes: int) -> None:
        self.out, self.layers, self.frame_rate, self.max_bytes = out, list(layers), frame_rate, max_bytes
        self.shard = 0
        self.buffer: dict[int, dict[str, Tensor]] = {layer: {} for layer in self.layers}
        self.bytes = 0
        self.index: list[dict] = []
        for layer in self.layers:
            folder = out / layer_dir(layer)
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("shard_*.safetensors"):  # a previous extraction into the same folder
                stale.unlink()

    def add(self, record_id: str, feats: dict[int, Tensor]) -> None:
        """``feats``: layer -> ``(T, C)`` (CPU, stored dtype) of one record."""
        for layer in self.layers:
            x = feats[layer].contiguous()
            self.buffer[layer][record_id] = x
            self.bytes += x.numel() * x.element_size()
            self.index.append({"id": record_id, "layer": layer, "frames": int(x.shape[0]), "dim": int(x.shape[1]),
                               "frame_rate": self.frame_rate, "file": f"{layer_dir(layer)}/shard_{self.shard:05d}.safetensors"})
        if self.bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not any(self.buffer[layer] for layer in self.layers):
            return
        for layer in self.layers:
            path = self.out / layer_dir(layer) / f"shard_{self.shard:05d}.safetensors"
            with atomic_path(path) as tmp:
                save_file(self.buffer[layer], str(tmp), metadata={"layer": str(layer), "frame_rate": str(self.frame_rate)})
            self.buffer[layer] = {}
        self.shard += 1
        self.bytes = 0

    def close(self) -> None:
        self.flush()
        write_text(self.out / INDEX, "".join(json.dumps(line) + "\n" for line in self.index))


def parse_modalities(spec: str | None) -> tuple[str, ...] | None:
    if spec is None:
        return None
    names = tuple(m.strip() for m in spec.split(",") if m.strip())
    bad = sorted(set(names) - {"audio", "video"})
    if bad or not names:
        raise ConfigError(f"--modalities must be a comma list of audio and video; got {spec!r}")
    return names


def extract(
    encoder,
    records: Sequence[dict],
    layers: Sequence[int],
    out: str | os.PathLike,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    modalities: Sequence[str] | None = None,
    skip_bad: bool = False,
    shard_bytes: int = 256 << 20,
) -> dict:
    """Write ``layers`` of ``encoder`` (eval mode) for every record into ``out`` (layout in the
    module docstring). Returns ``{"records": written, "skipped": [{"id", "error"}], "frame_rate"}``."""
    from mmssl.eval.record_layers import record_layers

    out = Path(out)
    encoder = encoder.to(device)
    writer = ShardWriter(out, layers, float(encoder.frame_rate), shard_bytes)
    skipped: list[dict] = []
    for record in tqdm(records, desc="extract", unit="utt"):
        try:
            result = record_layers(encoder, record, device, modalities, upto=max(layers))
        except DataError as err:
            if not skip_bad:
                raise
            skipped.append({"id": record.get("id"), "error": str(err)})
            continue
        writer.add(str(record["id"]), {layer: result.layers[layer].to("cpu", dtype) for layer in layers})
    writer.close()
    return {"records": len(records) - len(skipped), "skipped": skipped, "frame_rate": writer.frame_rate}


def run(args: argparse.Namespace) -> int:
    from mmssl.data.manifest import read_manifest
    from mmssl.devices import pick_device
    from mmssl.eval.record_layers import num_layers
    from mmssl.runs import load_encoder_from_run

    device = pick_device(args.device)
    if args.shard_mb <= 0:
        raise ConfigError(f"--shard-mb must be positive; got {args.shard_mb}")
    modalities = parse_modalities(args.modalities)
    records = read_manifest(args.manifest)
    if not records:
        raise DataError(f"{args.manifest}: the manifest has no records")
    encoder = load_encoder_from_run(args.checkpoint)
    layers = parse_layers(args.layer, num_layers(encoder))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = extract(encoder, records, layers, out, device, DTYPES[args.dtype], modalities, args.skip_bad,
                     int(args.shard_mb * (1 << 20)))
    summary = {"checkpoint": str(args.checkpoint), "manifest": str(args.manifest), "layers": layers,
               "dtype": args.dtype, **result}
    write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / INDEX}: {result['records']} records x {len(layers)} layer(s) at {result['frame_rate']:g} Hz"
          + (f"; skipped {len(result['skipped'])} bad record(s), listed in {out / SUMMARY}" if result["skipped"] else ""))
    return 0


def read_index(out_dir: str | os.PathLike) -> list[dict]:
    """The lines of ``out_dir/index.jsonl`` (one per record and layer)."""
    path = Path(out_dir) / INDEX
    if not path.is_file():
        raise DataError(f"{path}: not found (not an `mmssl extract` folder)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def iter_features(out_dir: str | os.PathLike, layer: int) -> Iterator[tuple[str, Tensor]]:
    """``(id, (T, C))`` of layer ``layer`` for every extracted record, in manifest order,
    reading one shard at a time."""
    from safetensors import safe_open

    lines = [line for line in read_index(out_dir) if line["layer"] == layer]
    if not lines:
        raise DataError(f"{Path(out_dir) / INDEX}: layer {layer} was not extracted")
    handle, current = None, None
    for line in lines:
        if line["file"] != current:
            current = line["file"]
            handle = safe_open(str(Path(out_dir) / current), framework="pt")
        yield line["id"], handle.get_tensor(line["id"])


def load_features(out_dir: str | os.PathLike, layer: int) -> dict[str, Tensor]:
    """Every extracted record's ``(T, C)`` features of layer ``layer``, by id."""
    return dict(iter_features(out_dir, layer))
