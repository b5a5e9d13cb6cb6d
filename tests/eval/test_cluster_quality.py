import math

import pytest
import torch

from mmssl.eval.cluster_quality import QualityAccumulator, cluster_quality, frame_phones


def test_scores_match_hand_computation():
    # joint counts (phones x clusters): [[3, 1], [0, 2]] over 6 frames
    phones = torch.tensor([0, 0, 0, 0, 1, 1])
    clusters = torch.tensor([0, 0, 0, 1, 1, 1])
    s = cluster_quality(phones, clusters)
    assert math.isclose(s["phone_purity"], (3 + 2) / 6)  # cluster 0 -> phone 0 (3), cluster 1 -> phone 1 (2)
    assert math.isclose(
        s["cluster_purity"], (3 + 2) / 6
    )  # phone 0 -> cluster 0 (3), phone 1 -> cluster 1 (2)
    p = {(0, 0): 3 / 6, (0, 1): 1 / 6, (1, 1): 2 / 6}
    py, pz = {0: 4 / 6, 1: 2 / 6}, {0: 3 / 6, 1: 3 / 6}
    mi = sum(v * math.log(v / (py[y] * pz[z])) for (y, z), v in p.items())
    hy = -sum(v * math.log(v) for v in py.values())
    assert math.isclose(s["pnmi"], mi / hy, rel_tol=1e-9)


def test_pnmi_matches_scikit_learn_mutual_information():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    phones = torch.randint(8, (2000,), generator=g)
    clusters = (phones * 3 + torch.randint(3, (2000,), generator=g)) % 17
    clusters[:300] = torch.randint(17, (300,), generator=g)
    s = cluster_quality(phones, clusters)
    mi = metrics.mutual_info_score(phones.numpy(), clusters.numpy())
    py = torch.bincount(phones).double() / 2000
    assert math.isclose(s["pnmi"], mi / float(-(py * py.log()).sum()), rel_tol=1e-6)


def test_perfect_and_uninformative_clusterings():
    phones = torch.arange(5).repeat_interleave(4)
    perfect = cluster_quality(phones, phones + 2)
    assert perfect["phone_purity"] == 1.0 and perfect["cluster_purity"] == 1.0
    assert math.isclose(perfect["pnmi"], 1.0)
    one = cluster_quality(phones, torch.zeros_like(phones))
    assert math.isclose(one["pnmi"], 0.0, abs_tol=1e-12) and math.isclose(one["phone_purity"], 0.2)


def test_frame_phones_at_frame_centres_and_accumulation():
    alignment = [("", 0, 400), ("a", 400, 1000), ("b", 1000, 1600)]
    # 100 Hz frames: centre of frame t is 160 t + 200
    names = frame_phones(alignment, 10, 100.0)
    assert names == ["", "", "a", "a", "a", "b", "b", "b", "b", None]
    acc = QualityAccumulator(num_clusters=3)
    acc.add(names, torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 0]))
    s = acc.result()
    assert s["frames"] == 9 and s["phones"] == 3 and s["phone_purity"] == 1.0


def test_frame_phones_of_stacked_frames_read_at_their_window_centre():
    # 25 Hz frames of four stacked filterbank frames read 880 samples: frame t's centre is
    # 640 t + 440, not the 640 t + 200 of a single 25 ms window
    alignment = [("a", 0, 500), ("b", 500, 1000), ("c", 1000, 1700)]
    assert frame_phones(alignment, 3, 25.0, window=880) == ["a", "c", None]  # 440, 1080, 1720
    assert frame_phones(alignment, 3, 25.0) == ["a", "b", "c"]  # 200, 840, 1480
