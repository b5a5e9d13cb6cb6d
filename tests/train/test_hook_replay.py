"""Batch hooks replay the same randomness for the same batch position: with any number of data
workers, and in a stream resumed from a saved position (as after a killed run)."""

import copy
import itertools

import pytest
import torch

from mmssl.data.utterance_mixing import UtteranceMixer
from mmssl.encoders.base import FrameSpec
from mmssl.nn.frontend import WAV2VEC2_KERNELS, WAV2VEC2_STRIDES
from mmssl.nn.masking import SpanMasker
from mmssl.objectives.av_hubert import AVMasks
from mmssl.objectives.base import ChainHook
from mmssl.train.stream import BatchStream
from tests.train.toy import ToyBatchSampler, toy_collate

SPEC = FrameSpec(WAV2VEC2_KERNELS, WAV2VEC2_STRIDES)
RANDOM_KEYS = ("audio", "mixed", "pred_mask", "audio_mask", "video_mask")


def _dataset(n=12):
    g = torch.Generator().manual_seed(0)
    return [
        {"audio": torch.randn(int(torch.randint(1600, 6400, (1,), generator=g)), generator=g), "id": f"u{i}"}
        for i in range(n)
    ]


def _hook():
    """WavLM mixing then HuBERT masking, then AV-HuBERT's audio masks: every hook kind."""
    return ChainHook(
        (UtteranceMixer(prob=0.5), SpanMasker(SPEC, 0.8, 5, min_masks=1), AVMasks(SPEC, audio_span=5))
    )


def _stream(workers, hook=None):
    data = _dataset()
    return BatchStream(
        data, ToyBatchSampler(len(data), 3), toy_collate, hook=hook or _hook(), num_workers=workers, seed=7
    )


def _take(stream, n):
    return [{k: b[k] for k in RANDOM_KEYS} for b in itertools.islice(iter(stream), n)]


def _assert_same(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for key in RANDOM_KEYS:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_replays_the_same_masks_and_mixing(workers):
    reference = _take(_stream(0), 6)  # 4 batches per epoch: crosses into the second epoch
    assert any(b["mixed"].any() for b in reference) and all(b["pred_mask"].any() for b in reference)
    assert not torch.equal(reference[0]["pred_mask"][:, :5], reference[4]["pred_mask"][:, :5])
    first = _stream(workers)
    head = _take(first, 3)
    # a fresh process: new hook objects, the stream position loaded from the checkpoint
    again = _stream(workers, hook=copy.deepcopy(_hook()))
    again.load_state_dict(first.state_dict())
    _assert_same(head + _take(again, 3), reference)


def test_hooks_carry_no_state_between_batches():
    """The same hook object run on the same batch under the same global seed makes the same
    masks, whatever it made before."""
    hook = _hook()
    batch = toy_collate(_dataset()[:3])
    torch.manual_seed(3)
    first = hook(dict(batch))
    for _ in range(3):
        hook(dict(batch))
    torch.manual_seed(3)
    _assert_same([hook(dict(batch))], [first])
