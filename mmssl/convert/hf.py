"""Hugging Face ``transformers`` speech encoders <-> mmssl ``AudioEncoder``, without importing
``transformers``: the folder's ``config.json`` is read as JSON and its weights with safetensors
(``model.safetensors``) or the restricted unpickler (``pytorch_model.bin``,
``mmssl.convert.safe_load``).

Read: ``Wav2Vec2Model`` / ``Wav2Vec2ForCTC``, ``HubertModel`` / ``HubertForCTC``, ``WavLMModel`` /
``WavLMForCTC``, ``Data2VecAudioModel`` / ``Data2VecAudioForCTC``: post-norm (base,
``do_stable_layer_norm=false``) and pre-norm ("stable layer norm", large) layers, a group-norm
(first layer) or layer-norm conv frontend with or without conv bias, the weight-normed position
convolution saved either way (``weight_g`` / ``weight_v`` or
``parametrizations.weight.original0`` / ``original1``), data2vec's stacked position convolutions
and WavLM's gated relative position bias. A ``*ForCTC`` model's ``lm_head`` with the folder's
``vocab.json`` becomes a CTC head on mmssl character units (``mmssl.convert.common.head_units``).

Written (:func:`to_hf`): the ``*Model`` of the encoder's family, so
``transformers.AutoModel.from_pretrained(folder)`` loads it. Only the encoder is written: the
heads of mmssl objectives (a CTC head on SentencePiece units, HuBERT's projection and label
embeddings, wav2vec 2.0's quantizer, data2vec's teacher) are not.

Two differences in behaviour, on padded batches only: with a group-norm frontend
(``feat_extract_norm="group"``) ``transformers`` takes the statistics over padding too (its
base models are meant to run without an attention mask), and data2vec's stacked position
convolutions there see the padded frames of earlier layers; mmssl gives every utterance of a
padded batch what it gets alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor

from mmssl.convert.common import NORMALIZE_NOTE, CTCHead, ImportedEncoder, need, rename, rename_state
from mmssl.convert.safe_load import load_pickle
from mmssl.encoders.audio import AudioEncoder
from mmssl.errors import DataError
from mmssl.files import read_text

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
PICKLE = "pytorch_model.bin"
VOCAB = "vocab.json"
PREPROCESSOR = "preprocessor_config.json"

# model_type -> (mmssl family, *Model class, prefix of the base model in a *ForCTC state dict)
MODEL_TYPES = {
    "wav2vec2": ("wav2vec2", "Wav2Vec2Model", "wav2vec2."),
    "hubert": ("hubert", "HubertModel", "hubert."),
    "wavlm": ("wavlm", "WavLMModel", "wavlm."),
    "data2vec-audio": ("data2vec", "Data2VecAudioModel", "data2vec_audio."),
}
FAMILY_TYPES = {family: model_type for model_type, (family, _, _) in MODEL_TYPES.items()}
ARCHITECTURES = {cls for _, cls, _ in MODEL_TYPES.values()} | {
    cls.replace("Model", "ForCTC") for _, cls, _ in MODEL_TYPES.values()
}

# transformers name -> mmssl name, as prefixes; {} is a layer index. First match wins, so for
# writing, the preferred transformers name of an mmssl parameter comes first.
RULES = [
    ("masked_spec_embed", "mask_embedding"),
    ("feature_extractor.conv_layers.{}.conv.", "frontend.blocks.{}.conv."),
    ("feature_extractor.conv_layers.{}.layer_norm.", "frontend.blocks.{}.norm."),
    ("feature_projection.layer_norm.", "projection.norm."),
    ("feature_projection.projection.", "projection.linear."),
    (
        "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
        "transformer.pos_conv.conv.parametrizations.weight.original0",
    ),  # fmt: skip
    (
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
        "transformer.pos_conv.conv.parametrizations.weight.original1",
    ),  # fmt: skip
    ("encoder.pos_conv_embed.conv.weight_g", "transformer.pos_conv.conv.parametrizations.weight.original0"),
    ("encoder.pos_conv_embed.conv.weight_v", "transformer.pos_conv.conv.parametrizations.weight.original1"),
    ("encoder.pos_conv_embed.conv.bias", "transformer.pos_conv.conv.bias"),
    ("encoder.pos_conv_embed.layers.{}.conv.", "transformer.pos_conv.convs.{}."),
    ("encoder.layer_norm.", "transformer.norm."),
    ("encoder.layers.0.attention.rel_attn_embed.", "transformer.position_bias.embed."),
    ("encoder.layers.{}.layer_norm.", "transformer.layers.{}.attention_norm."),
    ("encoder.layers.{}.final_layer_norm.", "transformer.layers.{}.ff_norm."),
    ("encoder.layers.{}.feed_forward.intermediate_dense.", "transformer.layers.{}.feed_forward.fc1."),
    ("encoder.layers.{}.feed_forward.output_dense.", "transformer.layers.{}.feed_forward.fc2."),
    ("encoder.layers.{}.attention.gru_rel_pos_linear.", "transformer.layers.{}.attention.gate_proj."),
    ("encoder.layers.{}.attention.gru_rel_pos_const", "transformer.layers.{}.attention.gate_scale"),
    ("encoder.layers.{}.attention.", "transformer.layers.{}.attention."),
]


def read_state(file: Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file or of a pickled state dict (restricted unpickler)."""
    if file.suffix == ".safetensors":
        try:
            return load_safetensors_bytes(file.read_bytes())
        except Exception as err:  # safetensors raises its own error types
            raise DataError(f"{file}: cannot read weights: {err}") from None
    state = load_pickle(file)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(f"{file}: not a state dict of tensors")
    return state


