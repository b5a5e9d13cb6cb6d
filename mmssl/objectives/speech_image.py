"""Speech-image (and speech-caption) contrastive learning, CLIP-style.

A spoken caption and the image it describes are a positive pair (Harwath et al., 2018,
"Jointly discovering visual objects and spoken words"; FaST-VGS; SpeechCLIP, Shih et al.,
2022). The speech tower is one of mmssl's speech encoders (any ``ENCODERS`` preset, or the
encoder of an ``mmssl pretrain`` run, as SpeechCLIP starts from a pretrained HuBERT), pooled
over its valid frames only (masked mean, or a learned attention pooling), projected to the
image tower's embedding dim and L2-normalised. The image tower (and, for the caption term, the
text tower) come from open_clip (``mmssl.encoders.image`` / ``text``), random or loaded from a
local CLIP checkpoint, optionally frozen (SpeechCLIP keeps CLIP frozen). The speech tower can be
frozen too (``freeze_speech``: SpeechCLIP's frozen HuBERT, where only the pooling and the
projection learn on the speech side).

Loss: CLIP's symmetric InfoNCE (``mmssl.nn.contrastive.symmetric_info_nce``) between speech and
image embeddings, with a learnable logit scale (CLIP, sec. 2.5: temperature initialised at
0.07, scale clipped at 100, clamped in place after every optimizer step by ``on_step``, as
open_clip's training loop does), negatives gathered from every rank with gradients. Several
captions of one image can fall in one batch; they are not negatives of each other: the batch
hook turns the batch's ``groups`` (the image ids) into integer ``group_ids`` (a stable hash, the
same on every rank) and the loss masks same-group pairs. A record without a group is its own
group (its id): it is never masked against another record (``mmssl index`` groups such records
by image path; give records of one image a ``group``). With ``caption_weight > 0`` a second
InfoNCE, with its own logit scale, pairs each spoken caption with its text through the text
tower; other captions of the same image say other words, so they stay negatives there. Speech,
image and text embeddings are gathered across ranks together, once for both terms.

Shape legend: B batch, S samples, T frames, C channels, D embedding dim, L tokens, H/W pixels.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.encoders import build_family
from mmssl.encoders.base import AudioVisualEncoder, SpeechEncoder
from mmssl.encoders.image import SMALL, TINY, ImageTower, build_open_clip, image_tower_from
from mmssl.encoders.text import TextTower, text_tower_from
from mmssl.errors import ConfigError, DataError
from mmssl.nn.contrastive import Gather, LogitScale, gather_ids, gather_rows, pair_info_nce, same_group_mask
from mmssl.nn.padding import lengths_to_padding_mask, masked_mean
from mmssl.objectives.base import BatchHook, Objective
from mmssl.registry import OBJECTIVES

POOLINGS = ("mean", "attention")
# SpeechCLIP (Shih et al., 2022, sec. 4.1): HuBERT base with CLIP ViT-B/16, HuBERT large with ViT-L/14
# (small: mmssl's own ResNet CLIP for CPUs)
CLIP_MODELS = {"tiny": TINY, "small": SMALL, "base": "ViT-B-16", "large": "ViT-L-14"}


def stable_group_id(group: str) -> int:
    """A signed 64-bit id of a group name, the same in every process (Python's ``hash`` is
    salted per process, so ranks would disagree)."""
    return int.from_bytes(hashlib.blake2b(str(group).encode(), digest_size=8).digest(), "little", signed=True)


def group_ids(groups: list[str], ids: list[str] | None = None) -> Tensor:
    """``groups`` (B names; ``""`` for a record without one, as ``collate`` writes it) ->
    ``(B,)`` long ids. A record without a group is a group of its own, named by its id in
    ``ids`` (or by its row when there are no ids): records without groups are never masked as
    captions of one image."""
    names = [g if g != "" else f"\0record:{ids[i] if ids is not None else i}" for i, g in enumerate(groups)]
    return torch.tensor([stable_group_id(g) for g in names], dtype=torch.long)


class GroupIds:
    """Batch hook: ``groups`` (list of image ids, from ``collate``) and ``ids`` ->
    ``group_ids (B,)`` (see ``group_ids``)."""

    def __call__(self, batch: dict) -> dict:
        if "groups" in batch and "group_ids" not in batch:
            batch["group_ids"] = group_ids(batch["groups"], batch.get("ids"))
        return batch


class AttentionPool(nn.Module):
    """A learned score per frame, softmax over the valid frames, weighted sum:
    ``(B, T, C)``, ``lengths (B,)`` -> ``(B, C)`` (self-attentive pooling)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        pad = lengths_to_padding_mask(lengths, x.shape[1])  # (B, T)
        scores = self.score(x).squeeze(-1).float().masked_fill(pad, float("-inf"))
        # a clip with no frame would give a row of -inf: give it zero weights instead of NaN
        weights = torch.softmax(scores.masked_fill(pad.all(1, keepdim=True), 0.0), dim=-1) * (~pad)
        return torch.einsum("bt,btc->bc", weights.to(x.dtype), x)


