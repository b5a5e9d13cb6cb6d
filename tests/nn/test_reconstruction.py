import pytest
import torch

from mmssl.errors import ConfigError
from mmssl.nn.fbank import fbank
from mmssl.nn.reconstruction import (
    LogMelFrontend,
    StackedLogMelFrontend,
    SubsampledLogMelFrontend,
    future_slices,
    log_mel,
    masked_l1,
    masked_mse,
    running_normalize,
    shift_targets,
)
from mmssl.testing import tiny_audio_batch


def test_log_mel_normalises_each_utterance_over_its_valid_frames_only():
    batch = tiny_audio_batch()
    x, lengths = log_mel(batch["audio"], batch["audio_lens"])
    assert x.shape[-1] == 80
    for i in range(3):
        n = int(lengths[i])
        raw = fbank(batch["audio"][i, : batch["audio_lens"][i]])  # (T, F) one utterance alone
        assert raw.shape[0] == n
        expected = (raw - raw.mean(0)) / torch.sqrt(raw.var(0, unbiased=False) + 1e-5)
        assert torch.allclose(x[i, :n], expected, atol=1e-3)
        assert torch.all(x[i, n:] == 0)


def test_log_mel_without_normalisation_is_the_kaldi_fbank():
    batch = tiny_audio_batch()
    x, lengths = log_mel(batch["audio"], batch["audio_lens"], num_mel_bins=40, normalize="none")
    raw = fbank(batch["audio"][1, : batch["audio_lens"][1]], num_mel_bins=40)
    assert torch.allclose(x[1, : lengths[1]], raw, atol=1e-3)
    with pytest.raises(ConfigError, match="normalize"):
        log_mel(batch["audio"], batch["audio_lens"], normalize="global")


def test_running_normalisation_uses_the_frames_read_so_far():
    torch.manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(2, 9, 4)
    lengths = torch.tensor([9, 6])
    out = running_normalize(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        for t in range(n):
            seen = x[b, : t + 1].double()  # frames 0..t of this utterance
            expected = (seen[-1] - seen.mean(0)) / torch.sqrt(seen.var(0, unbiased=False) + 1e-5)
            assert torch.allclose(out[b, t].double(), expected, atol=1e-4)
        assert torch.all(out[b, n:] == 0)
    assert torch.all(out[:, 0] == 0)  # one frame read: nothing to scale by yet
    # frames <= t do not move when later frames (or the padding) change
    changed = x.clone()
    changed[:, 5:] = 100 * torch.randn(2, 4, 4)
    assert torch.equal(running_normalize(changed, lengths)[:, :5], out[:, :5])


def test_running_log_mels_of_a_clip_begin_as_those_of_its_first_half():
    batch = tiny_audio_batch((8000,))
    full, _ = log_mel(batch["audio"], batch["audio_lens"], normalize="running")
    prefix, n = log_mel(batch["audio"][:, :4000], torch.tensor([4000]), normalize="running")
    assert int(n) == 23 and torch.allclose(full[:, :23], prefix, atol=1e-5)
    whole, _ = log_mel(batch["audio"], batch["audio_lens"], normalize="utterance")
    assert not torch.allclose(whole[:, :23], prefix, atol=1e-2)  # per-utterance CMVN reads the whole clip


def test_stacked_frontend_stacks_k_frames_and_counts_ceil():
    batch = tiny_audio_batch((8000, 5600, 3360))  # 48, 33 and 19 mel frames
    front = StackedLogMelFrontend(LogMelFrontend(), stack=3)
    mels, mel_lens = front.mels(batch["audio"], batch["audio_lens"])
    x, lengths = front(batch["audio"], batch["audio_lens"])
    assert mel_lens.tolist() == [48, 33, 19] and lengths.tolist() == [16, 11, 7]
    assert torch.equal(lengths, front.frame_spec(batch["audio_lens"]))
    assert x.shape == (3, 16, 240) and front.out_dim == 240 and front.frame_rate == 100 / 3
    assert torch.equal(x[2, 6], torch.cat([mels[2, 18], torch.zeros(160)]))  # the last group: 1 frame + zeros
    assert torch.equal(x[0, 4], mels[0, 12:15].reshape(-1))
    with pytest.raises(ConfigError, match="stack"):
        StackedLogMelFrontend(LogMelFrontend(), stack=0)


def test_subsampled_frontend_keeps_every_kth_frame_and_counts_ceil():
    batch = tiny_audio_batch((8000, 5600, 3360))  # 48, 33 and 19 mel frames
    mels, _ = LogMelFrontend()(batch["audio"], batch["audio_lens"])
    front = SubsampledLogMelFrontend(LogMelFrontend(), every=2)
    x, lengths = front(batch["audio"], batch["audio_lens"])
    assert lengths.tolist() == [24, 17, 10]
    assert torch.equal(lengths, front.frame_spec(batch["audio_lens"]))
    short = torch.arange(0, 1200)  # no mel frame up to 399 samples, then one per 160
    assert torch.equal(
        front.frame_spec(short), torch.div(LogMelFrontend().frame_spec(short) + 1, 2, rounding_mode="floor")
    )
    assert front.frame_spec.window == 400  # a kept frame reads one 25 ms window
    assert x.shape == (3, 24, 80) and front.out_dim == 80 and front.frame_rate == 50.0
    assert torch.equal(x[1, :17], mels[1, 0:33:2])  # frames 0, 2, ..., 32: the last one kept
    assert torch.all(x[2, 10:] == 0)  # padding stays zero
    with pytest.raises(ConfigError, match="every"):
        SubsampledLogMelFrontend(LogMelFrontend(), every=0)


def test_frontend_frame_spec_predicts_the_frame_count():
    batch = tiny_audio_batch()
    front = LogMelFrontend()
    x, lengths = front(batch["audio"], batch["audio_lens"])
    assert torch.equal(lengths, front.frame_spec(batch["audio_lens"]))
    assert x.shape[1] == int(lengths.max()) and front.frame_rate == 100.0


def test_masked_l1_and_mse_match_hand_computation():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 5.0], [9.0, 9.0]]])  # (1, 3, 2)
    target = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])
    weight = torch.tensor([[True, True, False]])
    # |1| + |2| + |2| + |4| = 9 over 2 frames x 2 features
    assert torch.isclose(masked_l1(pred, target, weight), torch.tensor(9 / 4))
    # 1 + 4 + 4 + 16 = 25 over 4
    assert torch.isclose(masked_mse(pred, target, weight), torch.tensor(25 / 4))
    # float weights: frame 0 counts half
    w = torch.tensor([[0.5, 1.0, 0.0]])
    assert torch.isclose(masked_l1(pred, target, w), torch.tensor((0.5 * 3 + 6) / (1.5 * 2)))


