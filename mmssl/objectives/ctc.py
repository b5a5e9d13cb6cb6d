"""CTC fine-tuning (Graves et al., 2006) of a pretrained speech or audio-visual encoder, as
wav2vec 2.0 (Baevski et al., 2020, sec. 4.4), HuBERT and AV-HuBERT (Shi et al., 2022) fine-tune
for ASR.

Parts: the encoder (a ``SpeechEncoder`` or an ``AudioVisualEncoder``), dropout (fairseq
``final_dropout``) and a linear head to the units plus the blank (class 0,
``mmssl.data.units.Units``). The loss is ``torch.nn.functional.ctc_loss`` summed over the
feasible utterances of the batch and divided by their number (fairseq ``sentence_avg=true``,
the wav2vec 2.0 fine-tuning setting). An utterance whose targets cannot fit its frames (target
units plus one blank between each pair of equal neighbours exceed the frames) has no CTC path:
it adds nothing and, unlike fairseq (which keeps it in the denominator with
``zero_infinity``), it is left out of the count; ``infeasible_fraction`` reports how many.

The step never waits for the device: the hook counts the encoder's output frames and the
target lengths on the host, and they reach ``ctc_loss`` as host lists (``to_device`` moves
tensors only), since ``ctc_loss`` copies device lengths to the host (PyTorch ``LossCTC.cpp``).
Without the hook, ``forward`` counts them from the device lengths (the slow path: one sync).

In the data workers (:class:`CTCHook`): transcripts become targets with the units (no
tokenisation in the step), optional noise is added to the waveform (noise-augmented
AV-HuBERT), output frames are counted, time and channel masks are drawn, and, with both
streams, modality dropout is drawn.

Fine-tuning settings, after fairseq's wav2vec 2.0 ``base_10h`` recipe:

* time masking of the projected features with the pretrained mask embedding,
  ``mask_prob=0.65``, span 10 (``mask_prob``, ``mask_length``; the same spans as pretraining,
  ``mmssl.nn.masking``), then channel masking: spans of ``mask_channel_length=64`` channels
  zeroed over all frames, ``mask_channel_prob=0.5``; for an audio-visual encoder both masks
  act on the audio stream's projected features before fusion (the video stream is untouched);
* the encoder is frozen for the first ``freeze_steps`` updates, only the head trains
  (``freeze_finetune_updates=10000`` of 20000 there);
* a waveform conv frontend of a pretrained encoder is frozen throughout
  (``feature_grad_mult=0.0``); a fresh encoder (from-scratch baseline) trains it.

Not in fairseq: ``augment_after=N`` trains the first N updates on clean audio with both streams
(the hook keeps the waveforms before the noise), then turns the noise and modality dropout on.
A short CPU run learns its alignments first: measured on the built-in corpus, a small AV model
with modality dropout and noise from the first update stays near the all-blank output for
hundreds of updates, while clean updates first reach 22 % valid WER in 600.

Shape legend: B batch, S samples, T frames, L target units, C model dim, V units + blank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.data.noise import AddNoise, NoiseBank, snr_range
from mmssl.data.units import BLANK, UNIT_KINDS, Units, default_units
from mmssl.encoders import build_family
from mmssl.encoders.audio import AudioEncoder
from mmssl.encoders.base import AudioVisualEncoder, FrameSpec, SpeechEncoder
from mmssl.encoders.fusion import sample_keep
from mmssl.errors import ConfigError, DataError
from mmssl.nn.dropout import Dropout
from mmssl.nn.frontend import ConvFrontend
from mmssl.nn.masking import compute_span_mask, hook_generator
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.objectives.base import BatchHook, Objective
from mmssl.registry import OBJECTIVES


def make_targets(batch: dict, units: Units) -> tuple[Tensor, Tensor]:
    """``ctc_targets (B, L)`` (0 after each length; 0 is never a target) and
    ``ctc_target_lens (B,)`` from ``batch["transcript"]``. ``DataError`` naming the record
    when there is no transcript or nothing is left of it after normalisation."""
    ids = batch.get("ids") or [f"#{i}" for i in range(len(batch.get("transcript", [])))]
    if "transcript" not in batch:
        raise DataError(f"records {ids[:3]} have no 'transcript': CTC fine-tuning needs transcripts")
    rows = []
    for rid, text in zip(ids, batch["transcript"]):
        classes = units.encode(text)
        if not classes:
            raise DataError(f"record {rid!r}: empty transcript {text!r} (after normalisation)")
        rows.append(torch.tensor(classes, dtype=torch.long))
    lens = torch.tensor([len(r) for r in rows], dtype=torch.long)
    targets = torch.zeros(len(rows), int(lens.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        targets[i, : len(r)] = r
    return targets, lens


def output_lengths(batch: dict, frame_spec: FrameSpec | None, streams: Sequence[str]) -> Tensor:
    """Frames ``(B,)`` the encoder gives for ``batch``, counted without it: ``frame_spec`` of
    the audio lengths for a speech encoder or an audio stream alone, the video lengths for a
    video stream alone, and with both streams the fusion's rule (``AVFusion``: the shorter of
    the two per utterance, at most the shorter padded width). ``streams``: the encoder's."""
    audio = video = None
    if "audio" in streams and "audio" in batch and frame_spec is not None:
        audio = frame_spec(batch["audio_lens"])
    if "video" in streams and "video" in batch:
        video = batch["video_lens"].long()
    if audio is not None and video is not None:
        width = min(int(frame_spec(torch.tensor(batch["audio"].shape[1]))), batch["video"].shape[1])  # type: ignore[misc]
        return torch.minimum(audio, video).clamp(max=width)
    if audio is None and video is None:
        raise DataError(f"the batch has none of the encoder's modalities {tuple(streams)}")
    return audio if audio is not None else video  # type: ignore[return-value]


