"""Import torchaudio's wav2vec 2.0 / HuBERT / WavLM models into ``AudioEncoder``.

``from_torchaudio`` reads the architecture off a ``torchaudio.models.Wav2Vec2Model`` (as built
by ``wav2vec2_model``, ``wav2vec2_base``, ``hubert_large``, ``wavlm_model``, ... or loaded from a
pipeline bundle), builds the matching encoder with ``build_conv_encoder`` and copies every
weight. The outputs then agree layer by layer with ``Wav2Vec2Model.extract_features``. An
``aux`` head (fine-tuned CTC output) is not part of the encoder and is left out.

Two differences in behaviour, both on padded batches only: torchaudio's first-layer group norm
takes statistics over padding too, and its WavLM attention does not take lengths at all; the
mmssl encoder gives every utterance of a padded batch what it gets alone in both cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmssl.convert.common import NORMALIZE_NOTE, CTCHead, ImportedEncoder, load_checked
from mmssl.convert.safe_load import load_pickle
from mmssl.encoders.audio import AudioEncoder, build_conv_encoder
from mmssl.errors import ConfigError, DataError

LAYER_KEYS = {
    "layer_norm": "attention_norm",
    "final_layer_norm": "ff_norm",
    "feed_forward.intermediate_dense": "feed_forward.fc1",
    "feed_forward.output_dense": "feed_forward.fc2",
    "attention.q_proj": "attention.q_proj",
    "attention.k_proj": "attention.k_proj",
    "attention.v_proj": "attention.v_proj",
    "attention.out_proj": "attention.out_proj",
    "attention.attention.out_proj": "attention.out_proj",
    "attention.gru_rel_pos_linear": "attention.gate_proj",
    "attention.gru_rel_pos_const": "attention.gate_scale",
}


def _conv_config(extractor: nn.Module) -> dict:
    blocks = list(extractor.conv_layers)
    first_norm = blocks[0].layer_norm
    if isinstance(first_norm, nn.GroupNorm):
        norm = "group"
    elif isinstance(first_norm, nn.LayerNorm):
        norm = "layer"
    elif first_norm is None:
        norm = "none"
    else:
        raise ConfigError(f"from_torchaudio: unknown conv normalisation {type(first_norm).__name__}")
    return dict(
        conv_channels=tuple(b.conv.out_channels for b in blocks),
        conv_kernels=tuple(b.kernel_size for b in blocks),
        conv_strides=tuple(b.stride for b in blocks),
        conv_norm=norm,
        conv_bias=blocks[0].conv.bias is not None,
    )


def _encoder_config(encoder: nn.Module) -> dict:
    transformer = encoder.transformer
    first = transformer.layers[0]
    attention = first.attention
    config = dict(
        dim=encoder.feature_projection.projection.out_features,
        input_dropout=encoder.feature_projection.dropout.p,
        num_layers=len(transformer.layers),
        num_heads=attention.num_heads,
        ffn_dim=first.feed_forward.intermediate_dense.out_features,
        pre_norm=first.layer_norm_first,
        dropout=transformer.dropout.p,
        attention_dropout=float(attention.dropout),
        activation_dropout=first.feed_forward.intermediate_dropout.p,
        layer_drop=float(transformer.layer_drop),
        pos_conv_kernel=transformer.pos_conv_embed.kernel_size,
        pos_conv_groups=transformer.pos_conv_embed.conv.groups,
    )
    if hasattr(attention, "rel_attn_embed"):  # WavLMSelfAttention
        if not attention.gru_rel_pos:
            raise ConfigError("from_torchaudio: WavLM attention without the gated bias is not supported")
        config.update(rel_pos_buckets=attention.num_buckets, rel_pos_max_distance=attention.max_distance)
    return config


def _map_layer(key: str, value: Tensor, prefix: str) -> dict[str, Tensor]:
    """One torchaudio encoder-layer parameter -> mmssl parameter(s) under ``prefix``."""
    if key.startswith("attention.attention.in_proj_"):  # WavLM packs q, k, v
        kind = key.rsplit("_", 1)[-1]  # weight | bias
        q, k, v = value.chunk(3, dim=0)
        return {f"{prefix}attention.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v))}
    if key == "attention.rel_attn_embed.weight":
        return {"transformer.position_bias.embed.weight": value}
    module, _, leaf = key.rpartition(".")
    if key in LAYER_KEYS:  # a bare parameter such as gru_rel_pos_const
        return {prefix + LAYER_KEYS[key]: value}
    if module not in LAYER_KEYS:
        raise ConfigError(f"from_torchaudio: no mapping for encoder layer parameter {key!r}")
    return {f"{prefix}{LAYER_KEYS[module]}.{leaf}": value}


def torchaudio_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """torchaudio ``Wav2Vec2Model`` state dict -> ``AudioEncoder`` state dict (``mask_embedding``
    excluded)."""
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("aux."):
            continue
        if key.startswith("feature_extractor.conv_layers."):
            rest = key[len("feature_extractor.conv_layers.") :].replace(".layer_norm.", ".norm.")
            out[f"frontend.blocks.{rest}"] = value
        elif key.startswith("encoder.feature_projection."):
            rest = key[len("encoder.feature_projection.") :]
            rest = rest.replace("layer_norm.", "norm.").replace("projection.", "linear.")
            out[f"projection.{rest}"] = value
        elif key.startswith("encoder.transformer.pos_conv_embed."):
            out["transformer.pos_conv." + key[len("encoder.transformer.pos_conv_embed.") :]] = value
        elif key.startswith("encoder.transformer.layer_norm."):
            out["transformer.norm." + key.rsplit(".", 1)[-1]] = value
        elif key.startswith("encoder.transformer.layers."):
            index, rest = key[len("encoder.transformer.layers.") :].split(".", 1)
            out.update(_map_layer(rest, value, f"transformer.layers.{index}."))
        else:
            raise ConfigError(f"from_torchaudio: no mapping for parameter {key!r}")
    return out


def from_torchaudio(model: nn.Module) -> AudioEncoder:
    """Build the ``AudioEncoder`` matching a torchaudio ``Wav2Vec2Model`` and copy its weights.

    A ``HuBERTPretrainModel`` is accepted too: its ``wav2vec2`` is converted, its learned mask
    embedding copied and its ``feature_grad_mult`` kept. The encoder is returned in the mode
    (train / eval) of ``model``.
    """
    mask_embedding, grad_scale = None, 1.0
    if hasattr(model, "wav2vec2") and hasattr(model, "mask_generator"):
        mask_embedding = model.mask_generator.mask_embedding
        grad_scale = model.feature_grad_mult if model.feature_grad_mult is not None else 1.0
        model = model.wav2vec2
    if not (hasattr(model, "feature_extractor") and hasattr(model, "encoder")):
        raise ConfigError(f"from_torchaudio: expected a torchaudio Wav2Vec2Model, got {type(model).__name__}")
    config = {**_conv_config(model.feature_extractor), **_encoder_config(model.encoder)}
    encoder = build_conv_encoder(**config, feature_grad_scale=grad_scale)
    state = torchaudio_state_dict(model)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if set(missing) != {"mask_embedding"} or unexpected:
        raise ConfigError(
            f"from_torchaudio: weights do not match (missing {missing}, unexpected {unexpected})"
        )
    if mask_embedding is not None:
        with torch.no_grad():
            encoder.mask_embedding.copy_(mask_embedding)
    return encoder.train(model.training)


# ---------------------------------------------------------------- a saved torchaudio bundle

# the family of a torchaudio pipeline bundle, by the start of its name in torchaudio.pipelines
BUNDLE_FAMILIES = (
    ("HUBERT", "hubert"),
    ("WAVLM", "wavlm"),
    ("WAV2VEC2", "wav2vec2"),
    ("VOXPOPULI", "wav2vec2"),
)


def find_bundle(file_name: str) -> tuple[str, Any] | None:
    """``(name, bundle)`` of the torchaudio pipeline bundle whose weights file is named
    ``file_name`` (the file torchaudio downloads, e.g. ``hubert_fairseq_base_ls960.pth``), or None."""
    import torchaudio.pipelines as pipelines  # lazy: torchaudio's bundle table, for --kind torchaudio only

    for name in dir(pipelines):
        bundle = getattr(pipelines, name)
        path = getattr(bundle, "_path", None)
        if isinstance(path, str) and hasattr(bundle, "_params") and path.rsplit("/", 1)[-1] == file_name:
            return name, bundle
    return None


def from_torchaudio_file(file: str | Path) -> ImportedEncoder:
    """The weights file of a torchaudio pipeline bundle (its architecture is the bundle's,
    found by the file's name) -> ``ImportedEncoder``; an ASR bundle's ``aux`` output layer
    becomes a CTC head on the bundle's labels (blank ``-``, word delimiter ``|``)."""
    import torchaudio  # lazy: torchaudio's model builders, for --kind torchaudio only

    file = Path(file)
    found = find_bundle(file.name)
    if found is None:
        raise DataError(
            f"{file}: not the weights file of a torchaudio pipeline bundle (named as torchaudio saves it)"
        )
    name, bundle = found
    params = dict(bundle._params)
    build = (
        torchaudio.models.wavlm_model if "encoder_num_buckets" in params else torchaudio.models.wav2vec2_model
    )
    model = build(**params)
    state = load_pickle(file)
    if not isinstance(state, dict):
        raise DataError(f"{file}: not a state dict")
    axes = getattr(bundle, "_remove_aux_axis", None) or ()
    if (
        "aux.weight" in state
        and axes
        and state["aux.weight"].shape[0] == params.get("aux_num_out", 0) + len(axes)
    ):
        # as torchaudio's bundle does: fairseq dictionary rows never used in training go
        for key in ("aux.weight", "aux.bias"):
            state[key] = torch.stack([row for i, row in enumerate(state[key]) if i not in axes])
    load_checked(model, state, str(file))
    family = next((f for prefix, f in BUNDLE_FAMILIES if name.startswith(prefix)), "wav2vec2")
    options = {**_conv_config(model.feature_extractor), **_encoder_config(model.encoder)}
    imported = ImportedEncoder(family, options, torchaudio_state_dict(model), str(file), name)
    if getattr(bundle, "_normalize_waveform", False):
        imported.options.update(normalize_waveform=True, normalize_eps=1e-5)  # F.layer_norm's
        imported.notes.append(NORMALIZE_NOTE)
    if "aux.weight" in state and hasattr(bundle, "get_labels"):
        imported.head = CTCHead(state["aux.weight"], state["aux.bias"], list(bundle.get_labels()), blank=0)
    elif "aux.weight" in state:
        imported.dropped.append("aux")
        imported.notes.append(f"the CTC head is dropped: bundle {name} has no labels")
    imported.build()
    return imported