def test_masked_loss_is_zero_and_finite_when_nothing_is_weighted_or_padding_is_nan():
    pred = torch.randn(2, 4, 3, requires_grad=True)
    loss = masked_l1(pred, torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(pred.grad == 0)
    bad = torch.randn(2, 4, 3)
    bad[1, 3] = float("nan")
    bad.requires_grad_()
    weight = torch.ones(2, 4, dtype=torch.bool)
    weight[1, 3] = False
    loss = masked_mse(bad, torch.zeros(2, 4, 3), weight)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(bad.grad).all()
    assert torch.isclose(loss, (bad.detach()[weight] ** 2).mean())


def test_shift_targets_pairs_frame_t_with_t_plus_n_and_drops_the_last_n():
    x = torch.arange(12.0).view(2, 6, 1)  # utterance 0: 0..5; utterance 1: 6..11, length 4
    lengths = torch.tensor([6, 4])
    target, weight = shift_targets(x, lengths, 2)
    assert target[0, :, 0].tolist() == [2, 3, 4, 5, 0, 0]
    assert target[1, :2, 0].tolist() == [8, 9]
    assert weight.tolist() == [[True] * 4 + [False] * 2, [True, True] + [False] * 4]
    same, all_valid = shift_targets(x, lengths, 0)
    assert torch.equal(same, x) and all_valid.sum() == 10


def test_future_slices_by_hand():
    x = torch.arange(1.0, 6.0).view(1, 5, 1)  # frames 1..5, the last one padding
    targets, weight = future_slices(x, torch.tensor([4]), k=3, offset=1)
    assert targets.shape == (1, 5, 3, 1)
    assert targets[0, 0, :, 0].tolist() == [2, 3, 4]
    assert targets[0, 1, :, 0].tolist() == [3, 4, 5]
    assert weight[0].tolist() == [
        [True, True, True],
        [True, True, False],  # frame index 4 is padding
        [True, False, False],
        [False, False, False],
        [False, False, False],
    ]