def feasible(targets: Tensor, target_lens: Tensor, frames: Tensor) -> Tensor:
    """bool ``(B,)``: an utterance has a CTC path, i.e. its ``target_lens`` units plus one blank
    between each pair of equal neighbours fit its ``frames``. ``targets (B, L)``; any device."""
    valid = ~lengths_to_padding_mask(target_lens, targets.shape[1])
    repeats = ((targets[:, 1:] == targets[:, :-1]) & valid[:, 1:]).sum(1)
    return target_lens + repeats <= frames.to(target_lens.device)


@dataclass
class CTCHook:
    """Picklable batch hook: noise (``noise``, on each valid waveform), ``ctc_targets (B, L)``,
    ``ctc_target_lens`` and ``ctc_frame_lens`` (host lists of ints: the encoder's output frames,
    :func:`output_lengths` over ``streams``), ``ctc_feasible (B,)``, ``time_mask (B, T_audio)``
    over the audio frames counted with ``frame_spec`` (when ``mask_prob > 0``), ``channel_mask
    (B, channels)`` (when ``mask_channel_prob > 0``), and ``keep_audio`` / ``keep_video (B,)``
    under modality dropout when the batch has both streams; with ``keep_clean``, ``clean_audio``
    (the waveforms before the noise). Draws from ``hook_generator(seed)``."""

    units: Units
    frame_spec: FrameSpec | None
    mask_prob: float = 0.65
    mask_span: int = 10
    min_masks: int = 2
    seed: int = 0
    noise: AddNoise | None = None
    modality_dropout: float = 0.0
    audio_dropout: float = 0.5
    streams: tuple[str, ...] = ("audio",)
    channels: int = 0
    mask_channel_prob: float = 0.0
    mask_channel_span: int = 64
    keep_clean: bool = False

    def __call__(self, batch: dict) -> dict:
        g = hook_generator(self.seed)
        if "audio" in batch and self.noise is not None:
            if self.keep_clean:
                batch["clean_audio"] = batch["audio"]
            audio = batch["audio"].clone()
            for i, n in enumerate(batch["audio_lens"].tolist()):
                audio[i, :n] = self.noise(audio[i, :n], g)
            batch["audio"] = audio
        targets, target_lens = make_targets(batch, self.units)
        frames = output_lengths(batch, self.frame_spec, self.streams)
        batch["ctc_targets"], batch["ctc_feasible"] = targets, feasible(targets, target_lens, frames)
        batch["ctc_target_lens"], batch["ctc_frame_lens"] = target_lens.tolist(), frames.tolist()
        if "audio" in batch and self.frame_spec is not None and self.mask_prob > 0:
            audio_frames = self.frame_spec(batch["audio_lens"].cpu())
            width = int(self.frame_spec(torch.tensor(batch["audio"].shape[1])))
            batch["time_mask"] = compute_span_mask(
                audio_frames, width, self.mask_prob, self.mask_span, self.min_masks, g
            )
        if "audio" in batch and self.channels > 0 and self.mask_channel_prob > 0:
            batch["channel_mask"] = channel_mask(
                batch["audio_lens"].shape[0], self.channels, self.mask_channel_prob, self.mask_channel_span, g
            )
        if "audio" in batch and "video" in batch and self.modality_dropout > 0:
            batch["keep_audio"], batch["keep_video"] = sample_keep(
                batch["audio_lens"].shape[0], self.modality_dropout, self.audio_dropout, g
            )
        return batch


