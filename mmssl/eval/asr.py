"""ASR with CTC: decoding (greedy, or beam search with a language model:
``mmssl.eval.decoders``) and WER of a fine-tuning run (``mmssl finetune-asr``, which trains
with ``mmssl.train.finetune`` and then calls :func:`evaluate_run`; ``mmssl eval-noisy``).

The units (text normalisation, SentencePiece units, the blank) are ``mmssl.data.units``: they
are trained on the transcripts of the training manifest when fine-tuning starts and saved in
the run folder as ``units.model``, so that training, decoding and ``mmssl eval-noisy`` use the
same units; references and hypotheses are normalised as the targets are.

Shape legend: B batch, S samples, T frames, V CTC classes (units + blank).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jiwer
import torch
from torch import Tensor
from tqdm import tqdm

from mmssl.config import CONFIG_FILE
from mmssl.constants import SAMPLE_RATE, VIDEO_FPS
from mmssl.data.collate import pad_sequences
from mmssl.data.datasets import lip_frames
from mmssl.data.io import load_audio, load_video
from mmssl.data.manifest import read_manifest
from mmssl.data.samplers import pack_batches
from mmssl.data.units import normalize_text
from mmssl.errors import ConfigError, DataError
from mmssl.eval.decoders import Decoder, GreedyDecoder, decoding_settings, make_decoder
from mmssl.files import write_text
from mmssl.runs import latest_checkpoint, load_objective_from_run


def word_errors(refs: Sequence[str], hyps: Sequence[str]) -> dict:
    """Corpus-level WER over normalised texts (jiwer): ``wer``, ``substitutions``,
    ``deletions``, ``insertions``, ``hits``, ``errors``, ``words`` (reference words),
    ``utterances``. An empty reference adds its hypothesis words as insertions."""
    refs = [normalize_text(r) for r in refs]
    hyps = [normalize_text(h) for h in hyps]
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    subs = dels = ins = hits = 0
    scored = [(r, h) for r, h in zip(refs, hyps) if r]
    if scored:
        out = jiwer.process_words([r for r, _ in scored], [h for _, h in scored])
        subs, dels, ins, hits = out.substitutions, out.deletions, out.insertions, out.hits
    ins += sum(len(h.split()) for r, h in zip(refs, hyps) if not r)
    words = subs + dels + hits
    errors = subs + dels + ins
    return {
        "wer": errors / words if words else float(errors > 0),
        "substitutions": subs,
        "deletions": dels,
        "insertions": ins,
        "hits": hits,
        "errors": errors,
        "words": words,
        "utterances": len(refs),
    }


# ---------------------------------------------------------------- decoding a manifest


@dataclass
class Clip:
    """One record held in memory for decoding: ``audio (S,)`` float, ``video (T, H, W)`` uint8
    (lip crops, normalised only when batched), either None when not read."""

    id: str
    transcript: str
    audio: Tensor | None = None
    video: Tensor | None = None

    @property
    def seconds(self) -> float:
        if self.audio is not None:
            return self.audio.shape[0] / SAMPLE_RATE
        assert self.video is not None
        return self.video.shape[0] / VIDEO_FPS


def load_clips(
    manifest: str | Path, modalities: Sequence[str], progress: bool = True, limit: int | None = None
) -> list[Clip]:
    """The records of ``manifest`` (the first ``limit`` when given) with the ``modalities`` they
    are decoded with. ``DataError`` naming the record when it has no transcript or lacks a file
    for one of ``modalities``."""

    records = read_manifest(manifest)[:limit]
    if not records:
        raise DataError(f"{manifest}: no records")
    clips = []
    for record in tqdm(
        records, desc=f"read {Path(manifest).name}", unit="utt", disable=not progress, leave=False
    ):
        rid = str(record["id"])
        if not record.get("transcript"):
            raise DataError(f"{manifest}: record {rid!r} has no transcript (WER needs one per record)")
        clip = Clip(rid, record["transcript"])
        for key, load in (("audio", load_audio), ("video", load_video)):
            if key in modalities:
                if not record.get(key):
                    raise DataError(f"{manifest}: record {rid!r} has no {key!r} path")
                try:
                    setattr(clip, key, load(record[key]))
                except DataError as err:
                    raise DataError(f"{manifest}: record {rid!r}: {err}") from None
        clips.append(clip)
    return clips


def length_batches(clips: Sequence[Clip], batch_seconds: float) -> list[list[int]]:
    """Indices of ``clips`` sorted by length and packed under ``batch_seconds`` of padded audio."""
    if batch_seconds <= 0:
        raise ConfigError(f"--batch-seconds must be positive, got {batch_seconds}")
    seconds = [c.seconds for c in clips]
    order = sorted(range(len(clips)), key=lambda i: seconds[i])
    return pack_batches(order, seconds, batch_seconds)


def clip_batch(
    clips: Sequence[Clip],
    modalities: Sequence[str],
    device: torch.device,
    audios: Sequence[Tensor] | None = None,
) -> dict:
    """A padded batch of ``clips`` with only the keys of ``modalities`` (``audios`` replaces
    the clips' own waveforms, e.g. noisy copies)."""
    batch: dict = {"ids": [c.id for c in clips]}
    if "audio" in modalities:
        waves = list(audios) if audios is not None else [c.audio for c in clips]
        audio, lens = pad_sequences(waves)  # (B, S)
        batch.update(audio=audio.to(device), audio_lens=lens.to(device))
    if "video" in modalities:
        video, lens = pad_sequences([lip_frames(c.video) for c in clips])  # (B, T, 1, H, W)
        batch.update(video=video.to(device), video_lens=lens.to(device))
    return batch


@torch.no_grad()
def transcribe(
    objective,
    clips: Sequence[Clip],
    modalities: Sequence[str],
    device: torch.device,
    batch_seconds: float = 60.0,
    audios: Sequence[Tensor] | None = None,
    progress: bool = True,
    desc: str = "decode",
    decoder: Decoder | None = None,
) -> list[str]:
    """CTC transcripts of ``clips`` (in their order) by a CTC objective in eval mode, batched by
    length, with ``decoder`` (greedy by default). ``audios``: one waveform per clip replacing
    its own."""
    decoder = decoder or GreedyDecoder(objective.units)
    hyps: list[str] = [""] * len(clips)
    batches = length_batches(clips, batch_seconds)
    with tqdm(total=len(clips), desc=desc, unit="utt", disable=not progress, leave=False) as bar:
        for indices in batches:
            waves = [audios[i] for i in indices] if audios is not None else None
            batch = clip_batch([clips[i] for i in indices], modalities, device, waves)
            log_probs, lengths = objective.logits(batch)
            for i, text in zip(indices, decoder(log_probs, lengths)):
                hyps[i] = text
            bar.update(len(indices))
    return hyps


def load_asr_model(run_dir: str | Path, device: torch.device):
    """The CTC objective of a ``mmssl finetune-asr`` run (its latest checkpoint), in eval mode
    on ``device``, with the run's ``units.model``. The encoder is rebuilt from the copy of the
    pretraining run's config kept in the run folder (``mmssl.runs``), so decoding does not need
    the pretraining run any more."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise DataError(f"{run_dir}: no config.yaml (not an `mmssl finetune-asr` run folder)")
    if latest_checkpoint(run_dir) is None:
        raise DataError(f"{run_dir}: no checkpoint yet")
    objective, _ = load_objective_from_run(run_dir, expect="ctc")
    return objective.to(device).eval()


def evaluate_run(
    run_dir: Path,
    manifest: str | Path,
    device: torch.device,
    batch_seconds: float = 60.0,
    decoding: dict | None = None,
) -> dict:
    """Decode ``manifest`` with the run's model; write ``wer.json`` and ``hyps.jsonl`` there.
    ``decoding``: the keyword arguments of :func:`mmssl.eval.decoders.make_decoder` (greedy
    when None), recorded in ``wer.json``."""
    objective = load_asr_model(run_dir, device)
    decoding = decoding_settings(decoding)
    decoder = make_decoder(objective.units, **decoding)
    folder = latest_checkpoint(run_dir)
    clips = load_clips(manifest, objective.modalities)
    hyps = transcribe(
        objective, clips, objective.modalities, device, batch_seconds, desc="decode valid", decoder=decoder
    )
    refs = [normalize_text(c.transcript) for c in clips]
    result = {
        **word_errors(refs, hyps),
        "manifest": str(manifest),
        "modalities": list(objective.modalities),
        "checkpoint": folder.name if folder is not None else None,
        "decoding": decoding,
    }
    lines = "".join(json.dumps({"id": c.id, "ref": r, "hyp": h}) + "\n" for c, r, h in zip(clips, refs, hyps))
    write_text(run_dir / "hyps.jsonl", lines)
    write_text(run_dir / "wer.json", json.dumps(result, indent=2) + "\n")
    return result