def read_config(folder: Path) -> dict:
    file = folder / CONFIG
    if not file.is_file():
        raise DataError(f"{folder}: no {CONFIG} (not a Hugging Face model folder)")
    try:
        config = json.loads(read_text(file))
    except json.JSONDecodeError as err:
        raise DataError(f"{file}: not JSON ({err})") from None
    if not isinstance(config, dict):
        raise DataError(f"{file}: not a JSON object")
    return config


def encoder_options(config: dict, source: str) -> tuple[str, dict]:
    """``(family, build_conv_encoder options)`` from a ``config.json``; an architecture mmssl
    cannot rebuild exactly is a ``DataError`` naming the key."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise DataError(
            f"{source}: model_type {model_type!r} is not one mmssl reads ({', '.join(MODEL_TYPES)})"
        )
    family = MODEL_TYPES[model_type][0]
    for key, wanted in (("hidden_act", "gelu"), ("feat_extract_activation", "gelu")):
        if config.get(key, wanted) != wanted:
            raise DataError(f"{source}: {key}={config[key]!r} is not supported (only {wanted!r})")
    for key in ("add_adapter", "use_weighted_layer_sum", "conv_pos_batch_norm"):
        if config.get(key):
            raise DataError(f"{source}: {key}=true is not supported")
    if not config.get("feat_proj_layer_norm", True):
        raise DataError(f"{source}: feat_proj_layer_norm=false is not supported")
    if float(config.get("layer_norm_eps", 1e-5)) != 1e-5:
        raise DataError(f"{source}: layer_norm_eps={config['layer_norm_eps']} is not supported (only 1e-5)")
    # data2vec audio has a layer-norm frontend and no such key
    norm = "layer" if family == "data2vec" else need(config, "feat_extract_norm", source, str)
    if norm not in ("group", "layer"):
        raise DataError(f"{source}: feat_extract_norm={norm!r} is not 'group' or 'layer'")
    options = dict(
        conv_channels=tuple(need(config, "conv_dim", source, list)),
        conv_kernels=tuple(need(config, "conv_kernel", source, list)),
        conv_strides=tuple(need(config, "conv_stride", source, list)),
        conv_norm=norm,
        conv_bias=bool(config.get("conv_bias", False)),
        dim=need(config, "hidden_size", source, int),
        num_layers=need(config, "num_hidden_layers", source, int),
        num_heads=need(config, "num_attention_heads", source, int),
        ffn_dim=need(config, "intermediate_size", source, int),
        pre_norm=bool(config.get("do_stable_layer_norm", False)),
        dropout=float(config.get("hidden_dropout", 0.1)),
        attention_dropout=float(config.get("attention_dropout", 0.1)),
        activation_dropout=float(config.get("activation_dropout", 0.1)),
        layer_drop=float(config.get("layerdrop", 0.0)),
        input_dropout=float(config.get("feat_proj_dropout", 0.0)),
        pos_conv_kernel=need(config, "num_conv_pos_embeddings", source, int),
        pos_conv_groups=need(config, "num_conv_pos_embedding_groups", source, int),
        pos_conv_depth=1,
        rel_pos_buckets=0,
    )
    if family == "data2vec":  # num_conv_pos_embeddings counts the stacked convolutions there
        options.update(
            pos_conv_depth=options["pos_conv_kernel"],
            pos_conv_kernel=need(config, "conv_pos_kernel_size", source, int),
            pre_norm=False,
        )
    if family == "wavlm":
        options.update(
            rel_pos_buckets=need(config, "num_buckets", source, int),
            rel_pos_max_distance=need(config, "max_bucket_distance", source, int),
        )
    return family, options


def _vocab(folder: Path) -> list[str] | None:
    file = folder / VOCAB
    if not file.is_file():
        return None
    try:
        vocab = json.loads(read_text(file))
    except json.JSONDecodeError as err:
        raise DataError(f"{file}: not JSON ({err})") from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise DataError(f"{file}: not a token -> id object")
    tokens = [""] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    return tokens


def from_hf(folder: str | Path) -> ImportedEncoder:
    """A local Hugging Face model folder -> :class:`ImportedEncoder` (weights checked against
    the architecture ``config.json`` describes: ``ImportedEncoder.build`` loads them)."""
    folder = Path(folder)
    config = read_config(folder)
    family, options = encoder_options(config, str(folder / CONFIG))
    architecture = (config.get("architectures") or [MODEL_TYPES[config["model_type"]][1]])[0]
    if architecture not in ARCHITECTURES:
        raise DataError(
            f"{folder / CONFIG}: architecture {architecture!r} is not one mmssl reads "
            f"({', '.join(sorted(ARCHITECTURES))})"
        )
    file = folder / SAFETENSORS if (folder / SAFETENSORS).is_file() else folder / PICKLE
    if not file.is_file():
        raise DataError(f"{folder}: no {SAFETENSORS} or {PICKLE}")
    state = read_state(file)
    prefix = MODEL_TYPES[config["model_type"]][2]
    base = {k.removeprefix(prefix): v for k, v in state.items() if not k.startswith("lm_head.")}
    renamed, dropped = rename_state(base, RULES, str(file))
    imported = ImportedEncoder(family, options, renamed, str(file), architecture, dropped=dropped)
    if "lm_head.weight" in state:
        tokens = _vocab(folder)
        weight, bias = state["lm_head.weight"], state.get("lm_head.bias")
        if tokens is None:
            imported.dropped.append("lm_head")
            imported.notes.append(f"the CTC head is dropped: {folder} has no {VOCAB}")
        elif bias is None or len(tokens) != weight.shape[0]:
            raise DataError(
                f"{file}: key 'lm_head.weight' has {weight.shape[0]} rows but {folder / VOCAB} "
                f"has {len(tokens)} tokens"
            )
        else:
            blank = int(config.get("pad_token_id", 0))
            delimiter = str(config.get("word_delimiter_token", "|"))
            imported.head = CTCHead(weight, bias, tokens, blank, delimiter)
    if (folder / PREPROCESSOR).is_file():
        try:
            if json.loads(read_text(folder / PREPROCESSOR)).get("do_normalize"):
                imported.options["normalize_waveform"] = True
                imported.notes.append(NORMALIZE_NOTE)
        except (json.JSONDecodeError, AttributeError):
            raise DataError(f"{folder / PREPROCESSOR}: not a JSON object") from None
    imported.build()  # checks every key and shape now, naming the file
    return imported


def hf_config(encoder: AudioEncoder, family: str) -> dict:
    """The ``config.json`` of the ``transformers`` model equal to ``encoder``."""
    if family not in FAMILY_TYPES:
        raise DataError(f"export to Hugging Face: no transformers model for encoder family {family!r}")
    frontend, transformer = encoder.frontend, encoder.transformer
    blocks = list(frontend.blocks)
    first = transformer.layers[0]
    norm = type(blocks[0].norm).__name__
    if norm not in ("MaskedGroupNorm", "ChannelLayerNorm"):
        raise DataError(
            f"export to Hugging Face: a conv frontend without normalisation ({norm}) has no equivalent"
        )
    model_type = FAMILY_TYPES[family]
    config = {
        "model_type": model_type,
        "architectures": [MODEL_TYPES[model_type][1]],
        "hidden_size": encoder.dim,
        "num_hidden_layers": len(transformer.layers),
        "num_attention_heads": first.attention.num_heads,
        "intermediate_size": first.feed_forward.fc1.out_features,
        "hidden_act": "gelu",
        "hidden_dropout": first.dropout.p,
        "attention_dropout": first.attention.dropout,
        "activation_dropout": first.feed_forward.activation_dropout.p,
        "feat_proj_dropout": encoder.projection.dropout.p,
        "layerdrop": transformer.layer_drop,
        "feat_extract_norm": "group" if norm == "MaskedGroupNorm" else "layer",
        "feat_extract_activation": "gelu",
        "conv_dim": [b.conv.out_channels for b in blocks],
        "conv_kernel": [b.conv.kernel_size[0] for b in blocks],
        "conv_stride": [b.conv.stride[0] for b in blocks],
        "conv_bias": blocks[0].conv.bias is not None,
        "num_feat_extract_layers": len(blocks),
        "do_stable_layer_norm": transformer.pre_norm,
        "layer_norm_eps": 1e-5,
        "apply_spec_augment": False,
    }
    pos = transformer.pos_conv
    if family == "data2vec":
        if transformer.pre_norm:
            raise DataError("export to Hugging Face: transformers has no pre-norm data2vec audio model")
        config.update(
            num_conv_pos_embeddings=len(pos.convs),
            conv_pos_kernel_size=pos.kernel,
            num_conv_pos_embedding_groups=pos.convs[0].groups,
        )
    else:
        config.update(num_conv_pos_embeddings=pos.kernel, num_conv_pos_embedding_groups=pos.conv.groups)
    if family == "wavlm":
        bias = transformer.position_bias
        config.update(num_buckets=bias.num_buckets, max_bucket_distance=bias.max_distance)
    return config


def to_hf(encoder: AudioEncoder, family: str) -> tuple[dict, dict[str, Tensor]]:
    """``(config.json, state dict)`` of the ``transformers`` ``*Model`` equal to ``encoder``."""
    config = hf_config(encoder, family)
    state = {}
    for key, value in encoder.state_dict().items():
        new = rename(key, RULES, reverse=True)
        if new is None:
            raise DataError(f"export to Hugging Face: no transformers parameter for {key!r}")
        state[new] = value
    # check: the names the config describes are the names written (the same rules read them back)
    if {rename(k, RULES) for k in state} != set(encoder.state_dict()):
        raise DataError("export to Hugging Face: the names do not read back")  # pragma: no cover
    return config, {k: v.detach().contiguous().clone() for k, v in state.items()}
