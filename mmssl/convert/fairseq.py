"""fairseq wav2vec 2.0 / HuBERT / data2vec audio checkpoints -> mmssl ``AudioEncoder``, without
fairseq: the ``.pt`` dict (``model``: the state dict; ``cfg``: the config as a dict or an
omegaconf container, or legacy ``args``: an ``argparse.Namespace``) is read with the restricted
unpickler (``mmssl.convert.safe_load``) and the architecture taken from the config.

Layouts: pretrained (``Wav2Vec2Model``, ``HubertModel``, ``Data2VecAudioModel`` keys at the top)
and CTC fine-tuned (``w2v_encoder.w2v_model.*`` plus the output layer ``w2v_encoder.proj``, the
pretraining config under ``model.w2v_args``); base (post-norm, group-norm frontend) and large
(``layer_norm_first``, layer-norm frontend, conv bias). fairseq keeps the dictionary outside
the checkpoint: the CTC head is imported when its letter dictionary (``dict.ltr.txt``) is given
or lies beside the file (CTC blank = ``<s>``, class 0, as fairseq's ``Wav2VecCtc``); otherwise it
is dropped, and said so. The pretraining heads (wav2vec 2.0's quantizer and projections,
HuBERT's ``final_proj`` and label embeddings, data2vec's EMA teacher and regression head) are
dropped and listed.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Any

from mmssl.convert.common import NORMALIZE_NOTE, CTCHead, ImportedEncoder, rename_state
from mmssl.convert.safe_load import load_pickle
from mmssl.data.units import Units
from mmssl.errors import DataError
from mmssl.files import text_lines

# fairseq model name -> mmssl family
MODEL_NAMES = {
    "wav2vec2": "wav2vec2",
    "wav2vec_ctc": "wav2vec2",
    "hubert": "hubert",
    "hubert_ctc": "hubert",
    "data2vec_audio": "data2vec",
}
FINETUNED = ("wav2vec_ctc", "hubert_ctc")
FINETUNED_PREFIX = "w2v_encoder.w2v_model."
DICT_FILE = "dict.ltr.txt"
# fairseq Dictionary: these four come first, then the file's symbols
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]

RULES = [
    ("mask_emb", "mask_embedding"),
    ("feature_extractor.conv_layers.{}.2.1.", "frontend.blocks.{}.norm."),  # layer norm (large)
    ("feature_extractor.conv_layers.0.2.", "frontend.blocks.0.norm."),  # group norm (base)
    ("feature_extractor.conv_layers.{}.0.", "frontend.blocks.{}.conv."),
    ("layer_norm.", "projection.norm."),
    ("post_extract_proj.", "projection.linear."),
    ("encoder.pos_conv.0.weight_g", "transformer.pos_conv.conv.parametrizations.weight.original0"),
    ("encoder.pos_conv.0.weight_v", "transformer.pos_conv.conv.parametrizations.weight.original1"),
    ("encoder.pos_conv.0.bias", "transformer.pos_conv.conv.bias"),
    ("encoder.layer_norm.", "transformer.norm."),
    ("encoder.layers.{}.self_attn_layer_norm.", "transformer.layers.{}.attention_norm."),
    ("encoder.layers.{}.self_attn.", "transformer.layers.{}.attention."),
    ("encoder.layers.{}.fc1.", "transformer.layers.{}.feed_forward.fc1."),
    ("encoder.layers.{}.fc2.", "transformer.layers.{}.feed_forward.fc2."),
    ("encoder.layers.{}.final_layer_norm.", "transformer.layers.{}.ff_norm."),
]
# data2vec: encoder.pos_conv.{j} is a block whose first module is the convolution
DATA2VEC_RULES = [("encoder.pos_conv.{}.0.", "transformer.pos_conv.convs.{}."), *RULES]
# pretraining heads with no place in an mmssl encoder
PRETRAINING_HEADS = (
    "quantizer.",
    "project_q.",
    "final_proj.",
    "label_embs_concat",
    "target_glu.",
    "_ema",
    "ema.",
    "regression_head.",
)


def _as_dict(value: Any) -> dict:
    """A config section (dict, omegaconf container or ``Namespace``) as a plain dict."""
    if isinstance(value, argparse.Namespace):
        return vars(value)
    if hasattr(value, "items"):
        return {k: value[k] for k in value}
    return {}


def model_config(checkpoint: dict, source: str) -> dict:
    """The model section of a checkpoint's ``cfg`` (or its legacy ``args``), with ``_name``."""
    if checkpoint.get("cfg") is not None:
        cfg = _as_dict(_as_dict(checkpoint["cfg"]).get("model"))
    elif checkpoint.get("args") is not None:
        cfg = dict(_as_dict(checkpoint["args"]))
        cfg.setdefault("_name", cfg.get("arch"))
    else:
        raise DataError(f"{source}: no 'cfg' or 'args' (not a fairseq checkpoint)")
    if not cfg:
        raise DataError(f"{source}: the checkpoint's config has no model section")
    return cfg