def channel_mask(
    batch: int,
    channels: int,
    prob: float,
    span: int,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """bool ``(B, C)``, True = channel zeroed in every frame: spans of ``span`` channels drawn as
    time spans are (``mmssl.nn.masking``, no minimum count; fairseq ``mask_channel_prob``,
    ``mask_channel_length``, wav2vec 2.0 fine-tuning)."""
    lengths = torch.full((batch,), channels, dtype=torch.long, device=device)
    return compute_span_mask(lengths, channels, prob, span, 0, generator)


def ctc_loss(
    log_probs: Tensor,
    lengths: Tensor | list[int],
    targets: Tensor,
    target_lens: Tensor | list[int],
    ok: Tensor,
) -> Tensor:
    """Sum over the feasible utterances (``ok (B,)`` bool) of the CTC loss divided by their
    number (fairseq ``sentence_avg``; 0 when none is). ``log_probs (B, T, V)`` float,
    ``lengths`` / ``target_lens (B,)`` (host lists keep ``ctc_loss`` from syncing),
    ``targets (B, L)``."""
    per_utt = F.ctc_loss(
        log_probs.float().transpose(0, 1),
        targets,
        lengths,
        target_lens,
        blank=BLANK,
        reduction="none",
        zero_infinity=True,
    )  # (B,)
    ok = ok.to(per_utt.device)
    return torch.where(ok, per_utt, 0.0).sum() / ok.sum().clamp(min=1)


class CTCObjective(Objective):
    """``forward(batch)`` reads ``audio``/``audio_lens`` and/or ``video``/``video_lens``,
    ``transcript`` (or, from the hook, ``ctc_targets``, ``ctc_target_lens``, ``ctc_frame_lens``,
    ``ctc_feasible``) and, in training, ``time_mask``, ``channel_mask``, ``keep_audio``,
    ``keep_video`` when the hook made them (drawn on the device otherwise)."""

    def __init__(
        self,
        encoder: nn.Module,
        units: Units,
        hook: CTCHook,
        final_dropout: float = 0.0,
        freeze_steps: int = 0,
        augment_after: int = 0,
    ) -> None:
        super().__init__()
        self.encoder, self.units, self.hook = encoder, units, hook
        self.audio_visual = isinstance(encoder, AudioVisualEncoder)
        self.modalities = tuple(encoder.modalities) if self.audio_visual else ("audio",)
        self.dropout = Dropout(final_dropout)
        self.head = nn.Linear(encoder.dim, units.size)
        self.freeze_steps = freeze_steps
        self.augment_after = augment_after
        # updates done, saved in checkpoints so a resumed run knows whether the encoder is frozen;
        # ``_updates`` mirrors it on the host, so forward never reads the device
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._updates = 0
        self.register_load_state_dict_post_hook(_sync_updates)

    def batch_hook(self) -> BatchHook:
        return self.hook

    def set_step(self, step: int) -> None:
        self._updates = step
        self.updates.fill_(step)

    @property
    def encoder_frozen(self) -> bool:
        return self._updates < self.freeze_steps

    @property
    def augmenting(self) -> bool:
        """Noise and modality dropout apply (training, from update ``augment_after`` on)."""
        return self.training and self._updates >= self.augment_after

    def _clean(self, batch: dict) -> dict:
        """Before update ``augment_after``: the batch's waveforms before the hook's noise."""
        if self.training and not self.augmenting and "clean_audio" in batch:
            return {**batch, "audio": batch["clean_audio"]}
        return batch

    def _time_mask(self, batch: dict, lengths: Tensor, t: int) -> Tensor | None:
        if not self.training or self.hook.mask_prob <= 0:
            return None
        mask = batch.get("time_mask")
        if mask is None:
            mask = compute_span_mask(
                lengths, t, self.hook.mask_prob, self.hook.mask_span, self.hook.min_masks
            )
        elif mask.shape != (lengths.shape[0], t):
            raise DataError(
                f"batch 'time_mask' has shape {tuple(mask.shape)} but the encoder gives "
                f"({lengths.shape[0]}, {t}) frames: the hook and the encoder disagree"
            )
        return mask.to(lengths.device, non_blocking=True) & ~lengths_to_padding_mask(lengths, t)

    def _channel_mask(self, batch: dict, x: Tensor) -> Tensor | None:
        """``channel_mask (B, C)`` of the hook (or drawn here) in training, else None."""
        if not self.training or self.hook.mask_channel_prob <= 0 or self.hook.channels <= 0:
            return None
        mask = batch.get("channel_mask")
        if mask is None:
            mask = channel_mask(
                x.shape[0],
                x.shape[-1],
                self.hook.mask_channel_prob,
                self.hook.mask_channel_span,
                device=x.device,
            )
        elif mask.shape != (x.shape[0], x.shape[-1]):
            raise DataError(
                f"batch 'channel_mask' has shape {tuple(mask.shape)} but the features are "
                f"({x.shape[0]}, {x.shape[-1]}) channels: the hook and the encoder disagree"
            )
        return mask.to(x.device, non_blocking=True)

    def _mask(self, batch: dict, x: Tensor, lengths: Tensor, embed) -> Tensor:
        """Time spans replaced by ``embed(x, mask)``, then channel spans zeroed (fairseq order)."""
        mask = self._time_mask(batch, lengths, x.shape[1])
        if mask is not None:
            x = embed(x, mask)
        channels = self._channel_mask(batch, x)
        if channels is not None:
            x = x.masked_fill(channels.unsqueeze(1), 0.0)  # (B, T, C)
        return x

    def _speech(self, batch: dict) -> tuple[Tensor, Tensor]:
        enc = self.encoder
        if "audio" not in batch:
            raise DataError("a speech encoder needs audio; the batch has none")
        batch = self._clean(batch)
        feats = enc.extract(batch["audio"], batch["audio_lens"])
        x, lengths = feats.x, feats.lengths
        if isinstance(enc, AudioEncoder):
            x = self._mask(batch, x, lengths, enc.mask)
        return enc.contextualize(x, lengths).hidden, lengths

    def _audio_visual(self, batch: dict) -> tuple[Tensor, Tensor]:
        enc = self.encoder
        batch = self._clean(batch)
        s = enc.streams(batch)
        a, a_lens = s["audio"], s["audio_lens"]
        if a is not None and enc.audio_mask_embedding is not None:
            a = self._mask(batch, a, a_lens, enc.mask_audio)
        keep = None
        if self.training and a is not None and s["video"] is not None:
            if not self.augmenting:  # both streams of every utterance
                every = torch.ones(a.shape[0], dtype=torch.bool)
                keep = (every, every)
            elif "keep_audio" in batch:
                keep = (batch["keep_audio"], batch["keep_video"])
        x, lengths = enc.fuse(a, a_lens, s["video"], s["video_lens"], keep)
        return enc.contextualize(x, lengths).hidden, lengths

    def logits(self, batch: dict) -> tuple[Tensor, Tensor]:
        """``(log_probs (B, T, V) float32, lengths (B,))``; padded frames are not valid frames."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            hidden, lengths = self._audio_visual(batch) if self.audio_visual else self._speech(batch)
        return self.head(self.dropout(hidden)).float().log_softmax(-1), lengths

    def forward(self, batch: dict) -> dict[str, Tensor]:
        log_probs, lengths = self.logits(batch)
        if "ctc_frame_lens" in batch:  # the hook counted frames and units on the host
            targets = batch["ctc_targets"].to(lengths.device, non_blocking=True)
            frames, target_lens, ok = batch["ctc_frame_lens"], batch["ctc_target_lens"], batch["ctc_feasible"]
            if len(frames) != log_probs.shape[0] or max(frames) > log_probs.shape[1]:
                raise DataError(
                    f"batch 'ctc_frame_lens' {frames[:4]} does not fit the encoder's "
                    f"{tuple(log_probs.shape[:2])} frames: the hook and the encoder disagree"
                )
        else:  # the slow path (tests, evaluation): the lengths are read back from the device
            targets, target_lens = make_targets(batch, self.units)
            targets, target_lens = targets.to(lengths.device), target_lens.to(lengths.device)
            ok = feasible(targets, target_lens, lengths)
            frames, target_lens = lengths.cpu(), target_lens.cpu()
        loss = ctc_loss(log_probs, frames, targets, target_lens, ok)
        valid = ~lengths_to_padding_mask(lengths, log_probs.shape[1])
        blank = (log_probs.argmax(-1) == BLANK) & valid
        ok = ok.to(loss.device, non_blocking=True)
        return {
            "loss": loss,
            "ctc_loss": loss.detach(),
            # a per-step proxy of decoding progress: a model that emits only blanks scores 1
            "blank_fraction": blank.sum().float() / valid.sum().clamp(min=1).float(),
            # utterances with more units (and repeats) than frames: left out of the loss
            "infeasible_fraction": 1.0 - ok.float().mean(),
            "encoder_frozen": torch.full((), float(self.encoder_frozen), device=loss.device),
        }


def _sync_updates(module: CTCObjective, incompatible_keys: Any) -> None:
    module._updates = int(module.updates)


def build_ctc_encoder(
    encoder: str, size: str, encoder_init: nn.Module | None, options: dict[str, Any] | None
) -> SpeechEncoder | AudioVisualEncoder:
    """``encoder_init`` (the encoder of a pretraining run, loaded by whoever builds the
    objective), or a fresh ``<encoder>_<size>`` preset (from-scratch baseline)."""
    if encoder_init is not None:
        if not isinstance(encoder_init, (SpeechEncoder, AudioVisualEncoder)):
            raise ConfigError(
                f"objective.encoder_init: the ctc builder takes the encoder of a run, got "
                f"{type(encoder_init).__name__} (mmssl.runs.build_objective loads a run's path)"
            )
        if options:
            raise ConfigError("objective.encoder_options apply to a fresh encoder only, not to encoder_init")
        return encoder_init
    return build_family(encoder, size, options, what="objective.encoder")


@OBJECTIVES.register(init_runs=("encoder_init",), run_files=("units_file",), train_data=("noise_dir",))
def ctc(
    size: str = "base",
    encoder: str = "hubert",  # a fresh encoder preset family, used when encoder_init is none
    encoder_init: nn.Module | None = None,  # the encoder of the pretraining run (config: its path)
    encoder_options: dict[str, Any] | None = None,  # preset overrides of a fresh encoder
    units: str = "char",  # char | unigram | bpe: what `mmssl finetune-asr` trains on the transcripts
    vocab_size: int = 1000,  # unigram and bpe (AV-HuBERT on LRS3: 1000 unigram): read by finetune-asr
    units_file: str | None = None,  # a units.model; None: built-in character units
    final_dropout: float = 0.0,  # fairseq wav2vec 2.0 base_10h ``final_dropout``
    freeze_steps: int = 0,  # fairseq ``freeze_finetune_updates`` (base_10h: 10000)
    mask_prob: float = 0.65,  # base_10h ``mask_prob`` (spans of ``mask_length=10``)
    mask_span: int = 10,
    min_masks: int = 2,
    mask_channel_prob: float = 0.0,  # base_10h ``mask_channel_prob=0.5`` (set in ctc.yaml)
    mask_channel_length: int = 64,  # base_10h ``mask_channel_length``
    modality_dropout: float | None = None,  # None: the encoder's (AV-HuBERT 0.5)
    audio_dropout: float | None = None,  # None: the encoder's (AV-HuBERT 0.5)
    noise_dir: str | None = None,  # noise-augmented fine-tuning (audio of an AV or speech encoder)
    noise_prob: float = 0.25,  # AV-HuBERT fine-tuning ``noise_prob: 0.25``
    noise_snr: float | list[float] = 0.0,  # ``noise_snr: 0`` dB; [low, high]: uniform in that range
    augment_after: int = 0,  # noise and modality dropout from this update on (clean before)
    seed: int = 0,
) -> CTCObjective:
    """CTC fine-tuning of a pretrained (``encoder_init``) or fresh (``encoder``, ``size``)
    encoder on the units of ``units_file``.

    ``encoder_init`` is the encoder module itself: the recipe key ``objective.encoder_init``
    names a run, which the run-folder layer (``mmssl.runs.build_objective``, as it registered in
    ``init_runs``) loads before calling this builder. ``units`` and ``vocab_size`` say which units
    ``mmssl finetune-asr`` trains into ``units_file``; the head's size comes from that file."""
    if units not in UNIT_KINDS:
        raise ConfigError(f"objective.units: {units!r} is not one of {', '.join(UNIT_KINDS)}")
    if freeze_steps < 0:
        raise ConfigError(f"objective.freeze_steps must be >= 0, got {freeze_steps}")
    if augment_after < 0:
        raise ConfigError(f"objective.augment_after must be >= 0, got {augment_after}")
    enc = build_ctc_encoder(encoder, size, encoder_init, encoder_options)
    if isinstance(enc, SpeechEncoder) and isinstance(enc.frontend, ConvFrontend) and encoder_init is not None:
        enc.frontend.requires_grad_(False)  # fairseq fine-tuning ``feature_grad_mult=0.0``, pretrained only
    vocab = Units.load(units_file) if units_file else default_units()
    noise = AddNoise(NoiseBank(noise_dir), noise_prob, snr_range(noise_snr)) if noise_dir else None
    if isinstance(enc, AudioVisualEncoder):
        fusion = enc.fusion
        fusion.modality_dropout = fusion.modality_dropout if modality_dropout is None else modality_dropout
        fusion.audio_dropout = fusion.audio_dropout if audio_dropout is None else audio_dropout
        both = len(enc.modalities) == 2
        # channel masks act on the audio stream before fusion
        channels = fusion.audio_dim if enc.audio_mask_embedding is not None else 0
        hook = CTCHook(
            vocab,
            enc.frame_spec,
            mask_prob,
            mask_span,
            min_masks,
            seed,
            noise,
            fusion.modality_dropout if both else 0.0,
            fusion.audio_dropout if both else 0.5,
            tuple(enc.modalities),
            channels,
            mask_channel_prob,
            mask_channel_length,
            noise is not None and augment_after > 0,
        )
    else:
        channels = enc.dim if isinstance(enc, AudioEncoder) else 0
        hook = CTCHook(
            vocab,
            enc.frame_spec,
            mask_prob,
            mask_span,
            min_masks,
            seed,
            noise,
            0.0,
            0.5,
            ("audio",),
            channels,
            mask_channel_prob,
            mask_channel_length,
            noise is not None and augment_after > 0,
        )
    return CTCObjective(enc, vocab, hook, final_dropout, freeze_steps, augment_after)
