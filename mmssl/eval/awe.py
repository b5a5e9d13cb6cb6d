"""Acoustic word embeddings and the same-different evaluation, for ``mmssl awe``
(``mmssl.commands.awe``, whose docstring describes the command).

An acoustic word embedding is a fixed-size vector for a spoken word segment of any length,
pooled from the frames of a feature sequence (a run's layer, or MFCC) that the segment covers:

* ``mean``: the mean of the segment's frames, ``(C,)``;
* ``downsample``: ``n`` frames sampled uniformly across the segment and concatenated,
  ``(n * C,)`` (Levin, Henry, Jansen and Livescu, 2013, "Fixed-dimensional acoustic embeddings
  of variable-length segments", sec. 3.1 "uniform downsampling"; n = 10 as Kamper et al., 2016).

The same-different task (Carlin, Thomas, Jansen and Hermansky, 2011, "Rapid evaluation of
speech representations for spoken term discovery") asks, for every pair of word segments,
whether they are the same word; pairs are ranked by the cosine distance of their embeddings
and scored by the average precision of "same word" (:func:`average_precision`, the area under
the precision-recall curve as scikit-learn's ``average_precision_score`` computes it).

Word segments come from the word alignments the built-in corpus writes (the ``align`` key of
its manifests: a JSON file with ``sample_rate`` and ``words`` as ``[word, start, end]`` in
samples), or from a segment file (:func:`read_segment_file`).

Frames: frame ``t`` of a sequence at ``rate`` Hz spans ``[t / rate, (t + 1) / rate)`` seconds;
a segment covers the frames whose centre lies in ``[start, end)``, or, when it is shorter than
a frame and covers no centre, the frame holding its midpoint (:func:`segment_frames`).

Shape legend: T frames of one record, C channels, N word segments, D embedding size.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mmssl.constants import SAMPLE_RATE
from mmssl.errors import ConfigError, DataError
from mmssl.files import read_text, text_lines

POOLS = ("mean", "downsample")
EPSILON = 1e-9  # a centre on a segment's bound, up to rounding of the times, is on it
PAIR_BLOCK = 256  # rows of the pair matrix scored at once
DOWNSAMPLE_FRAMES = 10  # Kamper, Wang and Livescu (2016), "Deep convolutional AWEs", sec. 4: n = 10


@dataclass(frozen=True)
class Segment:
    """A spoken word: ``record`` id, ``word``, ``start`` / ``end`` in seconds."""

    record: str
    word: str
    start: float
    end: float


def read_words(path: str | os.PathLike, record: str) -> list[Segment]:
    """The word segments of an alignment JSON (``{"sample_rate": 16000, "words": [[word,
    start, end], ...]}``, samples) of record ``record``; ``DataError`` naming the file."""
    try:
        doc = json.loads(read_text(path))
        rate = int(doc.get("sample_rate", SAMPLE_RATE))
        words = [(str(w), int(s), int(e)) for w, s, e in doc["words"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: cannot read word alignment ({type(err).__name__}: {err})") from None
    return [Segment(record, w, s / rate, e / rate) for w, s, e in words]


def read_segment_file(path: str | os.PathLike) -> list[Segment]:
    """A segment file: one word segment per line, ``RECORD_ID WORD START END`` (seconds,
    whitespace-separated); blank lines and lines starting with ``#`` are skipped. ``DataError``
    naming the file and line."""
    segments = []
    try:
        lines = list(text_lines(path))
    except OSError as err:
        raise DataError(f"{path}: cannot read segment file ({err.strerror or err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        try:
            if len(parts) != 4:
                raise ValueError(f"{len(parts)} fields")
            start, end = float(parts[2]), float(parts[3])
            if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
                raise ValueError(f"start {parts[2]} and end {parts[3]}")
        except ValueError as err:
            raise DataError(
                f"{path}:{number}: expected 'RECORD_ID WORD START END' (seconds, 0 <= START < END); got {err}"
            ) from None
        segments.append(Segment(parts[0], parts[1], start, end))
    return segments


def keep_segment(segment: Segment, min_chars: int, min_duration: float) -> bool:
    """Carlin et al. (2011) and Kamper et al. (2016) keep words of at least 5 characters and
    0.5 s; the built-in corpus's words are short, so both are options."""
    return len(segment.word) >= min_chars and segment.end - segment.start >= min_duration


