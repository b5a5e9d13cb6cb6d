import pickle

import pytest
import torch

from mmssl.encoders.base import FrameSpec
from mmssl.errors import ConfigError
from mmssl.nn.masking import SpanMasker, compute_span_mask


def test_masks_about_49_percent_of_500_frames():
    # expected coverage of 0.065 * T span starts of length 10: 1 - (1 - 0.065)^10 ~ 0.489
    g = torch.Generator().manual_seed(0)
    mask = compute_span_mask(torch.full((200,), 500), 500, 0.65, 10, 2, g, same_count=False)
    expected = 1 - (1 - 0.065) ** 10
    assert abs(mask.float().mean().item() - expected) < 0.02


def test_spans_are_contiguous_runs_of_span_length_when_sparse():
    g = torch.Generator().manual_seed(1)
    mask = compute_span_mask(torch.tensor([400]), 400, 0.05, 10, 2, g)[0].int()
    edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int), mask, torch.zeros(1, dtype=torch.int)]))
    run_lengths = (edges == -1).nonzero()[:, 0] - (edges == 1).nonzero()[:, 0]
    assert mask.sum() > 0
    assert run_lengths.min() >= 10  # spans may overlap into longer runs, never shorter


def test_same_count_per_utterance_never_in_padding_and_min_masks():
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([120, 80, 33, 25])
    mask = compute_span_mask(lengths, 130, 0.65, 10, 2, g)
    counts = mask.sum(1)
    assert (counts == counts[0]).all()
    assert counts[0] >= 10  # at least one of the min_masks=2 spans survives equalisation
    pad = torch.arange(130)[None] >= lengths[:, None]
    assert not (mask & pad).any()


def test_min_masks_is_honoured_at_zero_probability():
    g = torch.Generator().manual_seed(3)
    mask = compute_span_mask(torch.tensor([200, 200]), 200, 0.0, 10, 2, g, same_count=False)
    assert ((mask.sum(1) >= 10) & (mask.sum(1) <= 20)).all()


def test_short_and_empty_utterances_keep_context():
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([5, 1, 0, 12])
    mask = compute_span_mask(lengths, 12, 0.9, 10, 2, g, same_count=False)
    assert mask[1].sum() == 0 and mask[2].sum() == 0
    assert mask[0].sum() == 4 and mask[0, 4:].sum() == 0
    assert mask[3].sum() < 12


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="span"):
        compute_span_mask(torch.tensor([10]), 10, 0.5, 0)
    with pytest.raises(ConfigError, match="mask_prob"):
        SpanMasker(FrameSpec((400,), (320,)), -0.1, 10)


def test_span_masker_adds_mask_sized_by_frame_spec_and_pickles():
    spec = FrameSpec((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))
    masker = SpanMasker(spec, 0.65, 10, seed=7)
    batch = {"audio": torch.zeros(2, 16000), "audio_lens": torch.tensor([16000, 8000])}
    torch.manual_seed(1)
    out = masker(dict(batch))
    assert out["pred_mask"].shape == (2, 49) and out["pred_mask"].dtype == torch.bool
    assert not out["pred_mask"][1, 24:].any()
    assert not torch.equal(masker(dict(batch))["pred_mask"], out["pred_mask"])  # the global stream moved on
    # the mask is a function of the global seed alone: no state in the masker or its copies
    clone = pickle.loads(pickle.dumps(masker))
    torch.manual_seed(1)
    again = clone(dict(batch))["pred_mask"]
    torch.manual_seed(1)
    fresh = SpanMasker(spec, 0.65, 10, seed=7)(dict(batch))["pred_mask"]
    assert torch.equal(again, fresh) and torch.equal(fresh, out["pred_mask"])
    torch.manual_seed(1)
    assert not torch.equal(
        SpanMasker(spec, 0.65, 10, seed=8)(dict(batch))["pred_mask"], fresh
    )  # seed salts it


def test_default_span_masker_fraction_and_same_count():
    # the default path (SpanMasker -> compute_span_mask(same_count=True)): one 500-frame
    # utterance alone keeps its ~49% (1 - (1 - 0.065)^10); equal lengths get equal counts
    spec = FrameSpec((400,), (320,))
    samples = 499 * 320 + 400  # 500 frames
    masker = SpanMasker(spec, 0.65, 10)
    torch.manual_seed(0)
    single = {"audio": torch.zeros(1, samples), "audio_lens": torch.tensor([samples])}
    fractions = [masker(dict(single))["pred_mask"].float().mean().item() for _ in range(200)]
    assert abs(sum(fractions) / len(fractions) - (1 - (1 - 0.065) ** 10)) < 0.02
    batch = {"audio": torch.zeros(6, samples), "audio_lens": torch.full((6,), samples)}
    for _ in range(5):
        counts = masker(dict(batch))["pred_mask"].sum(1)
        assert (counts == counts[0]).all() and counts[0] > 0.3 * 500
