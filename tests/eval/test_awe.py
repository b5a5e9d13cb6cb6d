import json
import math

import pytest
import torch

from mmssl.errors import DataError
from mmssl.eval.awe import (
    Segment,
    average_precision,
    downsample,
    embed_segments,
    keep_segment,
    mean_pool,
    read_segment_file,
    read_words,
    same_different,
    segment_frames,
)

# ------------------------------------------------------------------ average precision


def test_average_precision_by_hand():
    # ranked: +, -, +, -  -> precision at the two hits 1/1 and 2/3
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    labels = torch.tensor([True, False, True, False])
    assert math.isclose(average_precision(scores, labels), (1 + 2 / 3) / 2)
    # order of the input does not matter
    perm = torch.tensor([3, 1, 0, 2])
    assert math.isclose(average_precision(scores[perm], labels[perm]), (1 + 2 / 3) / 2)
    # a tie between a hit and a miss at the top enters as one threshold: precision 1/2 there
    tied = torch.tensor([0.5, 0.5, 0.1])
    assert math.isclose(average_precision(tied, torch.tensor([True, False, False])), 0.5)
    assert math.isnan(average_precision(scores, torch.zeros(4, dtype=torch.bool)))


def test_average_precision_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        m = int(torch.randint(2, 300, (1,), generator=g))
        labels = torch.rand(m, generator=g) < 0.3
        labels[0] = True
        scores = torch.randn(m, generator=g) + labels.double() * trial / 10
        if trial % 2:  # many ties
            scores = (scores * 2).round() / 2
        expected = metrics.average_precision_score(labels.numpy(), scores.numpy())
        assert math.isclose(average_precision(scores, labels), expected, rel_tol=1e-9, abs_tol=1e-12)


# ------------------------------------------------------------------ frames and pooling


def test_word_times_become_frames_at_the_layers_rate():
    # 50 Hz (speech, conv frontend): frame t spans [0.02 t, 0.02 (t + 1)), centre 0.02 t + 0.01;
    # 0.10..0.30 s covers the centres 0.11 .. 0.29: frames 5..14
    assert segment_frames(0.10, 0.30, 50.0, 100) == (5, 15)
    # 25 Hz (audio-visual): centres 0.02, 0.06, ...; 0.10..0.30 covers 0.10 .. 0.26: frames 2..6
    assert segment_frames(0.10, 0.30, 25.0, 100) == (2, 7)
    # a centre on the start is in, on the end is out: 50 Hz centres 0.11 and 0.13
    assert segment_frames(0.11, 0.13, 50.0, 100) == (5, 6)
    # shorter than a frame, covering no centre: the frame holding its midpoint
    assert segment_frames(0.101, 0.105, 25.0, 100) == (2, 3)
    # clipped to the sequence
    assert segment_frames(1.9, 3.0, 50.0, 100) == (95, 100)
    assert segment_frames(5.0, 5.5, 50.0, 100) == (99, 100)
    assert segment_frames(0.1, 0.3, 50.0, 0) == (0, 0)


def test_mean_and_downsample_pooling_by_hand():
    x = torch.arange(14.0).reshape(7, 2)  # frame t = [2t, 2t + 1]
    torch.testing.assert_close(mean_pool(x), torch.tensor([6.0, 7.0]))
    # linspace(0, 6, 3) = 0, 3, 6
    torch.testing.assert_close(downsample(x, 3), torch.tensor([0.0, 1, 6, 7, 12, 13]))
    # linspace(0, 6, 4) = 0, 2, 4, 6
    torch.testing.assert_close(downsample(x, 4), x[[0, 2, 4, 6]].reshape(-1))
    # fewer frames than n: repeats; floor(linspace(0, 1, 3)) = 0, 0, 1
    torch.testing.assert_close(downsample(x[:2], 3), torch.tensor([0.0, 1, 0, 1, 2, 3]))
    with pytest.raises(DataError):
        mean_pool(x[:0])


