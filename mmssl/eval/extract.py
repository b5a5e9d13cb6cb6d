"""A trained run's encoder layers for every record of a manifest, on disk (``mmssl extract``,
``mmssl.commands.extract``, whose docstring describes the command and the options):
:func:`extract` writes them, :func:`load_features` / :func:`iter_features` read a folder back
for downstream probes.

Layout of an extraction folder: for each layer ``L``, ``DIR/layer_LL/shard_NNNNN.safetensors``
(keys: record ids; values: ``(T, C)`` features of the record's valid frames, no padding) and
one ``DIR/index.jsonl`` with a line per record and layer::

    {"id": ..., "layer": L, "frames": T, "dim": C, "frame_rate": Hz,
     "file": "layer_LL/shard_NNNNN.safetensors"}

plus ``DIR/extract.json`` (checkpoint, manifest, layers, dtype, counts). Shards close once
they hold a given size of features (all layers together), so memory stays bounded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from mmssl.errors import ConfigError, DataError
from mmssl.eval.record_layers import record_layers
from mmssl.files import atomic_dir, atomic_path, check_replaceable, read_text, write_text

INDEX = "index.jsonl"
SUMMARY = "extract.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def parse_layers(spec: str, top: int) -> list[int]:
    """``"all"`` -> ``[0..top]``; ``"3"`` / ``"1,6,12"`` -> those layers, each checked in ``0..top``."""
    if spec.strip() == "all":
        return list(range(top + 1))
    try:
        layers = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"--layer must be an integer, a comma list of integers or 'all'; got {spec!r}"
        ) from None
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
            (out / layer_dir(layer)).mkdir(parents=True, exist_ok=True)

    def add(self, record_id: str, feats: dict[int, Tensor]) -> None:
        """``feats``: layer -> ``(T, C)`` (CPU, stored dtype) of one record."""
        for layer in self.layers:
            x = feats[layer].contiguous()
            self.buffer[layer][record_id] = x
            self.bytes += x.numel() * x.element_size()
            self.index.append(
                {
                    "id": record_id,
                    "layer": layer,
                    "frames": int(x.shape[0]),
                    "dim": int(x.shape[1]),
                    "frame_rate": self.frame_rate,
                    "file": f"{layer_dir(layer)}/shard_{self.shard:05d}.safetensors",
                }
            )
        if self.bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not any(self.buffer[layer] for layer in self.layers):
            return
        for layer in self.layers:
            path = self.out / layer_dir(layer) / f"shard_{self.shard:05d}.safetensors"
            with atomic_path(path) as tmp:
                save_file(
                    self.buffer[layer],
                    str(tmp),
                    metadata={"layer": str(layer), "frame_rate": str(self.frame_rate)},
                )
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
    about: dict | None = None,
) -> dict:
    """Write ``layers`` of ``encoder`` (eval mode) for every record into ``out`` (layout in the
    module docstring), with ``SUMMARY`` holding ``about`` and the result. Returns
    ``{"records": written, "skipped": [{"id", "error"}], "frame_rate"}``.

    The folder is written whole (``mmssl.files.atomic_dir``): an extraction that fails or is
    killed leaves ``out`` as it was (no empty folder, no previous extraction half replaced);
    ``out`` must be new, empty or an earlier extraction (``check_replaceable``)."""
    out = check_replaceable(out, SUMMARY)
    encoder = encoder.to(device)
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, layers, float(encoder.frame_rate), shard_bytes)
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
        done = {"records": len(records) - len(skipped), "skipped": skipped, "frame_rate": writer.frame_rate}
        write_text(tmp / SUMMARY, json.dumps({**(about or {}), **done}, indent=2) + "\n")
    return done


def read_index(out_dir: str | os.PathLike) -> list[dict]:
    """The lines of ``out_dir/index.jsonl`` (one per record and layer)."""
    path = Path(out_dir) / INDEX
    if not path.is_file():
        raise DataError(f"{path}: not found (not an `mmssl extract` folder)")
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def iter_features(out_dir: str | os.PathLike, layer: int) -> Iterator[tuple[str, Tensor]]:
    """``(id, (T, C))`` of layer ``layer`` for every extracted record, in manifest order,
    reading one shard at a time."""
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