def pretraining_config(w2v_args: Any) -> dict:
    """The pretraining model config a fine-tuned checkpoint keeps in ``w2v_args``: a whole
    config (its ``model`` section) or, in legacy checkpoints, flat ``args``."""
    if w2v_args is None:
        return {}
    if isinstance(w2v_args, argparse.Namespace):
        cfg = dict(vars(w2v_args))
        cfg.setdefault("_name", cfg.get("arch"))
        return cfg
    args = _as_dict(w2v_args)
    return _as_dict(args["model"]) if "model" in args else args


def _literal(node: ast.AST, source: str) -> Any:
    """Evaluate ``[...] + [...] * n`` over tuples of numbers, nothing else (no ``eval``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e, source) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _literal(node.left, source), _literal(node.right, source)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise DataError(f"{source}: conv_feature_layers is not a list of (dim, kernel, stride) tuples")


def conv_layers(spec: str, source: str) -> list[tuple[int, int, int]]:
    """fairseq ``conv_feature_layers`` (``"[(512, 10, 5)] + [(512, 3, 2)] * 4 + ..."``)."""
    try:
        tree = ast.parse(str(spec), mode="eval")
    except SyntaxError:
        raise DataError(f"{source}: conv_feature_layers {spec!r} cannot be parsed") from None
    layers = _literal(tree.body, source)
    if not isinstance(layers, list) or not all(isinstance(t, tuple) and len(t) == 3 for t in layers):
        raise DataError(f"{source}: conv_feature_layers {spec!r} is not a list of (dim, kernel, stride)")
    return layers


def config_value(cfg: dict, key: str, source: str, default: Any = None) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is None:
        raise DataError(f"{source}: no {key!r} in the checkpoint's model config")
    return default


def transformer_options(cfg: dict, source: str) -> dict:
    """The transformer's settings as fairseq's wav2vec 2.0 / HuBERT / AV-HuBERT configs name them,
    as ``build_conv_encoder`` / ``build_av_encoder`` options."""
    return dict(
        dim=int(config_value(cfg, "encoder_embed_dim", source)),
        num_layers=int(config_value(cfg, "encoder_layers", source)),
        num_heads=int(config_value(cfg, "encoder_attention_heads", source)),
        ffn_dim=int(config_value(cfg, "encoder_ffn_embed_dim", source)),
        pre_norm=bool(config_value(cfg, "layer_norm_first", source, False)),
        dropout=float(config_value(cfg, "dropout", source, 0.1)),
        attention_dropout=float(config_value(cfg, "attention_dropout", source, 0.1)),
        activation_dropout=float(config_value(cfg, "activation_dropout", source, 0.0)),
        layer_drop=float(config_value(cfg, "encoder_layerdrop", source, 0.0)),
        pos_conv_kernel=int(config_value(cfg, "conv_pos", source, 128)),
        pos_conv_groups=int(config_value(cfg, "conv_pos_groups", source, 16)),
    )


def encoder_options(cfg: dict, family: str, source: str) -> dict:
    """``build_conv_encoder`` options from a fairseq pretraining model config."""
    if str(cfg.get("activation_fn", "gelu")) != "gelu":
        raise DataError(f"{source}: activation_fn={cfg['activation_fn']!r} is not supported (only gelu)")
    mode = str(config_value(cfg, "extractor_mode", source, "default"))
    if mode not in ("default", "layer_norm"):
        raise DataError(f"{source}: extractor_mode={mode!r} is not 'default' or 'layer_norm'")
    layers = conv_layers(config_value(cfg, "conv_feature_layers", source), source)
    options = dict(
        conv_channels=tuple(int(d) for d, _, _ in layers),
        conv_kernels=tuple(int(k) for _, k, _ in layers),
        conv_strides=tuple(int(s) for _, _, s in layers),
        conv_norm="group" if mode == "default" else "layer",
        conv_bias=bool(config_value(cfg, "conv_bias", source, False)),
        **transformer_options(cfg, source),
        input_dropout=float(config_value(cfg, "dropout_input", source, 0.0)),
        pos_conv_depth=1,
        rel_pos_buckets=0,
    )
    depth = int(config_value(cfg, "pos_conv_depth", source, 1))
    if family == "data2vec" and depth > 1:  # fairseq data2vec: kernel max(3, conv_pos // depth)
        options.update(pos_conv_depth=depth, pos_conv_kernel=max(3, options["pos_conv_kernel"] // depth))
    return options


def read_dictionary(file: Path) -> list[str]:
    """A fairseq letter dictionary (``SYMBOL COUNT`` lines) -> tokens by class index."""
    tokens = list(SPECIALS)
    for number, line in enumerate(text_lines(file), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DataError(f"{file}:{number}: expected 'SYMBOL COUNT', got {line.strip()!r}")
        tokens.append(parts[0])
    return tokens


def from_fairseq(
    file: str | Path,
    dictionary: str | Path | None = None,
    checkpoint: dict | None = None,
    pieces: Units | None = None,
) -> ImportedEncoder:
    """A fairseq ``.pt`` checkpoint -> :class:`ImportedEncoder` (keys and shapes checked against
    the architecture its config describes). ``dictionary``: the letter dictionary of a fine-tuned
    checkpoint (default: ``dict.ltr.txt`` beside ``file`` when there is one), or its word-piece
    dictionary with ``pieces``, the SentencePiece model of those pieces."""
    file = Path(file)
    source = str(file)
    checkpoint = load_pickle(file)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise DataError(f"{source}: no 'model' state dict (not a fairseq checkpoint)")
    cfg = model_config(checkpoint, source)
    name = str(cfg.get("_name"))
    if name not in MODEL_NAMES:
        raise DataError(f"{source}: model {name!r} is not one mmssl reads ({', '.join(MODEL_NAMES)})")
    state = checkpoint["model"]
    finetuned = name in FINETUNED
    pretrain_cfg = cfg
    if finetuned:
        w2v_args = cfg.get("w2v_args")
        pretrain_cfg = pretraining_config(w2v_args)
        if not pretrain_cfg:
            raise DataError(f"{source}: a fine-tuned checkpoint without 'w2v_args' (its pretraining config)")
        state = {k.removeprefix("w2v_encoder.w2v_model."): v for k, v in state.items()}
    family = MODEL_NAMES.get(str(pretrain_cfg.get("_name")), MODEL_NAMES[name])
    options = encoder_options(pretrain_cfg, family, source)
    head_keys = ("w2v_encoder.proj.weight", "w2v_encoder.proj.bias")
    body = {k: v for k, v in state.items() if k not in head_keys}
    rules = DATA2VEC_RULES if family == "data2vec" else RULES
    renamed, dropped = rename_state(body, rules, source, ignore=PRETRAINING_HEADS)
    imported = ImportedEncoder(family, options, renamed, source, name, dropped=dropped)
    if head_keys[0] in state:
        weight, bias = state[head_keys[0]], state.get(head_keys[1])
        dict_file = Path(dictionary) if dictionary else file.parent / DICT_FILE
        if bias is None:
            raise DataError(f"{source}: missing key 'w2v_encoder.proj.bias'")
        if not dict_file.is_file():
            if dictionary:
                raise DataError(f"{dict_file}: dictionary not found")
            imported.dropped.append("w2v_encoder.proj")
            imported.notes.append(f"the CTC head is dropped: no {DICT_FILE} beside {file.name} (give --dict)")
        else:
            tokens = read_dictionary(dict_file)
            if len(tokens) != weight.shape[0]:
                raise DataError(
                    f"{source}: key 'w2v_encoder.proj.weight' has {weight.shape[0]} rows but {dict_file} "
                    f"gives {len(tokens)} classes (4 special + its symbols)"
                )
            imported.head = CTCHead(weight, bias, tokens, blank=0, pieces=pieces)
    task = _as_dict(_as_dict(checkpoint.get("cfg")).get("task")) or _as_dict(checkpoint.get("args"))
    if task.get("normalize") or pretrain_cfg.get("normalize"):
        imported.options.update(normalize_waveform=True, normalize_eps=1e-5)  # F.layer_norm's
        imported.notes.append(NORMALIZE_NOTE)
    imported.build()  # every key and shape checked now, naming the file
    return imported
