"""Items -> one padded batch, with lengths for every padded modality.

Shape legend: B batch, S samples, T frames, L tokens, H/W pixels. Batch keys (DESIGN.md):

    audio (B, S) float, zeros after audio_lens (B,)
    video (B, T, 1, 88, 88) float, zeros after video_lens (B,)
    image (B, 3, H, W)                      (every item must have the same size)
    text (B, L) long, 0 after text_lens (B,)
    targets (B, T) long, -100 after target_lens (B,)   (-100: ignored by cross-entropy)
    transcript list[str], ids list[str], groups list[str]

A key is in the batch only when the items carry it (missing modalities are absent keys).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmssl.errors import DataError

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index

# item key -> (batch key of the lengths, padding value)
_PADDED = {
    "audio": ("audio_lens", 0.0),
    "video": ("video_lens", 0.0),
    "text": ("text_lens", 0),
    "targets": ("target_lens", IGNORE_INDEX),
}


def pad_sequences(seqs: Sequence[Tensor], value: float | int = 0) -> tuple[Tensor, Tensor]:
    """``B`` tensors ``(T_i, ...)`` -> ``(B, max T_i, ...)`` padded with ``value``, and ``lengths (B,)``."""
    lengths = torch.tensor([s.shape[0] for s in seqs], dtype=torch.long)
    first = seqs[0]
    out = first.new_full((len(seqs), int(lengths.max()), *first.shape[1:]), value)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out, lengths


def _present(items: list[dict], key: str) -> list | None:
    """The values of ``key`` when every item has it, None when none has; a mix is an error."""
    have = [key in item for item in items]
    if not any(have):
        return None
    if not all(have):
        missing = [item.get("id", "?") for item in items if key not in item]
        raise DataError(f"collate: {key!r} missing from items {missing} but present in others")
    return [item[key] for item in items]


def collate(items: list[dict | None]) -> dict:
    """Drop ``None`` (records the dataset skipped) and pad the rest into one batch dict.

    If every item was skipped, the batch is ``{"ids": []}``; the training loop skips it.
    """
    kept = [item for item in items if item is not None]
    batch: dict = {"ids": [str(item.get("id", "")) for item in kept]}
    if not kept:
        return batch
    for key, (lens_key, value) in _PADDED.items():
        values = _present(kept, key)
        if values is not None:
            batch[key], batch[lens_key] = pad_sequences(values, value)
    images = _present(kept, "image")
    if images is not None:
        sizes = {tuple(img.shape) for img in images}
        if len(sizes) > 1:
            raise DataError(
                f"collate: images of different sizes {sorted(sizes)} in batch {batch['ids']}; "
                "give the dataset an image_transform that resizes"
            )
        batch["image"] = torch.stack(images)
    for key, out_key in (("transcript", "transcript"), ("group", "groups")):
        if any(key in item for item in kept):
            batch[out_key] = [str(item.get(key, "")) for item in kept]
    return batch
