"""What every checkpoint importer shares: the imported encoder, key renaming by prefix rules,
checked loading (one line naming the file and the key at fault) and a CTC head with its units.

An importer (``mmssl.convert.hf``, ``mmssl.convert.fairseq``) reads a file into an
:class:`ImportedEncoder`: the encoder family (``wav2vec2``, ``hubert``, ``wavlm``, ``data2vec``),
the flat options of ``mmssl.encoders.audio.build_conv_encoder`` that rebuild its architecture,
its weights under mmssl's names, and, for a fine-tuned checkpoint, the CTC head and the token of
each output class. Whoever writes a run folder (``mmssl convert``) builds the objective from it.

Shape legend: V output classes, C model dim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmssl.data.units import BLANK, Units, train_units
from mmssl.encoders.audio import AudioEncoder, build_conv_encoder
from mmssl.encoders.av import AVEncoder, build_av_encoder
from mmssl.errors import DataError

FAMILIES = ("wav2vec2", "hubert", "wavlm", "data2vec")
AV_FAMILY = "av"  # AV-HuBERT's audio-visual encoder (``mmssl.encoders.av``)


@dataclass
class CTCHead:
    """A fine-tuned CTC output layer: ``weight (V, C)``, ``bias (V,)``, ``tokens[i]`` the
    symbol of class ``i`` and ``blank`` the index of the CTC blank. ``word_delimiter``: the
    token that stands for a space (``|`` in fairseq's letter dictionaries)."""

    weight: Tensor
    bias: Tensor
    tokens: list[str]
    blank: int
    word_delimiter: str = "|"
    pieces: Units | None = None  # word-piece tokens: the SentencePiece model they come from


@dataclass
class ImportedEncoder:
    """An encoder read from another framework's checkpoint (see the module docstring).
    ``dropped``: the source's parameters that have no place in the mmssl run (pretraining heads
    of other frameworks, a head without usable units), named for the record. For the ``av``
    family, ``options`` are ``build_av_encoder``'s; ``objective_state`` / ``objective_options``
    hold the pretraining head the mmssl objective has too (AV-HuBERT's projection and label
    embeddings)."""

    family: str
    options: dict
    state: dict[str, Tensor]
    source: str
    architecture: str
    head: CTCHead | None = None
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    objective_state: dict[str, Tensor] = field(default_factory=dict)
    objective_options: dict = field(default_factory=dict)

    def build(self) -> AudioEncoder | AVEncoder:
        """The encoder with the imported weights, in eval mode (see :func:`load_checked`)."""
        builder = build_av_encoder if self.family == AV_FAMILY else build_conv_encoder
        encoder = builder(**self.options)
        load_checked(encoder, self.state, self.source)
        return encoder.eval()


# the models that were trained on normalised waveforms (HF ``do_normalize``, fairseq
# ``task.normalize``: the large LV-60k / XLSR / HuBERT large models) expect that input: their
# converted encoder normalises each waveform (``AudioEncoder.normalize_waveform``)
NORMALIZE_NOTE = (
    "the source model expects each waveform normalised to zero mean and unit variance "
    "(do_normalize / normalize: true): the encoder does that first (normalize_waveform: true)"
)


# ---------------------------------------------------------------- renaming by prefix rules


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)"))


def rename(key: str, rules: list[tuple[str, str]], reverse: bool = False) -> str | None:
    """``key`` renamed by the first rule whose left side (right side with ``reverse``) is a
    prefix of it; ``{}`` in a rule stands for a layer index. None when no rule matches."""
    for left, right in rules:
        src, dst = (right, left) if reverse else (left, right)
        match = _pattern(src).match(key)
        if match:
            head = dst
            for index in match.groups():
                head = head.replace("{}", index, 1)
            return head + key[match.end() :]
    return None


def rename_state(
    state: dict[str, Tensor], rules: list[tuple[str, str]], source: str, ignore: tuple[str, ...] = ()
) -> tuple[dict[str, Tensor], list[str]]:
    """``(renamed state, dropped keys)``: keys starting with one of ``ignore`` are dropped (and
    listed); any other key no rule renames is a ``DataError`` naming ``source`` and the key."""
    out: dict[str, Tensor] = {}
    dropped = []
    for key, value in state.items():
        if key.startswith(ignore):
            dropped.append(key)
            continue
        new = rename(key, rules)
        if new is None:
            raise DataError(f"{source}: unexpected key {key!r} (no mmssl parameter for it)")
        out[new] = value
    return out, dropped


