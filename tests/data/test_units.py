import pytest

from mmssl.data.units import Units, normalize_text, train_units
from mmssl.errors import ConfigError


def test_text_normalisation():
    assert normalize_text('  Hello, World!  It\'s "fine"--ok. ') == "hello world it's fine ok"


@pytest.mark.parametrize("kind", ["char", "unigram", "bpe"])
def test_units_round_trip_and_reserve_the_blank(kind, tmp_path):
    texts = ["one large red triangle", "the big green star sits far from it", "i see one purple square"] * 5
    units = train_units(texts, kind, vocab_size=30)
    path = units.save(tmp_path / "units.model")
    again = Units.load(path)
    for text in ["The big, red star!", "one purple triangle"]:
        classes = again.encode(text)
        assert 0 not in classes and max(classes) < again.size
        assert again.decode(classes) == normalize_text(text)
        assert again.decode([0] + classes + [0]) == normalize_text(text)  # blanks are dropped
    assert again.encode("x y") == units.encode("x y")
    pieces = [again.sp.id_to_piece(i) for i in range(again.sp.get_piece_size())]
    if kind != "char":  # SentencePiece's word-start marker (add_dummy_prefix), as AV-HuBERT's units
        assert any(p.startswith("\u2581") and len(p) > 1 for p in pieces)
    else:  # characters: the space is a unit of its own, and words decode apart
        assert "\u2581" in pieces and again.decode(again.encode("a b")) == "a b"


def test_a_unigram_vocabulary_smaller_than_the_characters_is_named():
    texts = ["abc def", "ghi"]  # 9 letters + the word-start marker + <unk>: at least 11
    with pytest.raises(
        ConfigError, match=r"objective.vocab_size=8 .* 10 characters .*data.train=m.jsonl.*>= 11"
    ):
        train_units(texts, "unigram", 8, "data.train=m.jsonl")
    assert train_units(texts, "unigram", 11).size <= 12


def test_bpe_merges_whole_words_of_a_closed_vocabulary():
    words = "one large red triangle sits far from the big green star above purple square".split()
    texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    units = train_units(texts, "bpe", vocab_size=200)
    # every word is one piece once there are merges enough: a piece per word of the text
    assert len(units.encode("the big green star")) == 4
    assert len(train_units(texts, "char").encode("the big green star")) == len("the big green star")