def segment_frames(start: float, end: float, frame_rate: float, num_frames: int) -> tuple[int, int]:
    """``[first, last)`` frames of a segment of ``start`` / ``end`` seconds in a sequence of
    ``num_frames`` frames at ``frame_rate`` Hz: the frames whose centre ``(t + 0.5) / rate`` lies
    in ``[start, end)``; a segment that covers no centre gets the frame holding its midpoint.
    Clipped to the sequence; ``(0, 0)`` when the sequence is empty."""
    if num_frames <= 0:
        return 0, 0
    first = math.ceil(start * frame_rate - 0.5 - EPSILON)
    last = math.ceil(end * frame_rate - 0.5 - EPSILON)
    first, last = max(first, 0), min(last, num_frames)
    if last <= first:
        middle = min(max(int((start + end) / 2 * frame_rate), 0), num_frames - 1)
        return middle, middle + 1
    return first, last


def mean_pool(x: Tensor) -> Tensor:
    """``x (T, C)`` -> ``(C,)``, the mean of the frames."""
    if x.shape[0] == 0:
        raise DataError("cannot pool a segment of 0 frames")
    return x.mean(0)


def downsample(x: Tensor, n: int = DOWNSAMPLE_FRAMES) -> Tensor:
    """``x (T, C)`` -> ``(n * C,)``: frames ``floor(linspace(0, T - 1, n))`` concatenated (Levin
    et al., 2013, uniform downsampling; a segment of fewer than ``n`` frames repeats frames)."""
    if x.shape[0] == 0:
        raise DataError("cannot pool a segment of 0 frames")
    index = torch.linspace(0, x.shape[0] - 1, n, dtype=torch.float64).floor().long()
    return x[index].reshape(-1)  # (n * C,)


def pool(x: Tensor, how: str, n: int = DOWNSAMPLE_FRAMES) -> Tensor:
    if how == "mean":
        return mean_pool(x)
    if how == "downsample":
        return downsample(x, n)
    raise ConfigError(f"--pool must be one of {', '.join(POOLS)}; got {how!r}")


def embed_segments(
    x: Tensor, segments: Sequence[Segment], frame_rate: float, how: str, n: int = DOWNSAMPLE_FRAMES
) -> Tensor:
    """``x (T, C)`` of one record and its ``segments`` -> embeddings ``(N, D)`` in float32."""
    rows = []
    for segment in segments:
        first, last = segment_frames(segment.start, segment.end, frame_rate, x.shape[0])
        rows.append(pool(x[first:last].float(), how, n))
    if not rows:
        return x.new_zeros(0, x.shape[1] * (n if how == "downsample" else 1), dtype=torch.float32)
    return torch.stack(rows).cpu()


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Average precision of ``labels (M,)`` (True = positive) ranked by ``scores (M,)`` (higher
    = more likely positive): ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds,
    from the highest, with ``P_k`` / ``R_k`` precision and recall of the pairs scoring at least
    the ``k``-th threshold (tied scores enter together), as scikit-learn's
    ``average_precision_score``. NaN when there is no positive."""
    scores, labels = scores.reshape(-1).double(), labels.reshape(-1).bool()
    positives = int(labels.sum())
    if positives == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    scores, hits = scores[order], labels[order].double()
    # the last item of each run of equal scores closes a threshold
    ends = torch.nonzero(torch.diff(scores, append=scores.new_tensor([-math.inf])) != 0).squeeze(1)
    tps = torch.cumsum(hits, 0)[ends]
    precision = tps / (ends + 1).double()
    recall = tps / positives
    gain = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((gain * precision).sum())


def same_different(embeddings: Tensor, words: Sequence[str]) -> dict:
    """Same-different evaluation (Carlin et al., 2011) of ``embeddings (N, D)`` of word segments
    ``words``: every pair ``i < j`` is scored by minus the cosine distance of its embeddings and
    labelled same-word or not; returns ``{"ap", "pairs", "same_pairs", "segments", "words"}``."""
    n = embeddings.shape[0]
    if n != len(words):
        raise ValueError(f"{n} embeddings for {len(words)} words")
    if n < 2:
        raise DataError(f"the same-different evaluation needs at least 2 word segments; got {n}")
    ids: dict[str, int] = {}
    word_ids = torch.tensor([ids.setdefault(w, len(ids)) for w in words])
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    similarity, same = [], []  # 1 - cosine distance and same-word, pairs i < j, a block of rows at a time
    for start in range(0, n - 1, PAIR_BLOCK):
        rows = torch.arange(start, min(start + PAIR_BLOCK, n - 1))
        upper = torch.arange(n).unsqueeze(0) > rows.unsqueeze(1)  # (b, N)
        similarity.append((unit[rows] @ unit.T)[upper])
        same.append((word_ids[rows].unsqueeze(1) == word_ids.unsqueeze(0))[upper])
    similarity, same = torch.cat(similarity), torch.cat(same)  # (N (N - 1) / 2,)
    return {
        "ap": average_precision(similarity, same),
        "pairs": int(same.numel()),
        "same_pairs": int(same.sum()),
        "segments": n,
        "words": len(ids),
    }
