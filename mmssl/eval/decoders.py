"""CTC decoders: log-probabilities of CTC classes -> texts.

* :class:`GreedyDecoder`: the best path (argmax per frame, repeats collapsed, blanks dropped).
* :class:`BeamDecoder`: beam search with torchaudio's ``ctc_decoder`` (flashlight-text's
  lexicon decoder, the decoder of wav2letter and of wav2vec 2.0's paper, Baevski et al., 2020,
  sec. 5). With a word n-gram language model (an ARPA file, loaded by KenLM inside
  flashlight-text; ``mmssl lm`` builds one from transcripts, ``mmssl.data.ngram``) the search
  is constrained to the model's words, each spelt in the run's units, and scores a hypothesis
  by ``log P_ctc + lm_weight * log P_lm + word_score * words`` (flashlight's ``lmweight`` and
  ``wordscore``; torchaudio's defaults 2 and 0). Without a language model it is a
  lexicon-free beam search over the units (the units' own spelling, no word constraint).

Units (``mmssl.data.units``): CTC class 0 is the blank, SentencePiece piece ``i`` is class
``i + 1``. The word separator of flashlight (its "silence") is the piece ``▁``: a unit of its
own in character units, the word-start marker of unigram and byte-pair pieces.

Shape legend: B batch, T frames, V CTC classes (units + blank).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from mmssl.data.ngram import arpa_words
from mmssl.data.units import BLANK, Units, normalize_text
from mmssl.errors import ConfigError, DataError

DECODERS = ("greedy", "beam")
BLANK_TOKEN = "<blank>"
WORD_SEPARATOR = "\u2581"  # SentencePiece's "▁"


def greedy_decode(log_probs: Tensor, lengths: Tensor) -> list[list[int]]:
    """Best path: argmax per frame, repeats collapsed, blanks dropped (a blank between two equal
    classes keeps both). ``log_probs (B, T, V)``, ``lengths (B,)`` valid frames -> B class lists."""
    best = log_probs.argmax(-1)  # (B, T)
    prev = torch.nn.functional.pad(best[:, :-1], (1, 0), value=BLANK)
    keep = (best != prev) & (best != BLANK)
    keep &= torch.arange(best.shape[1], device=best.device) < lengths.to(best.device).unsqueeze(1)
    best, keep = best.cpu(), keep.cpu()
    return [row[k].tolist() for row, k in zip(best, keep)]


class Decoder:
    """CTC log-probabilities ``(B, T, V)`` and valid frames ``(B,)`` -> B normalised texts."""

    def __call__(self, log_probs: Tensor, lengths: Tensor) -> list[str]:
        raise NotImplementedError


class GreedyDecoder(Decoder):
    def __init__(self, units: Units) -> None:
        self.units = units

    def __call__(self, log_probs: Tensor, lengths: Tensor) -> list[str]:
        return [self.units.decode(classes) for classes in greedy_decode(log_probs, lengths)]


def unit_tokens(units: Units) -> list[str]:
    """flashlight's token list: class ``c`` -> its piece (class 0: ``<blank>``)."""
    return [BLANK_TOKEN] + [units.sp.id_to_piece(i) for i in range(units.size - 1)]


def lexicon(units: Units, words: list[str]) -> dict[str, list[str]]:
    """Each word (normalised) -> its spelling in ``units``' pieces; words with a character the
    units lack (spelt with ``<unk>``) are left out, as the acoustic model cannot emit them."""
    out: dict[str, list[str]] = {}
    for word in words:
        word = normalize_text(word)
        if not word or " " in word or word in out:
            continue
        pieces = units.sp.encode_as_pieces(word)
        if pieces and all(units.sp.piece_to_id(p) != units.sp.unk_id() for p in pieces):
            out[word] = pieces
    return out


