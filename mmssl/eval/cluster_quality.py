"""How well discrete units match phones: phone purity, cluster purity and PNMI.

Definitions from HuBERT (Hsu et al., 2021, sec. V-B): with ``p(y, z)`` the joint distribution
of a frame's phone ``y`` and cluster ``z`` over all aligned frames,

* phone purity   = E_z[max_y p(y | z)]  (how pure a cluster is; the accuracy of labelling
  each cluster with its most common phone),
* cluster purity = E_y[max_z p(z | y)]  (how concentrated a phone is),
* PNMI           = I(y; z) / H(y)       (phone-normalised mutual information: the fraction of
  phone uncertainty that the cluster removes).

Frame phones come from alignments of ``(phone, start, end)`` in samples, as the built-in
corpus writes them (``align`` key of its manifests, a JSON file with ``sample_rate`` and
``phonemes``); the empty phone name (silence) is a phone of its own.

Shape legend: N frames, T frames of one utterance, Y phones, Z clusters.
"""

from __future__ import annotations

import bisect
import json
import os

import torch
from torch import Tensor

from mmssl.constants import SAMPLE_RATE
from mmssl.errors import DataError
from mmssl.files import read_text


def joint_counts(phones: Tensor, clusters: Tensor, num_phones: int, num_clusters: int) -> Tensor:
    """``phones (N,)``, ``clusters (N,)`` ids -> counts ``(Y, Z)``."""
    flat = phones.long() * num_clusters + clusters.long()
    return torch.bincount(flat, minlength=num_phones * num_clusters).view(num_phones, num_clusters).double()


def cluster_quality(
    phones: Tensor, clusters: Tensor, num_phones: int | None = None, num_clusters: int | None = None
) -> dict[str, float]:
    """Phone purity, cluster purity and PNMI of aligned frames ``phones (N,)``, ``clusters (N,)``."""
    if phones.shape != clusters.shape or phones.numel() == 0:
        raise DataError(
            "cluster quality needs as many phones as clusters, > 0; "
            f"got {phones.numel()} and {clusters.numel()}"
        )
    y = int(num_phones or int(phones.max()) + 1)
    z = int(num_clusters or int(clusters.max()) + 1)
    p = joint_counts(phones, clusters, y, z)
    p = p / p.sum()  # (Y, Z)
    p_y, p_z = p.sum(1), p.sum(0)
    phone_purity = p.max(0).values.sum()  # sum_z p(z) max_y p(y|z) = sum_z max_y p(y, z)
    cluster_purity = p.max(1).values.sum()
    nz = p > 0
    ratio = torch.where(nz, p / (p_y.unsqueeze(1) * p_z.unsqueeze(0)).clamp(min=1e-300), torch.ones_like(p))
    mutual = (p * ratio.log()).sum()
    entropy = -(p_y[p_y > 0] * p_y[p_y > 0].log()).sum()
    pnmi = mutual / entropy if entropy > 0 else torch.tensor(0.0, dtype=torch.float64)
    return {
        "phone_purity": float(phone_purity),
        "cluster_purity": float(cluster_purity),
        "pnmi": float(pnmi),
        "frames": int(phones.numel()),
    }


def read_alignment(path: str | os.PathLike) -> tuple[list[tuple[str, int, int]], int]:
    """An alignment JSON (``{"sample_rate": 16000, "phonemes": [[name, start, end], ...]}``)
    -> (phones with sample positions, sample rate)."""
    try:
        doc = json.loads(read_text(path))
        items = [(str(name), int(start), int(end)) for name, start, end in doc["phonemes"]]
        return items, int(doc.get("sample_rate", SAMPLE_RATE))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: cannot read phone alignment ({err})") from None


def frame_phones(
    alignment: list[tuple[str, int, int]],
    num_frames: int,
    frame_rate: float,
    sample_rate: int = SAMPLE_RATE,
    window: int = 400,
) -> list[str | None]:
    """The phone at the centre of each of ``num_frames`` frames (frame ``t`` reads samples
    ``t * sample_rate / frame_rate`` + ``window``: 400, the 25 ms window of MFCC and the conv
    frontend's receptive field; 880 for four stacked filterbank frames, ``FrameSpec.window``);
    None where no phone covers the centre."""
    hop = sample_rate / frame_rate
    spans = sorted(alignment, key=lambda item: item[1])
    starts = [s for _, s, _ in spans]
    out: list[str | None] = []
    for t in range(num_frames):
        centre = t * hop + window / 2
        i = bisect.bisect_right(starts, centre) - 1
        out.append(spans[i][0] if i >= 0 and centre < spans[i][2] else None)
    return out


class QualityAccumulator:
    """Collects (phone, cluster) pairs utterance by utterance; ``result()`` gives the scores."""

    def __init__(self, num_clusters: int) -> None:
        self.num_clusters = num_clusters
        self.phone_ids: dict[str, int] = {}
        self.phones: list[Tensor] = []
        self.clusters: list[Tensor] = []

    def add(self, phones: list[str | None], clusters: Tensor) -> None:
        """``phones`` (one name or None per frame) and ``clusters (T,)`` of one utterance."""
        n = min(len(phones), clusters.shape[0])
        keep = [t for t in range(n) if phones[t] is not None]
        ids = [self.phone_ids.setdefault(phones[t], len(self.phone_ids)) for t in keep]  # type: ignore[arg-type]
        self.phones.append(torch.tensor(ids, dtype=torch.long))
        self.clusters.append(clusters[keep].cpu().long())

    def result(self) -> dict[str, float]:
        phones, clusters = torch.cat(self.phones), torch.cat(self.clusters)
        scores = cluster_quality(phones, clusters, len(self.phone_ids), self.num_clusters)
        scores["phones"] = len(self.phone_ids)
        return scores
