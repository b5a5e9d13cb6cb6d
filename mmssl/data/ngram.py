"""Word n-gram language models over transcripts, written as ARPA files (the text format that
KenLM, and so torchaudio's ``ctc_decoder`` through flashlight-text, loads).

KenLM's ``lmplz`` builds modified Kneser-Ney models, but its command-line tools do not come with
any wheel on PyPI, so :func:`build_arpa` estimates the model itself: interpolated Kneser-Ney
with one absolute discount per order (Chen and Goodman, 1998, "An empirical study of smoothing
techniques for language modeling", sec. 2.7 and eq. 26)::

    P_k(w | h) = max(c_k(h w) - D_k, 0) / c_k(h .) + gamma_k(h) P_{k-1}(w | h')
    gamma_k(h) = D_k N1+(h .) / c_k(h .)

where ``h'`` is ``h`` without its first word, ``c_N`` are raw counts at the highest order ``N``
and ``c_k`` (k < N) continuation counts, the number of distinct words seen before the n-gram
(raw counts for n-grams that begin with ``<s>``, which nothing precedes). ``D_k = n1 / (n1 + 2
n2)`` (Ney et al., 1994; ``n1``, ``n2``: n-grams of order k counted once, twice), clipped to
[0.1, 0.9]. The recursion ends in the uniform distribution over the vocabulary (the words,
``</s>`` and ``<unk>``), so every conditional distribution sums to one.

In the ARPA file a listed n-gram carries ``log10 P_k(w | h)`` and, when it is a context,
``log10 gamma``; an unlisted one backs off: ``P(w | h) = gamma(h) P(w | h')``, exactly the
interpolated formula, as the listed probabilities already include the lower orders' share.
Texts are normalised with :func:`mmssl.data.units.normalize_text`, as CTC targets are.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from mmssl.data.units import normalize_text
from mmssl.errors import ConfigError, DataError
from mmssl.files import text_lines, write_text

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
LOG10_ZERO = -99.0  # ARPA's "never": the probability of <s>, which is only ever a context


def _discount(counts: Counter) -> float:
    """Ney's absolute discount ``n1 / (n1 + 2 n2)`` of one order's counts, in [0.1, 0.9]."""
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    if n1 == 0 or n2 == 0:
        return 0.5
    return min(max(n1 / (n1 + 2 * n2), 0.1), 0.9)


def kneser_ney(texts: Iterable[str], order: int = 3) -> tuple[list[dict], list[dict]]:
    """Interpolated Kneser-Ney estimates of the n-grams of ``texts`` (one sentence each).

    Returns ``(probs, backoffs)``, one dict per order 1..N: n-gram tuple -> ``P_k(w | h)``
    (``<s>`` unigram absent), and n-gram -> ``gamma`` for n-grams that are contexts of the next
    order. ``ConfigError`` for an order below 1, ``DataError`` when no text has a word."""
    if order < 1:
        raise ConfigError(f"--order must be at least 1, got {order}")
    sentences = [s.split() for s in (normalize_text(t) for t in texts) if s]
    if not sentences:
        raise DataError("no transcript with a word to build a language model from")
    raw: list[Counter] = [Counter() for _ in range(order)]  # raw[k-1]: counts of k-grams
    for words in sentences:
        padded = [BOS] + words + [EOS]
        for k in range(1, order + 1):
            for i in range(len(padded) - k + 1):
                gram = tuple(padded[i : i + k])
                if gram != (BOS,):
                    raw[k - 1][gram] += 1
    counts: list[Counter] = [Counter() for _ in range(order)]
    counts[order - 1] = raw[order - 1]
    for k in range(order - 1, 0, -1):  # continuation counts: distinct left neighbours
        for gram in raw[k]:
            counts[k - 1][gram[1:]] += 1
        for gram, c in raw[k - 1].items():
            if gram[0] == BOS:  # nothing precedes <s>: its n-grams keep raw counts
                counts[k - 1][gram] = c
    vocab = {w for (w,) in raw[0]} | {UNK}
    probs: list[dict] = []
    backoffs: list[dict] = []
    lower: dict = {(w,): 1.0 / len(vocab) for w in vocab}  # the uniform order 0
    for k in range(1, order + 1):
        d = _discount(counts[k - 1])
        total: Counter = Counter()
        types: Counter = Counter()
        for gram, c in counts[k - 1].items():
            total[gram[:-1]] += c
            types[gram[:-1]] += 1
        gamma = {h: d * types[h] / total[h] for h in total}

        def backed_off(gram: tuple, lower: dict = lower) -> float:
            # P_{k-1}(w | h') of an n-gram, through the backoffs of the lower orders
            weight = 1.0
            while gram not in lower:  # unlisted: gamma of its context times the order below
                weight *= backoffs[len(gram) - 1].get(gram[:-1], 1.0)
                gram = gram[1:]
            return weight * lower[gram]

        grams = set(counts[k - 1]) | ({(w,) for w in vocab} if k == 1 else set())
        here = {}
        for gram in grams:
            h = gram[:-1]
            seen = max(counts[k - 1].get(gram, 0) - d, 0.0) / total[h] if total[h] else 0.0
            here[gram] = seen + gamma.get(h, 1.0) * backed_off(gram[1:] if k > 1 else gram)
        probs.append(here)
        backoffs.append(gamma)
        lower = {**lower, **here} if k > 1 else here
    # a context's gamma belongs to the n-gram of the order below
    by_order = [backoffs[k] for k in range(1, order)] + [{}]
    return probs, by_order


def arpa_text(probs: list[dict], backoffs: list[dict]) -> str:
    """The ARPA file of :func:`kneser_ney`'s estimates (``<s>`` listed with probability
    ``10^-99``, as KenLM writes it)."""
    grams = [dict(p) for p in probs]
    grams[0][(BOS,)] = 0.0  # a context only
    lines = ["", "\\data\\"] + [f"ngram {k + 1}={len(g)}" for k, g in enumerate(grams)] + [""]
    for k, g in enumerate(grams):
        lines.append(f"\\{k + 1}-grams:")
        for gram in sorted(g):
            p = LOG10_ZERO if gram == (BOS,) else math.log10(g[gram])
            line = f"{p:.6f}\t{' '.join(gram)}"
            if gram in backoffs[k]:
                line += f"\t{math.log10(backoffs[k][gram]):.6f}"
            lines.append(line)
        lines.append("")
    lines.append("\\end\\")
    return "\n".join(lines) + "\n"


def build_arpa(texts: Iterable[str], path: str | Path, order: int = 3) -> Path:
    """Write the interpolated Kneser-Ney ``order``-gram model of ``texts`` to ``path`` (ARPA)."""
    return write_text(path, arpa_text(*kneser_ney(texts, order)))


def arpa_words(path: str | Path) -> list[str]:
    """The words of an ARPA file's 1-gram section, without ``<s>``, ``</s>`` and ``<unk>``.
    ``DataError`` naming the file when it is not ARPA (or not UTF-8)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: language model not found (an ARPA file; `mmssl lm` writes one)")
    words: list[str] = []
    section = None
    for line in text_lines(path):
        line = line.strip()
        if line.startswith("\\"):
            section = line
            continue
        if section == "\\1-grams:" and line:
            parts = line.split()
            if len(parts) < 2:
                raise DataError(f"{path}: 1-gram line {line!r} is not 'log10prob word [backoff]'")
            if parts[1] not in (BOS, EOS, UNK):
                words.append(parts[1])
    if section != "\\end\\" and not words:
        raise DataError(f"{path}: not an ARPA language model (no \\1-grams: section)")
    if not words:
        raise DataError(f"{path}: the language model has no words")
    return words