def test_embeddings_pool_the_frames_of_each_segment():
    x = torch.randn(50, 3)  # 1 s at 50 Hz
    segments = [Segment("r", "purple", 0.10, 0.30), Segment("r", "heart", 0.5, 0.52)]
    mean = embed_segments(x, segments, 50.0, "mean")
    torch.testing.assert_close(mean, torch.stack([x[5:15].mean(0), x[25:26].mean(0)]))
    down = embed_segments(x, segments, 50.0, "downsample", 2)
    torch.testing.assert_close(down[0], torch.cat([x[5], x[14]]))
    torch.testing.assert_close(down[1], torch.cat([x[25], x[25]]))
    assert embed_segments(x, [], 50.0, "downsample", 4).shape == (0, 12)


# ------------------------------------------------------------------ same-different


def test_same_different_scores_pairs_by_cosine():
    # "a" segments point along x; "b" segments along y, one of them close to x
    emb = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.9, 0.5]])
    words = ["a", "a", "b", "b"]
    r = same_different(emb, words)
    assert r["pairs"] == 6 and r["same_pairs"] == 2 and r["segments"] == 4 and r["words"] == 2
    # cosine similarities: (0,1) .999 same, (0,3) .874, (1,3) .897, (2,3) .486 same, (1,2) .05, (0,2) 0
    # ranking: (0,1)+, (1,3)-, (0,3)-, (2,3)+ -> AP = (1 + 2/4) / 2
    assert math.isclose(r["ap"], 0.75)
    # scaling an embedding changes nothing (cosine)
    assert math.isclose(same_different(emb * torch.tensor([[3.0], [1], [7], [1]]), words)["ap"], 0.75)
    with pytest.raises(DataError):
        same_different(emb[:1], words[:1])


# ------------------------------------------------------------------ segments


def test_word_alignments_and_segment_files(tmp_path):
    align = tmp_path / "a.json"
    align.write_text(json.dumps({"sample_rate": 16000, "phonemes": [], "words": [["red", 1600, 8000]]}))
    assert read_words(align, "r1") == [Segment("r1", "red", 0.1, 0.5)]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sample_rate": 16000, "phonemes": []}))
    with pytest.raises(DataError, match="bad.json"):
        read_words(bad, "r1")

    seg = tmp_path / "segments.txt"
    seg.write_text("# record word start end\nr1 purple 0.10 0.42\n\nr2 heart 1 1.5\n")
    assert read_segment_file(seg) == [Segment("r1", "purple", 0.1, 0.42), Segment("r2", "heart", 1.0, 1.5)]
    seg.write_text("r1 purple 0.10 0.42\nr2 heart 1.5 1.0\n")
    with pytest.raises(DataError, match=r"segments.txt:2"):
        read_segment_file(seg)
    seg.write_text("r1 purple 0.10\n")
    with pytest.raises(DataError, match=r"segments.txt:1"):
        read_segment_file(seg)


def test_short_words_are_left_out():
    assert keep_segment(Segment("r", "purple", 0.0, 0.3), 5, 0.0)
    assert not keep_segment(Segment("r", "red", 0.0, 0.3), 5, 0.0)
    assert not keep_segment(Segment("r", "purple", 0.0, 0.3), 5, 0.5)


def test_same_different_over_many_segments_scores_every_pair_once():
    # more segments than a block of rows: every pair i < j, scored against a direct computation
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(300, 4, generator=g)
    words = [str(int(w)) for w in torch.randint(5, (300,), generator=g)]
    r = same_different(emb, words)
    i, j = torch.triu_indices(300, 300, offset=1)
    cos = torch.nn.functional.cosine_similarity(emb[i].double(), emb[j].double())
    same = torch.tensor([words[a] == words[b] for a, b in zip(i.tolist(), j.tolist())])
    assert r["pairs"] == 300 * 299 // 2 and r["same_pairs"] == int(same.sum())
    assert math.isclose(r["ap"], average_precision(cos, same), rel_tol=1e-9)
