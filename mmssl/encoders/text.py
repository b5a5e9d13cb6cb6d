"""Text towers from open_clip, with open_clip's BPE tokenizer (its vocabulary ships inside the
package, so tokenizing works offline).

``ClipTokenizer`` is the picklable ``str -> LongTensor (L,)`` the dataset calls on a caption:
open_clip's ``SimpleTokenizer`` (start token, BPE ids, end token; truncated to the tower's
context length), cut after the end token, so ``collate`` pads it and ``text_lens`` counts the
real tokens. ``TextTower.forward(text, text_lens)`` zeroes every position at or after
``text_lens``, pads to the tower's context length (open_clip's causal mask is sized for it) and
runs open_clip's text transformer, which pools at the end token (the highest id). Under the
causal mask the tokens after it never reach the pooled vector, so a padded batch gives each
caption the embedding it has alone.

Weights and freezing as ``mmssl.encoders.image`` (``pretrained``: a local checkpoint file).
Presets (``ENCODERS``): ``clip_text_tiny`` (2 layers of width 32; its 49408 x 32 token
embedding holds most of its 1.6M parameters) and the text towers of ``ViT-B-32``,
``ViT-B-16``, ``ViT-L-14``.

Shape legend: B batch, L tokens, D embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.data.collate import pad_sequences
from mmssl.encoders.image import TINY, build_open_clip, set_frozen
from mmssl.errors import ConfigError, DataError
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.registry import ENCODERS


class ClipTokenizer:
    """``str -> LongTensor (L,)``: open_clip's BPE ids from the start token to the end token,
    at most ``context_length`` of them."""

    def __init__(self, context_length: int = 77) -> None:
        # lazy: open_clip takes seconds to import; only its towers need it
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = context_length
        self.tokenizer = SimpleTokenizer(context_length=context_length)
        self.eot = self.tokenizer.eot_token_id

    def __call__(self, text: str) -> Tensor:
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"a caption must be a non-empty string, got {text!r}")
        ids = self.tokenizer([text])[0]  # (context_length,), 0 after the end token
        end = int((ids == self.eot).nonzero()[0, 0]) + 1
        return ids[:end].long()

    def batch(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Captions -> ``text (B, L)`` padded with 0, ``text_lens (B,)`` (as ``collate`` makes them)."""
        return pad_sequences([self(t) for t in texts], 0)


class TextTower(nn.Module):
    """open_clip's text transformer. ``forward(text (B, L), text_lens (B,)) -> (B, D)``."""

    def __init__(self, text: nn.Module, dim: int, freeze: bool = False) -> None:
        super().__init__()
        self.text, self.frozen = text, freeze
        self.dim = int(dim)
        self.context_length = int(text.context_length)
        set_frozen(self.text, freeze)
        if freeze:
            self.text.eval()

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode and not self.frozen)  # a frozen tower stays in eval mode
        return self

    def tokenizer(self) -> ClipTokenizer:
        return ClipTokenizer(self.context_length)

    def forward(self, text: Tensor, text_lens: Tensor) -> Tensor:
        """``text (B, L)`` token ids, ``text_lens (B,)`` -> ``(B, D)``."""
        b, length = text.shape
        if length > self.context_length:
            raise ConfigError(
                f"text of {length} tokens, longer than the tower's context of {self.context_length}"
            )
        ids = text.masked_fill(lengths_to_padding_mask(text_lens, length), 0)
        ids = F.pad(ids, (0, self.context_length - length))  # (B, context_length)
        if self.frozen:
            with torch.no_grad():
                return self.text(ids)
        return self.text(ids)


def text_tower_from(model: nn.Module, freeze: bool = False) -> TextTower:
    """The text half of an open_clip model built by ``build_open_clip``."""
    return TextTower(model.text, int(model.embed_dim), freeze)


def build_text_tower(
    model_name: str = TINY, pretrained: str | None = None, freeze: bool = False
) -> TextTower:
    """An open_clip text tower: ``model_name`` ``"tiny"`` or an open_clip config name,
    ``pretrained`` a local checkpoint file (or None), ``freeze`` to keep it fixed."""
    return text_tower_from(build_open_clip(model_name, pretrained), freeze)


@ENCODERS.register
def clip_text_tiny(pretrained: str | None = None, freeze: bool = False) -> TextTower:
    return build_text_tower(TINY, pretrained, freeze)


@ENCODERS.register
def clip_text_vit_b_32(pretrained: str | None = None, freeze: bool = False) -> TextTower:
    return build_text_tower("ViT-B-32", pretrained, freeze)


@ENCODERS.register
def clip_text_vit_b_16(pretrained: str | None = None, freeze: bool = False) -> TextTower:
    return build_text_tower("ViT-B-16", pretrained, freeze)


@ENCODERS.register
def clip_text_vit_l_14(pretrained: str | None = None, freeze: bool = False) -> TextTower:
    return build_text_tower("ViT-L-14", pretrained, freeze)