class BeamDecoder(Decoder):
    """Beam search (torchaudio's ``ctc_decoder``) of ``beam`` hypotheses, with the word n-gram
    model of the ARPA file ``lm`` when given (``lm_weight``, ``word_score``: flashlight's
    ``lmweight``, ``wordscore``). ``ConfigError`` when the model has no word the units can
    spell or an option is out of range; ``DataError`` naming ``lm`` when it is not ARPA."""

    def __init__(
        self,
        units: Units,
        lm: str | Path | None = None,
        beam: int = 50,
        lm_weight: float = 2.0,
        word_score: float = 0.0,
        beam_threshold: float = 50.0,
    ) -> None:
        from torchaudio.models.decoder import ctc_decoder  # lazy: loads flashlight-text, only for beam search

        if beam < 1:
            raise ConfigError(f"--beam must be at least 1, got {beam}")
        self.units = units
        tokens = unit_tokens(units)
        sil = WORD_SEPARATOR if WORD_SEPARATOR in tokens else BLANK_TOKEN
        options = dict(
            tokens=tokens,
            beam_size=beam,
            beam_threshold=beam_threshold,
            lm_weight=lm_weight,
            word_score=word_score,
            blank_token=BLANK_TOKEN,
            sil_token=sil,
            unk_word="<unk>",
        )
        self.lexical = lm is not None
        if lm is None:
            self.decoder = ctc_decoder(lexicon=None, **options)
            return
        spelt = lexicon(units, arpa_words(lm))
        if not spelt:
            raise ConfigError(f"--lm {lm}: none of its words can be spelt with the run's units")
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "lexicon.txt"
            path.write_text("".join(f"{w}\t{' '.join(p)}\n" for w, p in spelt.items()), encoding="utf-8")
            self.decoder = ctc_decoder(lexicon=str(path), lm=str(lm), **options)

    def __call__(self, log_probs: Tensor, lengths: Tensor) -> list[str]:
        emissions = log_probs.detach().float().cpu().contiguous()  # (B, T, V)
        hyps = self.decoder(emissions, lengths.detach().cpu().to(torch.int32))
        texts = []
        for nbest in hyps:
            if not nbest:
                texts.append("")
            elif self.lexical:
                texts.append(normalize_text(" ".join(nbest[0].words)))
            else:
                classes = [int(c) for c in nbest[0].tokens]
                texts.append(self.units.decode(classes))
        return texts


def decoding_settings(decoding: dict | None = None) -> dict:
    """The keyword arguments of :func:`make_decoder` with their defaults filled in and the
    language model's path made absolute (so that they can be recorded and compared); the
    greedy decoder's settings are ``{"kind": "greedy"}`` alone."""
    decoding = dict(decoding or {})
    kind = decoding.pop("kind", "greedy")
    if kind not in DECODERS:
        raise ConfigError(f"--decoder: {kind!r} is not one of {', '.join(DECODERS)}")
    if kind == "greedy":
        if decoding.get("lm") is not None:
            raise ConfigError("--lm needs --decoder beam (greedy decoding uses no language model)")
        return {"kind": "greedy"}
    out = {"kind": kind, "lm": None, "beam": 50, "lm_weight": 2.0, "word_score": 0.0}
    unknown = set(decoding) - set(out)
    if unknown:
        raise ConfigError(f"unknown decoding setting {sorted(unknown)[0]!r}")
    out.update({k: v for k, v in decoding.items() if v is not None})
    if out["lm"] is not None:
        if not Path(out["lm"]).is_file():
            raise DataError(f"--lm {out['lm']}: language model not found (an ARPA file; `mmssl lm`)")
        out["lm"] = str(Path(out["lm"]).resolve())
    return out


def make_decoder(
    units: Units,
    kind: str = "greedy",
    lm: str | Path | None = None,
    beam: int = 50,
    lm_weight: float = 2.0,
    word_score: float = 0.0,
) -> Decoder:
    """The decoder ``kind`` (``greedy`` or ``beam``) over ``units``; ``--lm`` needs ``beam``."""
    if kind not in DECODERS:
        raise ConfigError(f"--decoder: {kind!r} is not one of {', '.join(DECODERS)}")
    if kind == "greedy":
        if lm is not None:
            raise ConfigError("--lm needs --decoder beam (greedy decoding uses no language model)")
        return GreedyDecoder(units)
    return BeamDecoder(units, lm, beam, lm_weight, word_score)


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """``--decoder greedy|beam [--lm ARPA] [--beam N] [--lm-weight W] [--word-score S]``, the
    decoding options of ``mmssl finetune-asr`` and ``mmssl eval-noisy``."""
    parser.add_argument("--decoder", default="greedy", help="greedy, or beam (beam search, torchaudio)")
    parser.add_argument(
        "--lm",
        type=Path,
        default=None,
        help="word n-gram language model (ARPA; `mmssl lm`) for --decoder beam",
    )
    parser.add_argument("--beam", type=int, default=50, help="beam size of --decoder beam")
    parser.add_argument(
        "--lm-weight", type=float, default=2.0, help="weight of the language model's log10 score"
    )
    parser.add_argument("--word-score", type=float, default=0.0, help="score added per word (beam search)")


def decoding_from_args(args: argparse.Namespace) -> dict:
    """The :func:`decoding_settings` of :func:`add_decoding_arguments`' options."""
    if args.decoder == "greedy":
        return decoding_settings({"kind": "greedy", "lm": args.lm})
    return decoding_settings(
        {
            "kind": args.decoder,
            "lm": args.lm,
            "beam": args.beam,
            "lm_weight": args.lm_weight,
            "word_score": args.word_score,
        }
    )