def load_checked(module: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    """``module.load_state_dict(state)``; a missing or unexpected key or a wrong shape is a
    ``DataError`` naming ``source`` and the first key at fault. A mask embedding may be
    missing (fine-tuned exports drop it; AV-HuBERT's masks elsewhere): the module keeps its own."""
    own = module.state_dict()
    for key, value in state.items():
        if key not in own:
            raise DataError(f"{source}: unexpected key {key!r} for the architecture its config describes")
        if tuple(value.shape) != tuple(own[key].shape):
            raise DataError(
                f"{source}: key {key!r} has shape {list(value.shape)}, the architecture its config "
                f"describes needs {list(own[key].shape)}"
            )
    missing = [k for k in own if k not in state and not k.endswith("mask_embedding")]
    if missing:
        raise DataError(f"{source}: missing key for {missing[0]!r} ({len(missing)} missing)")
    module.load_state_dict(state, strict=False)


def need(config: dict, key: str, source: str, kinds: type | tuple[type, ...] = (int, float)) -> object:
    """``config[key]``, which must be of ``kinds``; a ``DataError`` naming the file and key."""
    if key not in config:
        raise DataError(f"{source}: no {key!r} in the config")
    value = config[key]
    if not isinstance(value, kinds) or isinstance(value, bool) and kinds is not bool:
        raise DataError(f"{source}: config key {key!r} has an unusable value {value!r}")
    return value


# ---------------------------------------------------------------- CTC head -> mmssl units


def _char_of(token: str, delimiter: str) -> str | None:
    """The lower-case character a token stands for (a space for the word delimiter), or None
    for special tokens (``<s>``, ``<pad>``...) and tokens of several characters."""
    if token == delimiter:
        return " "
    if len(token) == 1 and (token.isalnum() or token == "'"):
        return token.lower()
    return None


def character_tokens(tokens: list[str], delimiter: str = "|") -> bool:
    """Whether a vocabulary is characters (plus special ``<...>`` tokens), as :func:`head_units`
    needs; unigram / BPE vocabularies (AV-HuBERT's 1000 pieces) are not."""
    return all(
        _char_of(t, delimiter) is not None or (t.startswith("<") and t.endswith(">")) or len(t) <= 1
        for t in tokens
    )


def piece_head_units(head: CTCHead, source: str) -> tuple[Units, Tensor, Tensor, list[str]]:
    """mmssl units for a word-piece CTC head (AV-HuBERT's 1000 unigram pieces, a BPE
    dictionary): the SentencePiece model the pieces come from (``head.pieces``) becomes the
    run's units, and each of its pieces takes the head row of the same token: ``(units, weight
    (V', C), bias (V',), dropped tokens)``. mmssl class 0 is the blank (the head's ``blank``
    row), class ``i + 1`` piece ``i``; ``<unk>`` takes the source's ``<unk>`` row. A piece the
    dictionary lacks (SentencePiece's control symbols) gets a row that never wins; a token the
    model lacks (``<pad>``, ``</s>``...) is dropped. ``DataError`` when no token is a piece of
    the model (another model than the dictionary's)."""
    assert head.pieces is not None and BLANK == 0
    units = head.pieces
    index = {token: i for i, token in enumerate(head.tokens) if i != head.blank}
    rows, biases, used, matched = [head.weight[head.blank]], [head.bias[head.blank]], set(), 0
    for piece_id in range(units.size - 1):
        piece = units.sp.id_to_piece(piece_id)
        found = index.get(piece)
        matched += found is not None
        if found is None and units.sp.is_unknown(piece_id):
            found = next((index[t] for t in ("<unk>", "[UNK]", "[unk]") if t in index), None)
        if found is None:
            rows.append(torch.zeros_like(head.weight[0]))
            biases.append(torch.tensor(-1e4, dtype=head.bias.dtype))
        else:
            rows.append(head.weight[found])
            biases.append(head.bias[found])
            used.add(found)
    if not matched:
        raise DataError(f"{source}: none of the CTC dictionary's tokens is a piece of {units.source}")
    dropped = [t for i, t in enumerate(head.tokens) if i != head.blank and i not in used]
    return units, torch.stack(rows), torch.stack(biases), dropped


def head_units(head: CTCHead, source: str) -> tuple[Units, Tensor, Tensor, list[str]]:
    """mmssl character units for a character CTC head and the head's rows reordered to them:
    ``(units, weight (V', C), bias (V',), dropped tokens)``. mmssl class 0 is the blank (the
    head's ``blank`` row); each SentencePiece character takes the row of its token (upper or
    lower case), the space the word delimiter's, ``<unk>`` the source's ``<unk>`` row when it has
    one (else a row that never wins). Tokens of no character (``<s>``, ``</s>``...) are
    dropped: their classes leave the softmax, which changes log-probabilities but no greedy
    decoding they did not win. A vocabulary of multi-character tokens is a ``DataError``; with
    the SentencePiece model of its pieces (``head.pieces``), :func:`piece_head_units` instead."""
    if head.pieces is not None:
        return piece_head_units(head, source)
    by_char: dict[str, int] = {}
    dropped = []
    for index, token in enumerate(head.tokens):
        char = _char_of(token, head.word_delimiter)
        if index == head.blank:
            continue
        if char is None:
            if len(token) > 1 and not (token.startswith("<") and token.endswith(">")):
                raise DataError(
                    f"{source}: the CTC vocabulary has the multi-character token {token!r}: word "
                    "pieces; give their SentencePiece model (--units) to keep the head"
                )
            if token.lower() not in ("<unk>", "[unk]"):  # <unk> takes SentencePiece's <unk>
                dropped.append(token)
        elif char not in by_char:
            by_char[char] = index
    if not by_char:
        raise DataError(f"{source}: the CTC vocabulary has no character tokens")
    word = "".join(sorted(c for c in by_char if c not in " '"))
    if "'" in by_char:  # an apostrophe survives normalisation inside a word only
        word = word[:1] + "'" + word[1:] if len(word) > 1 else "a'a"
    units = train_units([f"{word} {word}"], "char")
    unk = next((i for i, t in enumerate(head.tokens) if t.lower() in ("<unk>", "[unk]")), None)
    rows, biases = [head.weight[head.blank]], [head.bias[head.blank]]
    for piece_id in range(units.size - 1):
        piece = units.sp.id_to_piece(piece_id)
        char = " " if piece == "\u2581" else piece
        if char in by_char:
            rows.append(head.weight[by_char[char]])
            biases.append(head.bias[by_char[char]])
        elif unk is not None and piece == "<unk>":
            rows.append(head.weight[unk])
            biases.append(head.bias[unk])
        else:  # SentencePiece's own <unk> with no source row: never the best class
            rows.append(torch.zeros_like(head.weight[0]))
            biases.append(torch.tensor(-1e4, dtype=head.bias.dtype))
    assert BLANK == 0
    return units, torch.stack(rows), torch.stack(biases), dropped
