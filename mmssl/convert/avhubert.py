"""AV-HuBERT checkpoints (facebookresearch/av_hubert, a fairseq user directory) -> mmssl's
audio-visual encoder (``mmssl.encoders.av``), without fairseq or the av_hubert code: the ``.pt``
is read with the restricted unpickler and the architecture taken from its config.

Layouts (the reference's ``AVHubertModel`` names and shapes): pretrained (``_name: av_hubert``,
keys at the top), CTC fine-tuned (``av_hubert_ctc``: ``w2v_encoder.w2v_model.*`` and the output
layer ``w2v_encoder.proj``) and seq2seq fine-tuned (``av_hubert_seq2seq``: ``encoder.w2v_model.*``
plus a transformer decoder). Mapped:

* ``feature_extractor_audio.proj`` (the 104 = 26 filterbanks x 4 stacked frames -> model dim
  linear) -> ``audio_proj``; ``feature_extractor_video.resnet.frontend3D`` (3D conv, BN, PReLU)
  -> the lip encoder's stem, ``...resnet.trunk.layer{1..4}.{0,1}`` (ResNet-18 basic blocks:
  ``relu1/relu2`` PReLUs, ``downsample.0/1``) -> its trunk, ``feature_extractor_video.proj`` ->
  ``video_proj``;
* ``layer_norm`` and ``post_extract_proj`` on the concatenated streams -> the fusion;
* ``encoder.*`` -> the transformer (fairseq's names, ``mmssl.convert.fairseq.RULES``);
* pretrained: ``final_proj`` and ``label_embs_concat`` -> the ``av_hubert`` objective's
  ``final_proj`` and ``label_embeddings``; ``mask_emb`` -> its feature mask embedding when the
  checkpoint masks features (``masking_type: feature``); an input-masking ``mask_emb`` (104
  values, on the filterbanks) has no place (mmssl masks the projected audio) and is dropped.

Not imported, and said so: a seq2seq checkpoint's decoder (its encoder alone is loaded; mmssl
has no attention decoder), a CTC head whose dictionary is not given, or holds word pieces
(AV-HuBERT's fine-tuning uses 1000 unigram pieces) without their SentencePiece model
(``--units``). Only ``modality_fuse: concat``,
``sub_encoder_layers: 0``, ``audio_feat_dim: 104`` and ``resnet_relu_type: prelu`` (the released
models' settings) are read; anything else is refused, naming the key. The converted encoder
computes its audio features as AV-HuBERT's data loader does (``audio_features="psf"``:
``python_speech_features.logfbank`` of the int16-scaled waveform, 4 frames stacked, each
stacked frame layer-normed), on the frames of whole 25 ms windows (``logfbank`` adds a
zero-padded last one when the signal does not end on a frame boundary).
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from mmssl.convert.common import AV_FAMILY, CTCHead, ImportedEncoder, character_tokens, rename
from mmssl.convert.fairseq import (
    DICT_FILE,
    RULES,
    config_value,
    model_config,
    pretraining_config,
    read_dictionary,
    transformer_options,
)
from mmssl.convert.safe_load import load_pickle
from mmssl.data.units import Units
from mmssl.errors import DataError

MODEL_NAMES = ("av_hubert", "av_hubert_ctc", "av_hubert_seq2seq")
PREFIXES = {
    "av_hubert": "",
    "av_hubert_ctc": "w2v_encoder.w2v_model.",
    "av_hubert_seq2seq": "encoder.w2v_model.",
}
HEAD = ("w2v_encoder.proj.weight", "w2v_encoder.proj.bias")
AV_RULES = [
    ("feature_extractor_audio.proj.", "audio_proj."),
    ("feature_extractor_video.proj.", "video_proj."),
    ("feature_extractor_video.resnet.frontend3D.0.", "video_frontend.stem_conv."),
    ("feature_extractor_video.resnet.frontend3D.1.", "video_frontend.stem_bn."),
    ("feature_extractor_video.resnet.frontend3D.2.", "video_frontend.stem_act."),
    ("layer_norm.", "fusion.norm."),
    ("post_extract_proj.", "fusion.proj."),
    *[(left, right) for left, right in RULES if left.startswith("encoder.")],
]
TRUNK = re.compile(r"^feature_extractor_video\.resnet\.trunk\.layer([1-4])\.(\d+)\.(.+)$")
BLOCK_PARTS = {
    "relu1.": "act1.",
    "relu2.": "act2.",
    "downsample.0.": "down_conv.",
    "downsample.1.": "down_bn.",
}
BLOCKS_PER_STAGE = 2  # ResNet-18
OBJECTIVE_KEYS = {"final_proj.weight", "final_proj.bias", "label_embs_concat", "mask_emb"}


def _trunk_key(key: str) -> str | None:
    match = TRUNK.match(key)
    if match is None:
        return None
    stage, block, rest = int(match.group(1)), int(match.group(2)), match.group(3)
    for old, new in BLOCK_PARTS.items():
        if rest.startswith(old):
            rest = new + rest[len(old) :]
    return f"video_frontend.trunk.{(stage - 1) * BLOCKS_PER_STAGE + block}.{rest}"


def encoder_options(cfg: dict, source: str) -> dict:
    """``build_av_encoder`` options from an AV-HuBERT pretraining model config."""
    wanted = {"modality_fuse": "concat", "sub_encoder_layers": 0, "audio_feat_dim": 104}
    wanted |= {"resnet_relu_type": "prelu", "activation_fn": "gelu"}
    for key, value in wanted.items():
        if key in cfg and cfg[key] is not None and cfg[key] != value:
            raise DataError(f"{source}: {key}={cfg[key]!r} is not supported (only {value!r})")
    return dict(
        lip="resnet18",
        num_mel_bins=26,
        stack=4,
        normalize_audio=True,
        audio_features="psf",  # the reference's loader: python_speech_features.logfbank
        modality_dropout=float(config_value(cfg, "modality_dropout", source, 0.0)),
        audio_dropout=float(config_value(cfg, "audio_dropout", source, 0.0)),
        **transformer_options(cfg, source),
    )


def _rename(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """AV-HuBERT names -> mmssl encoder names; an unknown key is a ``DataError``."""
    out = {}
    for key, value in state.items():
        new = _trunk_key(key) or rename(key, AV_RULES)
        if new is None:
            raise DataError(f"{source}: unexpected key {key!r} (no mmssl parameter for it)")
        out[new] = value
    return out


def from_avhubert(
    file: str | Path,
    dictionary: str | Path | None = None,
    checkpoint: dict | None = None,
    pieces: Units | None = None,
) -> ImportedEncoder:
    """An AV-HuBERT ``.pt`` -> :class:`ImportedEncoder` of the ``av`` family (keys and shapes
    checked against the architecture its config describes). ``dictionary``: a fine-tuned
    checkpoint's target dictionary (default: ``dict.ltr.txt`` beside ``file``); ``checkpoint``:
    the file's content when already read; ``pieces``: the SentencePiece model of a word-piece
    dictionary (AV-HuBERT's ``tokenizer_bpe_model``), which keeps such a CTC head."""
    file = Path(file)
    source = str(file)
    checkpoint = load_pickle(file) if checkpoint is None else checkpoint
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise DataError(f"{source}: no 'model' state dict (not a fairseq checkpoint)")
    cfg = model_config(checkpoint, source)
    name = str(cfg.get("_name"))
    if name not in MODEL_NAMES:
        raise DataError(f"{source}: model {name!r} is not an AV-HuBERT model ({', '.join(MODEL_NAMES)})")
    pretrain_cfg = cfg if name == "av_hubert" else pretraining_config(cfg.get("w2v_args"))
    if not pretrain_cfg:
        raise DataError(f"{source}: a fine-tuned checkpoint without 'w2v_args' (its pretraining config)")
    options = encoder_options(pretrain_cfg, source)
    prefix = PREFIXES[name]
    state = checkpoint["model"]
    body = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    other = sorted(k for k in state if not k.startswith(prefix) and k not in HEAD)
    imported = ImportedEncoder(AV_FAMILY, options, {}, source, name)
    if name == "av_hubert_seq2seq":
        imported.dropped += other
        imported.notes.append(
            f"a seq2seq checkpoint: its encoder alone is loaded; the decoder ({len(other)} tensors) "
            "is dropped"
        )
    elif other:
        raise DataError(f"{source}: unexpected key {other[0]!r} (no mmssl parameter for it)")
    heads = {k: body.pop(k) for k in list(body) if k in OBJECTIVE_KEYS or k.startswith("target_glu.")}
    imported.state = _rename(body, source)
    _pretraining_head(imported, heads, pretrain_cfg)
    if HEAD[0] in state:
        _ctc_head(imported, state, file, dictionary, pieces)
    imported.build()
    return imported


def _pretraining_head(imported: ImportedEncoder, heads: dict[str, Tensor], cfg: dict) -> None:
    """``final_proj``, ``label_embs_concat`` and a feature-masking ``mask_emb`` -> the
    ``av_hubert`` objective's; the rest is listed as dropped."""
    feature_masking = str(cfg.get("masking_type", "input")) == "feature"
    imported.objective_options["masking_type"] = "feature" if feature_masking else "input"
    if "final_proj.weight" in heads and "label_embs_concat" in heads:
        weight, labels = heads.pop("final_proj.weight"), heads.pop("label_embs_concat")
        imported.objective_state["final_proj.weight"] = weight
        imported.objective_state["final_proj.bias"] = heads.pop("final_proj.bias")
        imported.objective_state["label_embeddings"] = labels
        imported.objective_options.update(num_classes=int(labels.shape[0]), final_dim=int(weight.shape[0]))
    if "mask_emb" in heads and feature_masking:
        imported.objective_state["feature_mask_embedding"] = heads.pop("mask_emb")
    imported.dropped += sorted(heads)


def _ctc_head(
    imported: ImportedEncoder, state: dict, file: Path, dictionary: str | Path | None, pieces: Units | None
) -> None:
    weight, bias = state[HEAD[0]], state.get(HEAD[1])
    if bias is None:
        raise DataError(f"{file}: missing key {HEAD[1]!r}")
    dict_file = Path(dictionary) if dictionary else file.parent / DICT_FILE
    if not dict_file.is_file():
        if dictionary:
            raise DataError(f"{dict_file}: dictionary not found")
        imported.dropped.append("w2v_encoder.proj")
        imported.notes.append(f"the CTC head is dropped: no {DICT_FILE} beside {file.name} (give --dict)")
        return
    tokens = read_dictionary(dict_file)
    if len(tokens) != weight.shape[0]:
        raise DataError(
            f"{file}: key {HEAD[0]!r} has {weight.shape[0]} rows but {dict_file} gives {len(tokens)} classes"
        )
    if pieces is None and not character_tokens(tokens):
        imported.dropped.append("w2v_encoder.proj")
        imported.notes.append(
            f"the CTC head is dropped: {dict_file} holds word pieces; give their SentencePiece model "
            "(--units, the fine-tuning's tokenizer_bpe_model) to keep it"
        )
        return
    imported.head = CTCHead(weight, bias, tokens, blank=0, pieces=pieces)
