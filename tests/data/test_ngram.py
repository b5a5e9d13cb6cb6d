"""The interpolated Kneser-Ney n-gram model and its ARPA file (``mmssl.data.ngram``): the
estimates of a two-sentence corpus counted by hand, every conditional distribution summing to
one as KenLM (inside flashlight-text) reads the file, and the command ``mmssl lm``."""

import math

import pytest

from mmssl.cli import main
from mmssl.data.ngram import arpa_words, build_arpa, kneser_ney
from mmssl.errors import ConfigError, DataError


def test_bigram_estimates_against_a_hand_count():
    # <s> a b </s> and <s> a </s>. Bigrams (raw, the highest order): <s> a 2, a b 1, b </s> 1,
    # a </s> 1 -> n1 = 3, n2 = 1, D2 = 3 / 5 = 0.6. Unigram continuation counts: a 1 (<s>),
    # b 1 (a), </s> 2 (a, b) -> n1 = 2, n2 = 1, D1 = 0.5; total 4, 3 types, gamma = 0.375;
    # vocabulary a, b, </s>, <unk>: uniform 1/4.
    probs, backoffs = kneser_ney(["a b", "A!"], order=2)
    p1, p2 = probs
    assert p1[("a",)] == pytest.approx(0.5 / 4 + 0.375 / 4)  # 0.21875
    assert p1[("b",)] == pytest.approx(0.21875)
    assert p1[("</s>",)] == pytest.approx(1.5 / 4 + 0.375 / 4)  # 0.46875
    assert p1[("<unk>",)] == pytest.approx(0.375 / 4)
    # context <s>: one type, total 2, gamma = 0.6 * 1 / 2 = 0.3
    assert p2[("<s>", "a")] == pytest.approx(1.4 / 2 + 0.3 * 0.21875)
    # context a: two types, total 2, gamma = 0.6
    assert p2[("a", "b")] == pytest.approx(0.4 / 2 + 0.6 * 0.21875)
    assert p2[("a", "</s>")] == pytest.approx(0.4 / 2 + 0.6 * 0.46875)
    assert p2[("b", "</s>")] == pytest.approx(0.4 + 0.6 * 0.46875)
    assert backoffs[0] == pytest.approx({("<s>",): 0.3, ("a",): 0.6, ("b",): 0.6})
    assert backoffs[1] == {}


def test_the_arpa_file_lists_log10_probabilities_and_backoffs(tmp_path):
    path = build_arpa(["a b", "a"], tmp_path / "lm.arpa", order=2)
    lines = path.read_text().splitlines()
    assert lines[1:4] == ["\\data\\", "ngram 1=5", "ngram 2=4"]
    rows = {tuple(line.split("\t")[1].split()): line.split("\t") for line in lines if "\t" in line}
    assert float(rows[("<s>",)][0]) == -99.0
    assert float(rows[("<s>",)][2]) == pytest.approx(math.log10(0.3), abs=1e-6)
    assert float(rows[("a", "b")][0]) == pytest.approx(math.log10(0.33125), abs=1e-6)
    assert len(rows[("a", "b")]) == 2  # the highest order has no backoff
    assert arpa_words(path) == ["a", "b"]


TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat ran on the mat", "the cat ran"]


def test_kenlm_reads_the_file_and_every_context_sums_to_one(tmp_path):
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import create_word_dict

    path = build_arpa(TEXTS, tmp_path / "lm.arpa", order=3)
    probs, _ = kneser_ney(TEXTS, order=3)
    vocab = arpa_words(path) + ["</s>", "<unk>"]
    words = create_word_dict({w: [[w]] for w in vocab})
    lm = KenLM(str(path), words)
    # seen and unseen histories, long and short: the sum over the vocabulary is one
    for history in [[], ["the"], ["the", "cat"], ["on", "the"], ["mat", "cat"], ["dog", "ran"]]:
        state = lm.start(False)
        for w in history:
            state, _ = lm.score(state, words.get_index(w))
        total = sum(10 ** lm.score(state, words.get_index(w))[1] for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-5), history
    # KenLM's score of a listed trigram is our estimate
    state = lm.start(False)
    state, _ = lm.score(state, words.get_index("the"))
    _, score = lm.score(state, words.get_index("cat"))
    assert score == pytest.approx(math.log10(probs[2][("<s>", "the", "cat")]), abs=1e-5)


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ConfigError, match="--order"):
        kneser_ney(TEXTS, order=0)
    with pytest.raises(DataError, match="no transcript"):
        kneser_ney(["", "?!"], order=2)
    with pytest.raises(DataError, match="not found"):
        arpa_words(tmp_path / "missing.arpa")
    (tmp_path / "x.arpa").write_text("hello\n")
    with pytest.raises(DataError, match="not an ARPA"):
        arpa_words(tmp_path / "x.arpa")
    (tmp_path / "l1.arpa").write_bytes(b"\\1-grams:\n-1.0\tcaf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        arpa_words(tmp_path / "l1.arpa")


def test_the_lm_command_writes_a_model_of_the_transcripts(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(f'{{"id": "r{i}", "audio": "r{i}.wav", "transcript": "{t}"}}\n' for i, t in enumerate(TEXTS))
    )
    out = tmp_path / "new" / "lm.arpa"
    assert main(["lm", "--manifest", str(manifest), "--order", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 transcripts" in printed
    assert f"({out.read_text().splitlines()[2].split('=')[1]} 1-grams" in printed  # as the file says
    assert sorted(arpa_words(out)) == sorted({w for t in TEXTS for w in t.split()})
    assert main(["lm", "--manifest", str(manifest), "--out", str(out)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