class SpeechImage(Objective):
    """Speech vs image (and optionally vs caption text) symmetric InfoNCE on injected towers.

    ``embed_speech`` / ``embed_image`` / ``embed_text`` give the normalised ``(B, D)`` embeddings
    the loss compares, for retrieval. ``image_transform`` and ``text_tokenizer`` are what the
    dataset applies to each image and caption.
    """

    def __init__(
        self,
        encoder: SpeechEncoder,
        image_tower: ImageTower,
        text_tower: TextTower | None = None,
        pooling: str = "mean",
        caption_weight: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
        gather: Gather = gather_rows,
        freeze_speech: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"speech_image: pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        if caption_weight < 0:
            raise ConfigError(f"speech_image: caption_weight must be >= 0, got {caption_weight}")
        if caption_weight > 0 and text_tower is None:
            raise ConfigError("speech_image: caption_weight > 0 needs a text tower")
        if text_tower is not None and text_tower.dim != image_tower.dim:
            raise ConfigError(
                f"speech_image: text tower dim {text_tower.dim} != image tower dim {image_tower.dim}"
            )
        self.encoder, self.image_tower, self.text_tower = encoder, image_tower, text_tower
        # a frozen speech tower (SpeechCLIP keeps HuBERT fixed): no gradient, eval mode, and its
        # forward pass builds no graph
        self.speech_frozen = freeze_speech
        for p in encoder.parameters():
            p.requires_grad_(not freeze_speech)
        self.attention_pool = AttentionPool(encoder.dim) if pooling == "attention" else None
        self.speech_proj = nn.Linear(encoder.dim, image_tower.dim)
        self.logit_scale = LogitScale()
        self.caption_scale = LogitScale() if caption_weight > 0 else None
        self.caption_weight = caption_weight
        self.rank, self.world_size, self.gather = rank, world_size, gather
        self.modalities = ("audio", "image", "text") if caption_weight > 0 else ("audio", "image")
        self.image_transform = image_tower.transform()
        self.text_tokenizer = text_tower.tokenizer() if text_tower is not None else None

    @property
    def dim(self) -> int:
        """``D``: the shared embedding dim."""
        return self.image_tower.dim

    def batch_hook(self) -> BatchHook:
        return GroupIds()

    def train(self, mode: bool = True) -> SpeechImage:
        super().train(mode)
        if self.speech_frozen:
            self.encoder.eval()
        return self

    def on_step(self, step: int) -> None:
        # CLIP's cap on the logit scale, applied to the parameter after each optimizer step
        self.logit_scale.clamp_()
        if self.caption_scale is not None:
            self.caption_scale.clamp_()

    def embed_speech(self, audio: Tensor, audio_lens: Tensor) -> Tensor:
        """``audio (B, S)``, ``audio_lens (B,)`` -> normalised ``(B, D)``, pooled over valid frames."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.speech_frozen):
            if isinstance(self.encoder, AudioVisualEncoder):  # its audio stream (zeros for the lips)
                out = self.encoder.encode({"audio": audio, "audio_lens": audio_lens})
            else:
                out = self.encoder(audio, audio_lens)
        if self.attention_pool is not None:
            pooled = self.attention_pool(out.hidden, out.lengths)
        else:
            pooled = masked_mean(out.hidden, out.lengths)  # (B, C)
        return F.normalize(self.speech_proj(pooled), dim=-1)

    def embed_image(self, image: Tensor) -> Tensor:
        """``image (B, 3, H, W)``, preprocessed by ``image_transform`` -> normalised ``(B, D)``."""
        return F.normalize(self.image_tower(image), dim=-1)

    def embed_text(self, text: Tensor, text_lens: Tensor) -> Tensor:
        """``text (B, L)`` token ids, ``text_lens (B,)`` -> normalised ``(B, D)``."""
        if self.text_tower is None:
            raise ConfigError(
                "this model has no text tower (train it with objective.caption_weight > 0 to embed text)"
            )
        return F.normalize(self.text_tower(text, text_lens), dim=-1)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        missing = [k for k in self.modalities if k not in batch]
        if missing:
            raise DataError(
                f"speech_image: the batch has no {', '.join(missing)} (data.modalities must list "
                f"{', '.join(self.modalities)})"
            )
        groups = batch.get("group_ids")
        if groups is None and "groups" in batch:  # the batch hook did not run (tests, evaluation)
            groups = group_ids(batch["groups"], batch.get("ids"))
        speech = self.embed_speech(batch["audio"], batch["audio_lens"])
        image = self.embed_image(batch["image"])
        sides = [speech, image]
        if self.caption_scale is not None:
            sides.append(self.embed_text(batch["text"], batch["text_lens"]))
        d = speech.shape[1]
        # every side in one gather (one size exchange, one all_gather) for both InfoNCE terms
        gathered, sizes = self.gather(torch.cat(sides, dim=1), self.rank, self.world_size)  # (N, 2D or 3D)
        offset = sum(sizes[: self.rank])
        all_speech = gathered[:, :d]
        excluded = None
        if groups is not None:
            groups = groups.to(speech.device)
            excluded = same_group_mask(groups, gather_ids(groups, sizes), offset)
        scale = self.logit_scale()
        loss, acc_si, acc_is = pair_info_nce(
            speech, image, all_speech, gathered[:, d : 2 * d], offset, scale, excluded
        )
        out = {
            "image_loss": loss,
            "speech_image_accuracy": acc_si,
            "image_speech_accuracy": acc_is,
            "logit_scale": scale.detach(),
        }
        if self.caption_scale is not None:
            caption_scale = self.caption_scale()
            caption, acc_st, acc_ts = pair_info_nce(
                speech, sides[2], all_speech, gathered[:, 2 * d :], offset, caption_scale
            )
            loss = loss + self.caption_weight * caption
            out.update(
                caption_loss=caption,
                speech_text_accuracy=acc_st,
                text_speech_accuracy=acc_ts,
                caption_logit_scale=caption_scale.detach(),
            )
        out["loss"] = loss
        return out


def _speech_encoder(
    size: str,
    speech: str,
    encoder: dict[str, Any] | None,
    speech_init: SpeechEncoder | AudioVisualEncoder | None,
) -> SpeechEncoder | AudioVisualEncoder:
    if speech_init is not None:
        if encoder:
            raise ConfigError(
                "speech_image: objective.encoder overrides cannot apply to a speech_init run's encoder"
            )
        enc = speech_init.train()
        if isinstance(enc, AudioVisualEncoder):
            if "audio" not in enc.modalities:
                raise ConfigError("speech_image: objective.speech_init is an encoder without an audio stream")
            # the tower hears speech only: an audio-visual encoder (AV-HuBERT) reads its audio
            # stream, and modality dropout would drop the only stream there is
            enc.fusion.modality_dropout = 0.0
            return enc
    else:
        enc = build_family(speech, size, encoder, what="objective.speech")
    if not isinstance(enc, SpeechEncoder):
        raise ConfigError(
            f"speech_image: {'objective.speech_init' if speech_init is not None else f'{speech}_{size}'} "
            "is not a speech encoder"
        )
    return enc


@OBJECTIVES.register(init_runs=("speech_init",), init_files=("clip_pretrained",))
def speech_image(
    size: str = "base",
    speech: str = "hubert",  # the speech encoder preset family: <speech>_<size>
    encoder: dict[str, Any] | None = None,  # overrides of the speech encoder preset
    # the encoder of an `mmssl pretrain` (or `finetune-asr`) run (config: its path); an
    # audio-visual one (AV-HuBERT) is used on its audio stream
    speech_init: SpeechEncoder | AudioVisualEncoder | None = None,
    clip_model: str
    | None = None,  # "tiny" or a plain CLIP config of open_clip; None: by size (SpeechCLIP's pairing)
    clip_pretrained: str
    | None = None,  # a local open_clip-format state dict file (OpenAI weights: -quickgelu config)
    freeze_image: bool = False,  # SpeechCLIP: True, with clip_pretrained
    freeze_text: bool = False,
    # SpeechCLIP: True (a frozen HuBERT; only the pooling and projection learn on the speech side)
    freeze_speech: bool = False,
    pooling: str = "mean",  # mean | attention
    caption_weight: float = 0.0,  # 0: speech-image only; > 0 adds the speech-caption InfoNCE
    rank: int = 0,
    world_size: int = 1,
) -> SpeechImage:
    """The speech tower ``<speech>_<size>`` (or ``speech_init``'s encoder) against the image
    tower (and text tower, when ``caption_weight > 0``) of one open_clip model.

    ``clip_model``: ``"tiny"`` or one of ``mmssl.encoders.image.clip_configs()`` (others are a
    ``ConfigError`` listing them). ``clip_pretrained``: a local checkpoint in open_clip's format
    (a state dict); weights trained by OpenAI need the ``-quickgelu`` config of their model
    (``ViT-B-16-quickgelu``...), and their original TorchScript ``.pt`` files must be converted
    first (``mmssl.encoders.image`` says how; loading one is a ``DataError`` that says it too).
    ``speech_init`` is the encoder module itself: the recipe key ``objective.speech_init`` names
    a run, which the run-folder layer (``mmssl.runs.build_objective``) loads before calling this
    builder."""
    if size not in CLIP_MODELS:
        raise ConfigError(f"speech_image: size must be one of {', '.join(CLIP_MODELS)}; got {size!r}")
    enc = _speech_encoder(size, speech, encoder, speech_init)
    clip = build_open_clip(clip_model or CLIP_MODELS[size], clip_pretrained)
    image = image_tower_from(clip, freeze_image)
    text = text_tower_from(clip, freeze_text) if caption_weight > 0 else None
    return SpeechImage(
        enc, image, text, pooling, caption_weight, rank, world_size, freeze_speech=freeze_speech
    )
