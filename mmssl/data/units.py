"""Text units for CTC: text normalisation, SentencePiece units trained on transcripts, the blank.

Units belong to the data (as s3prl's task-owned dictionary and fairseq's
``task.target_dictionary``): ``mmssl finetune-asr`` trains them on the transcripts of the
training manifest when a run starts and keeps them in the run folder as ``units.model``; the
CTC objective turns transcripts into targets with them and decoding turns classes back into
text. They are SentencePiece pieces (the real library): characters (``char``, the default,
right for small corpora), a unigram vocabulary (``unigram``; AV-HuBERT, Shi et al. 2022,
sec. 4.1, fine-tunes on LRS3 with 1000 unigram units) or byte-pair merges (``bpe``, Sennrich et
al. 2016: on a small closed vocabulary, such as the built-in corpus's 59 words, a few hundred
merges make every word one piece, where SentencePiece's unigram stops at a few dozen pieces).
CTC class 0 is the blank; SentencePiece piece ``i`` is CTC class ``i + 1`` (ids are offset by
one, so SentencePiece keeps its own ``<unk>`` at piece 0).

One function, :func:`normalize_text`, makes both the training targets and the WER references.
"""

from __future__ import annotations

import io
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from mmssl.errors import ConfigError, DataError
from mmssl.files import write_bytes

BLANK = 0
UNITS_FILE = "units.model"
UNIT_KINDS = ("char", "unigram", "bpe")
# the built-in character set of a model built without a units file (tests, from-scratch checks)
DEFAULT_ALPHABET = "abcdefghijklmnopqrstuvwxyz'0123456789"


def normalize_text(text: str) -> str:
    """Lower-case, punctuation to spaces (apostrophes inside words are kept: "don't"),
    whitespace collapsed. Used for CTC targets and for WER references and hypotheses."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s']|_", " ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)  # quotes, not apostrophes
    return " ".join(text.split())


class Units:
    """A SentencePiece model as CTC classes: class 0 is the blank, piece ``i`` is class ``i + 1``.

    Picklable (it carries the serialised model), so data workers can tokenise."""

    def __init__(self, model_proto: bytes, source: str = "<memory>") -> None:
        self.proto, self.source = bytes(model_proto), source
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.proto)
        except Exception as err:  # sentencepiece raises RuntimeError / OSError
            raise DataError(f"{source}: not a SentencePiece model ({err})") from None

    @classmethod
    def load(cls, path: str | Path) -> Units:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: units model not found (made by `mmssl finetune-asr`)")
        return cls(path.read_bytes(), str(path))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_bytes(path, self.proto)

    @property
    def size(self) -> int:
        """``V``: SentencePiece pieces plus the blank."""
        return self.sp.get_piece_size() + 1

    def encode(self, text: str) -> list[int]:
        """Normalised ``text`` -> CTC classes (never 0)."""
        return [i + 1 for i in self.sp.encode(normalize_text(text))]

    def decode(self, classes: Sequence[int]) -> str:
        """CTC classes (blanks are dropped) -> normalised text."""
        return normalize_text(self.sp.decode([int(c) - 1 for c in classes if int(c) != BLANK]))

    def __getstate__(self) -> dict:
        return {"proto": self.proto, "source": self.source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"], state["source"])  # type: ignore[misc]


def train_units(
    texts: Iterable[str], kind: str = "char", vocab_size: int = 1000, source: str = "data.train"
) -> Units:
    """SentencePiece units over normalised ``texts``: every character (``char``) or a unigram
    vocabulary of at most ``vocab_size`` pieces (``unigram``; fewer when the texts are too small
    for that many, as SentencePiece's ``hard_vocab_limit=false``). Unigram pieces keep
    SentencePiece's default word-start marker (``add_dummy_prefix``, as AV-HuBERT's units), and
    so do ``bpe`` pieces (at most ``vocab_size``, fewer when the merges run out);
    character units keep the space as a unit of its own. ``ConfigError`` naming
    ``objective.vocab_size`` when it is below the number of characters of ``texts`` (``source``)."""
    if kind not in UNIT_KINDS:
        raise ConfigError(f"objective.units: {kind!r} is not one of {', '.join(UNIT_KINDS)}")
    lines = [t for t in (normalize_text(x) for x in texts) if t]
    if not lines:
        raise DataError("no transcript to train units on")
    if kind in ("unigram", "bpe"):
        chars = set("".join(lines).replace(" ", "")) | {"\u2581"}  # each a piece; spaces become "▁"
        if vocab_size < len(chars) + 1:  # + <unk>
            raise ConfigError(
                f"objective.vocab_size={vocab_size} is smaller than the {len(chars)} characters "
                f"(with the word-start marker) of the transcripts of {source}, plus <unk>; "
                f"set objective.vocab_size >= {len(chars) + 1}"
            )
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=proto,
        model_type=kind,
        vocab_size=100_000 if kind == "char" else vocab_size,
        use_all_vocab=kind == "char",
        hard_vocab_limit=False,
        character_coverage=1.0,
        add_dummy_prefix=kind != "char",
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    return Units(proto.getvalue(), f"<{kind} units>")


def default_units() -> Units:
    """Character units over ``DEFAULT_ALPHABET`` (a model built without a units file)."""
    return train_units([" ".join(DEFAULT_ALPHABET)], "char")
