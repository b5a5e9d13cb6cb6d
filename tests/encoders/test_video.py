import pytest
import torch
from torch import nn

from mmssl.encoders.video import (
    LipEncoder,
    MaskedBatchNorm,
    centre_crop,
    lip_resnet18,
    lip_tiny,
    random_crop_flip,
)
from mmssl.errors import ConfigError, DataError
from mmssl.testing import tiny_video_batch


def test_masked_batchnorm_counts_only_valid_frames():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4)
    valid = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool).view(6, 1, 1, 1)
    masked = MaskedBatchNorm(3)
    plain = nn.BatchNorm2d(3)
    with torch.no_grad():
        masked.weight.uniform_(0.5, 1.5)
        masked.bias.uniform_(-1, 1)
    plain.load_state_dict(masked.state_dict())
    out = masked(x, valid)
    ref = plain(x[valid.flatten()])
    torch.testing.assert_close(out[valid.flatten()], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.running_mean, plain.running_mean)
    torch.testing.assert_close(masked.running_var, plain.running_var)


def test_masked_batchnorm_5d_clip_mask():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 2, 2)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    bn = MaskedBatchNorm(3, affine=False)
    out = bn(x, keep.view(2, 1, 5, 1, 1))
    frames = x.permute(0, 2, 1, 3, 4)[keep]  # (N, C, H, W) of valid frames
    mean = frames.mean((0, 2, 3)).view(1, 3, 1, 1, 1)
    var = frames.var((0, 2, 3), unbiased=False).view(1, 3, 1, 1, 1)
    ref = (x - mean) / torch.sqrt(var + bn.eps)
    torch.testing.assert_close(out.permute(0, 2, 1, 3, 4)[keep], ref.permute(0, 2, 1, 3, 4)[keep])


def test_output_shape_rate_and_zero_padding():
    enc = lip_tiny()
    batch = tiny_video_batch((6, 4, 2), size=88)
    out = enc(batch["video"], batch["video_lens"])
    assert out.hidden.shape == (3, 6, 64)
    assert out.frame_rate == 25.0
    assert torch.equal(out.lengths, batch["video_lens"])
    assert out.hidden[1, 4:].abs().sum() == 0 and out.hidden[2, 2:].abs().sum() == 0
    assert out.hidden[2, :2].abs().sum() > 0


def test_eval_batch_consistency_padded_equals_alone():
    torch.manual_seed(0)
    enc = lip_tiny()
    enc.train()
    batch = tiny_video_batch((6, 4, 3), size=96, seed=1)
    enc(batch["video"], batch["video_lens"])  # move running statistics off their init
    enc.eval()
    out = enc(batch["video"], batch["video_lens"])
    for i, n in enumerate(batch["video_lens"].tolist()):
        alone = enc(batch["video"][i : i + 1, :n], batch["video_lens"][i : i + 1])
        torch.testing.assert_close(out.hidden[i, :n], alone.hidden[0], atol=1e-5, rtol=1e-4)


def test_train_mode_padding_content_never_reaches_valid_frames():
    torch.manual_seed(0)
    batch = tiny_video_batch((5, 3), size=88, seed=2)
    enc = lip_tiny(flip=False)
    enc.train()
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    out_a = enc(batch["video"], batch["video_lens"]).hidden
    stats_a = enc.stem_bn.running_mean.clone()
    noisy = batch["video"].clone()
    noisy[1, 3:] = torch.rand_like(noisy[1, 3:]) * 50
    enc.load_state_dict(state)
    out_b = enc(noisy, batch["video_lens"]).hidden
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(stats_a, enc.stem_bn.running_mean)


def test_crops_and_flips():
    video = torch.arange(96 * 96, dtype=torch.float32).view(1, 1, 1, 96, 96).repeat(4, 2, 1, 1, 1)
    c = centre_crop(video, 88)
    assert c.shape[-2:] == (88, 88) and c[0, 0, 0, 0, 0] == 4 * 96 + 4
    g = torch.Generator().manual_seed(0)
    flips = 0
    for _ in range(50):
        r = random_crop_flip(video, 88, True, g)
        assert r.shape == (4, 2, 1, 88, 88)
        for i in range(4):
            row = r[i, 0, 0, 0]
            step = row[1] - row[0]
            assert abs(step) == 1  # a window of the original, maybe mirrored
            flips += int(step < 0)
            assert torch.equal(r[i, 0], r[i, 1])  # one crop for the whole clip
    assert 70 < flips < 130  # p = 0.5 of 200 clips


def test_rejects_bad_input():
    enc = lip_tiny()
    with pytest.raises(DataError, match="smaller"):
        enc(torch.zeros(1, 2, 1, 64, 64), torch.tensor([2]))
    with pytest.raises(DataError, match="grayscale"):
        enc(torch.zeros(1, 2, 3, 88, 88), torch.tensor([2]))


def test_resnet18_layout():
    enc = lip_resnet18()
    assert enc.stem_conv.weight.shape == (64, 1, 5, 7, 7)
    assert enc.stem_conv.stride == (1, 2, 2)
    assert len(enc.trunk) == 8 and enc.dim == 512
    # torchvision resnet18 without its 7x7 stem and classifier has the same trunk parameters
    import torchvision

    ref = torchvision.models.resnet18()
    n_ref = sum(p.numel() for n, p in ref.named_parameters() if n.startswith("layer"))
    n_ours = sum(p.numel() for n, p in enc.trunk.named_parameters() if "act" not in n)
    assert n_ours == n_ref


def test_zero_length_clip_in_a_batch():
    enc = lip_tiny()
    batch = tiny_video_batch((4, 1), size=88)
    lens = torch.tensor([4, 0])
    for mode in (enc.train, enc.eval):
        mode()
        out = enc(batch["video"], lens).hidden
        assert torch.isfinite(out).all() and out[1].abs().sum() == 0
    all_padding = MaskedBatchNorm(2).train()
    before = all_padding.running_mean.clone()
    out = all_padding(torch.randn(3, 2, 2, 2), torch.zeros(3, 1, 1, 1, dtype=torch.bool))
    assert torch.isfinite(out).all() and torch.equal(all_padding.running_mean, before)


def test_pool_averages_the_crop_before_the_stem():
    torch.manual_seed(0)
    pooled = LipEncoder(8, (8, 16), (1, 1), crop=88, flip=False, pool=4).eval()
    full = LipEncoder(8, (8, 16), (1, 1), crop=22, flip=False).eval()
    full.load_state_dict(pooled.state_dict())
    video = torch.randn(2, 5, 1, 88, 88)
    lens = torch.tensor([5, 3])
    small = video.view(2, 5, 1, 22, 4, 22, 4).mean((4, 6))  # 4x4 blocks averaged by hand
    torch.testing.assert_close(pooled(video, lens).hidden, full(small, lens).hidden)
    with pytest.raises(ConfigError, match="pool must be >= 1 and divide crop=88"):
        LipEncoder(8, (8, 16), (1, 1), crop=88, pool=3)
