"""CTC decoders (``mmssl.eval.decoders``) on constructed emissions: beam search with a word
n-gram model fixes errors that greedy decoding makes, and the language model, not only the
lexicon, decides between two real words."""

import jiwer
import pytest
import torch

from mmssl.data.ngram import build_arpa
from mmssl.data.units import train_units
from mmssl.errors import ConfigError, DataError
from mmssl.eval.decoders import (
    BeamDecoder,
    GreedyDecoder,
    decoding_settings,
    lexicon,
    make_decoder,
    unit_tokens,
)

TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat ran on the mat", "the cat ran"]
SEP = "\u2581"


@pytest.fixture(scope="module")
def units():
    return train_units(TEXTS, "char")


@pytest.fixture(scope="module")
def arpa(tmp_path_factory):
    return build_arpa(TEXTS, tmp_path_factory.mktemp("lm") / "lm.arpa", order=3)


def emissions(units, frames):
    """(1, T, V) log-probabilities: each frame a dict piece -> probability, the rest of the
    mass on the blank (and a floor of 1e-4 on every class)."""
    index = {t: i for i, t in enumerate(unit_tokens(units))}
    probs = torch.full((len(frames), units.size), 1e-4)
    for t, frame in enumerate(frames):
        for piece, p in frame.items():
            probs[t, index[piece]] = p
        probs[t, 0] = max(1e-4, 1 - sum(frame.values()))
    return (probs / probs.sum(-1, keepdim=True)).log().unsqueeze(0)


def spoken(words, confusions=None):
    """Frames of ``words``: each character then a blank frame, words split by the separator;
    ``confusions[(word index, char index)] = {piece: p, ...}`` replaces a character's frame."""
    confusions = confusions or {}
    frames = []
    for i, word in enumerate(words):
        if i:
            frames.append({SEP: 0.9})
        for j, ch in enumerate(word):
            frames += [confusions.get((i, j), {ch: 0.9}), {}]
    return frames


def decode(decoder, log_probs):
    return decoder(log_probs, torch.tensor([log_probs.shape[1]]))[0]


def test_a_clean_path_decodes_the_same_every_way(units, arpa):
    lp = emissions(units, spoken("the cat sat on the mat".split()))
    assert decode(GreedyDecoder(units), lp) == "the cat sat on the mat"
    assert decode(BeamDecoder(units, beam=10), lp) == "the cat sat on the mat"  # lexicon-free
    assert decode(BeamDecoder(units, arpa), lp) == "the cat sat on the mat"


def test_the_language_model_fixes_what_greedy_decoding_gets_wrong(units, arpa):
    ref = "the cat sat on the mat"
    # "sat" heard as "set" (not a word) and "cat" as "mat" (a word the model never saw after
    # "the" at a sentence start followed by "sat")
    lp = emissions(units, spoken(ref.split(), {(2, 1): {"e": 0.5, "a": 0.4}, (1, 0): {"m": 0.5, "c": 0.4}}))
    greedy = decode(GreedyDecoder(units), lp)
    assert greedy == "the mat set on the mat"
    lexicon_only = decode(BeamDecoder(units, arpa, lm_weight=0.0), lp)
    with_lm = decode(BeamDecoder(units, arpa, lm_weight=2.0), lp)
    wer = {name: jiwer.wer(ref, hyp) for name, hyp in [("greedy", greedy), ("lexicon", lexicon_only)]}
    assert wer["greedy"] == pytest.approx(2 / 6)
    assert lexicon_only == "the mat sat on the mat"  # the lexicon fixes the non-word only
    assert wer["lexicon"] == pytest.approx(1 / 6)
    assert with_lm == ref  # the n-gram model fixes the real-word error too


def test_padded_frames_are_never_decoded(units, arpa):
    one = emissions(units, spoken(["the", "cat"]))
    noise = emissions(units, spoken(["a", "dog", "sat"]))  # longer, its frames fill the padding
    padded = torch.cat([one, noise[:, one.shape[1] :]], dim=1)
    both = torch.cat([padded, noise])
    lengths = torch.tensor([one.shape[1], noise.shape[1]])
    for decoder in [GreedyDecoder(units), BeamDecoder(units, beam=10), BeamDecoder(units, arpa)]:
        assert decoder(both, lengths) == ["the cat", "a dog sat"]


def test_lexicon_spells_words_in_the_units_and_drops_unspellable_ones(units):
    spelt = lexicon(units, ["cat", "Cat", "zebra", "mat"])
    assert spelt == {"cat": ["c", "a", "t"], "mat": ["m", "a", "t"]}  # no z, b in the units
    pieces = train_units(TEXTS * 10, "unigram", vocab_size=30)
    assert "".join(lexicon(pieces, ["cat"])["cat"]) == SEP + "cat"


def test_settings_and_bad_options(units, arpa, tmp_path):
    assert decoding_settings(None) == {"kind": "greedy"}
    assert decoding_settings({"kind": "beam", "lm": str(arpa)})["lm_weight"] == 2.0
    with pytest.raises(ConfigError, match="--decoder"):
        decoding_settings({"kind": "viterbi"})
    with pytest.raises(ConfigError, match="--lm needs --decoder beam"):
        decoding_settings({"kind": "greedy", "lm": str(arpa)})
    with pytest.raises(DataError, match="not found"):
        decoding_settings({"kind": "beam", "lm": str(tmp_path / "none.arpa")})
    with pytest.raises(ConfigError, match="--beam"):
        make_decoder(units, "beam", beam=0)
    other = build_arpa(["zebra buzz"], tmp_path / "z.arpa", order=2)
    with pytest.raises(ConfigError, match="none of its words"):
        BeamDecoder(units, other)
