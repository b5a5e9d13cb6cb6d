"""Frozen features of a trained run's encoder, one manifest record at a time.

Shared by ``mmssl kmeans`` (targets from a layer), ``mmssl extract`` (features on disk) and
``mmssl layers`` (layer-wise CCA). A run is rebuilt from its ``config.yaml`` and its
checkpoint (:func:`mmssl.runs.load_encoder_from_run`); :func:`record_layers` then gives every layer of
its encoder for one record, unpadded, with the input features the encoder read:

* a speech encoder (``extract`` + ``contextualize``) reads the record's audio; its inputs are
  the frontend output (``"conv"`` for the waveform conv frontend, ``"fbank"`` for stacked
  filterbanks) and the projected transformer input (``"input"``);
* an audio-visual encoder (an ``AudioVisualEncoder``) reads the record's audio and/or lip video; its
  inputs are the stacked filterbanks (``"fbank"``), the projected lip features (``"lips"``)
  and the fused transformer input (``"fused"``).

Layers count as in the rest of mmssl: 0 is the transformer's input, ``1..L`` its layers.
One record is one batch of one, so no frame of padding is ever computed.

Shape legend: S samples, T frames, C channels, F input features, L transformer layers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mmssl.data.datasets import lip_frames
from mmssl.data.store import record_audio, record_video
from mmssl.encoders.base import AudioVisualEncoder
from mmssl.errors import ConfigError, DataError
from mmssl.nn.frontend import ConvFrontend


def is_audio_visual(encoder) -> bool:
    return isinstance(encoder, AudioVisualEncoder)


def num_layers(encoder) -> int:
    """``L``: the number of transformer layers (layer ``L`` is the last); a speech encoder
    says it as ``num_layers`` (a CPC encoder's are the layers of its causal context network)."""
    count = getattr(encoder, "num_layers", None)
    return int(count) if count is not None else len(encoder.transformer.layers)


def modalities_read(
    encoder, records: Sequence[dict], modalities: Sequence[str] | None = None
) -> dict[str, int]:
    """How many ``records`` the encoder reads with each set of modalities (``"audio+video"``,
    ``"audio"``...), as :func:`record_layers` reads them: an audio-visual encoder reads, by
    default, each modality it has a stream for that the record has a path for."""
    if not is_audio_visual(encoder):
        wanted: Sequence[str] = ("audio",)
    else:
        wanted = encoder.modalities if modalities is None else modalities
    counts = Counter("+".join(m for m in ("audio", "video") if m in wanted and r.get(m)) for r in records)
    return {key or "none": n for key, n in counts.most_common()}


def partial_modalities_note(encoder, read: dict[str, int]) -> str | None:
    """A warning when an audio-visual encoder reads some records without one of its modalities
    (a record with no path for it: an audio-only manifest runs it audio only); None otherwise."""
    if not is_audio_visual(encoder):
        return None
    total = sum(read.values())
    notes = []
    for modality in encoder.modalities:
        without = sum(n for key, n in read.items() if modality not in key.split("+"))
        if without:
            notes.append(f"{without} of {total} records have no {modality} path")
    if not notes:
        return None
    return (
        f"{'; '.join(notes)}: the audio-visual encoder reads them without it "
        f"({', '.join(f'{n} {k}' for k, n in read.items())}); give a manifest with every modality, "
        "or --modalities to ask for one"
    )


@dataclass
class RecordLayers:
    """One record through an encoder: ``layers`` ``[(T, C)] * (L + 1)`` (index 0 the
    transformer input, ``i`` layer ``i``), ``inputs`` name -> ``(T, F)`` on the same frames,
    ``frame_rate`` in Hz."""

    layers: list[Tensor]
    inputs: dict[str, Tensor]
    frame_rate: float


def record_batch(
    record: dict, modalities: Sequence[str], device: torch.device, required: Sequence[str] = ()
) -> dict:
    """A batch of one from a manifest record: ``audio (1, S)``/``audio_lens`` and/or
    ``video (1, T, 1, 88, 88)``/``video_lens`` for the ``modalities`` the record has a path for.
    ``DataError`` naming the record when it lacks a path for one of ``required``, has none of
    ``modalities``, or a file cannot be read."""
    rid = record.get("id")
    missing = [m for m in required if not record.get(m)]
    if missing:
        raise DataError(
            f"record {rid!r}: no {' or '.join(map(repr, missing))} path, which --modalities asks for"
        )
    batch: dict = {}
    try:
        if "audio" in modalities and record.get("audio"):
            wave = record_audio(record)  # (S,), a packed slice or decoded
            batch.update(
                audio=wave.to(device).unsqueeze(0), audio_lens=torch.tensor([wave.shape[0]], device=device)
            )
        if "video" in modalities and record.get("video"):
            video = lip_frames(record_video(record))  # (T, 1, 88, 88)
            batch.update(
                video=video.to(device).unsqueeze(0), video_lens=torch.tensor([video.shape[0]], device=device)
            )
    except DataError as err:
        raise DataError(f"record {rid!r}: {err}") from None
    if not batch:
        wanted = " or ".join(repr(m) for m in modalities)
        raise DataError(f"record {rid!r}: no {wanted} path for this encoder")
    return batch


def _speech_layers(encoder, batch: dict, upto: int) -> RecordLayers:
    if "audio" not in batch:
        raise DataError("a speech encoder needs audio")
    feats = encoder.extract(batch["audio"], batch["audio_lens"])
    n = int(feats.lengths[0])
    layers = [feats.x[0, :n]]
    if upto > 0:
        out = encoder.contextualize(feats.x, feats.lengths, num_layers=upto)
        layers += [layer[0, :n] for layer in out.layers]
    frontend = "conv" if isinstance(encoder.frontend, ConvFrontend) else "fbank"
    inputs = {frontend: feats.raw[0, :n], "input": feats.x[0, :n]}
    return RecordLayers(layers, inputs, float(encoder.frame_rate))


def _av_layers(encoder, batch: dict, upto: int) -> RecordLayers:
    s = encoder.streams(batch)
    x, lengths = encoder.fuse(s["audio"], s["audio_lens"], s["video"], s["video_lens"])
    n = int(lengths[0])
    layers = [x[0, :n]]
    if upto > 0:
        out = encoder.transformer(x, lengths, frame_rate=encoder.frame_rate, num_layers=upto)
        layers += [layer[0, :n] for layer in out.layers]
    inputs = {
        name: s[key][0, :n] for name, key in (("fbank", "audio_raw"), ("lips", "video")) if s[key] is not None
    }
    inputs["fused"] = x[0, :n]
    return RecordLayers(layers, inputs, float(encoder.frame_rate))


@torch.no_grad()
def record_layers(
    encoder,
    record: dict,
    device: torch.device,
    modalities: Sequence[str] | None = None,
    upto: int | None = None,
) -> RecordLayers:
    """Layers ``0..upto`` (default all) of ``encoder`` (already on ``device``, in eval mode) for
    one manifest record, as float32 on ``device``; the transformer stops after layer ``upto``.

    ``modalities``: which of the record's ``audio`` / ``video`` an audio-visual encoder reads,
    each required; by default every one it has a stream for and the record has a path for (a
    record without video then runs audio-only, as AV-HuBERT can)."""
    required: Sequence[str] = () if modalities is None else modalities
    if is_audio_visual(encoder):
        modalities = encoder.modalities if modalities is None else modalities
        unknown = sorted(set(modalities) - set(encoder.modalities))
        if unknown:
            raise ConfigError(
                f"--modalities {','.join(unknown)}: the encoder reads only {', '.join(encoder.modalities)}"
            )
    else:
        if modalities is not None and tuple(modalities) != ("audio",):
            raise ConfigError(f"--modalities {','.join(modalities)}: a speech encoder reads only audio")
        modalities = ("audio",)
    top = num_layers(encoder)
    upto = top if upto is None else upto
    if not 0 <= upto <= top:
        raise ConfigError(f"layer {upto}: the encoder has layers 1..{top} (0: their input)")
    batch = record_batch(record, modalities, device, required)
    try:
        result = (
            _av_layers(encoder, batch, upto)
            if is_audio_visual(encoder)
            else _speech_layers(encoder, batch, upto)
        )
    except DataError as err:
        raise DataError(f"record {record.get('id')!r}: {err}") from None
    result.layers = [t.float() for t in result.layers]
    result.inputs = {k: t.float() for k, t in result.inputs.items()}
    return result
