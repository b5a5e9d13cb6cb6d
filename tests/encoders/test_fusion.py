import pytest
import torch

from mmssl.encoders.av import av_features, av_tiny, substitute_frames
from mmssl.encoders.fusion import AVFusion
from mmssl.errors import ConfigError, DataError
from mmssl.registry import ENCODERS
from mmssl.testing import tiny_av_batch


def _streams(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 7, 5, generator=g)
    v = torch.randn(3, 6, 4, generator=g)
    return a, torch.tensor([7, 5, 3]), v, torch.tensor([6, 6, 2])


def test_modality_dropout_frequencies():
    fusion = AVFusion(5, 4, 8)
    g = torch.Generator().manual_seed(0)
    keep_a, keep_v = fusion.sample_keep(40_000, g)
    both = (keep_a & keep_v).float().mean().item()
    video_only = (~keep_a & keep_v).float().mean().item()
    audio_only = (keep_a & ~keep_v).float().mean().item()
    assert abs(both - 0.5) < 0.01 and abs(video_only - 0.25) < 0.01 and abs(audio_only - 0.25) < 0.01
    assert not (~keep_a & ~keep_v).any()


def test_fusion_formula_lengths_and_zeros():
    fusion = AVFusion(5, 4, 8).eval()
    a, al, v, vl = _streams()
    x, lengths = fusion(a, al, v, vl)
    assert x.shape == (3, 6, 8)
    assert lengths.tolist() == [6, 5, 2]
    ref = fusion.proj(fusion.norm(torch.cat([a[:, :6], v], -1)))
    torch.testing.assert_close(x[0], ref[0])
    torch.testing.assert_close(x[1, :5], ref[1, :5])
    assert x[1, 5:].abs().sum() == 0 and x[2, 2:].abs().sum() == 0


def test_missing_modality_is_zeros_inside_fusion():
    fusion = AVFusion(5, 4, 8).eval()
    a, al, v, vl = _streams()
    video_only, lens = fusion(None, None, v, vl)
    ref, _ = fusion(torch.zeros(3, 6, 5), vl, v, vl)
    torch.testing.assert_close(video_only, ref)
    assert torch.equal(lens, vl)
    audio_only, _ = fusion(a, al, None, None)
    ref, _ = fusion(a, al, torch.zeros(3, 7, 4), al)
    torch.testing.assert_close(audio_only, ref)
    with pytest.raises(DataError, match="neither"):
        fusion(None, None, None, None)


def test_training_dropout_zeroes_the_dropped_stream():
    fusion = AVFusion(5, 4, 8).train()
    a, al, v, vl = _streams()
    keep = (torch.tensor([True, False, True]), torch.tensor([True, True, False]))
    x, _ = fusion(a, al, v, vl, keep=keep)
    fusion.eval()
    no_audio, _ = fusion(None, None, v, vl)
    no_video, _ = fusion(a[:, :6], vl, None, None)
    torch.testing.assert_close(x[1, :5], no_audio[1, :5])
    torch.testing.assert_close(x[2, :2], no_video[2, :2])


def test_bad_probabilities_are_config_errors():
    with pytest.raises(ConfigError, match="modality_dropout"):
        AVFusion(2, 2, 2, modality_dropout=1.5)


def test_one_model_serves_audio_video_and_both():
    torch.manual_seed(0)
    enc = av_tiny().eval()
    batch = tiny_av_batch()
    both = enc.encode(batch)
    audio_only = enc.encode({k: batch[k] for k in ("audio", "audio_lens")})
    video_only = enc.encode({k: batch[k] for k in ("video", "video_lens")})
    for out in (both, audio_only, video_only):
        assert out.hidden.shape[0] == 3 and out.hidden.shape[2] == 64
        assert out.frame_rate == 25.0 and len(out.layers) == 2
    assert both.lengths.tolist() == [12, 9, 5]
    assert video_only.lengths.tolist() == [12, 9, 5]
    assert not torch.allclose(both.hidden[0, :5], audio_only.hidden[0, :5])
    assert not torch.allclose(both.hidden[0, :5], video_only.hidden[0, :5])


def test_av_encoder_batch_consistency():
    torch.manual_seed(0)
    enc = av_tiny().eval()
    batch = tiny_av_batch()
    out = enc.encode(batch)
    for i, n in enumerate(out.lengths.tolist()):
        alone = {
            "audio": batch["audio"][i : i + 1, : batch["audio_lens"][i]],
            "audio_lens": batch["audio_lens"][i : i + 1],
            "video": batch["video"][i : i + 1, : batch["video_lens"][i]],
            "video_lens": batch["video_lens"][i : i + 1],
        }
        ref = enc.encode(alone)
        torch.testing.assert_close(out.hidden[i, :n], ref.hidden[0, :n], atol=1e-4, rtol=1e-4)


def test_av_features_picks_a_layer_and_zeroes_padding():
    torch.manual_seed(0)
    enc = av_tiny().eval()
    batch = tiny_av_batch()
    feats, lengths = av_features(enc, batch, layer=1)
    out = enc.encode(batch)
    torch.testing.assert_close(feats[0], out.layers[0][0])
    assert feats[2, lengths[2] :].abs().sum() == 0
    fused, _ = av_features(enc, batch, layer=0)
    x, _ = enc.fused_input(batch)
    torch.testing.assert_close(fused[0], x[0])
    with pytest.raises(ConfigError, match="out of range"):
        av_features(enc, batch, layer=3)


def test_substitute_frames_gathers_within_clip():
    video = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1, 1, 1).expand(2, 4, 1, 2, 2)
    src = torch.tensor([[0, 3, 2, 3], [1, 1, 2, 0]])
    out = substitute_frames(video, src)
    assert out[:, :, 0, 0, 0].tolist() == [[0, 3, 2, 3], [5, 5, 6, 4]]


def test_presets_are_registered_with_avhubert_sizes():
    assert {"av_tiny", "av_base", "av_large"} <= set(ENCODERS.names())
    # AV-HuBERT (Shi et al., 2022) reports BASE at 103M parameters and LARGE at 325M
    for name, dim, depth, millions in (("av_base", 768, 12, 103), ("av_large", 1024, 24, 325)):
        with torch.device("meta"):  # no memory, no initialisation time
            enc = ENCODERS.build(name)
        assert enc.dim == dim and len(enc.transformer.layers) == depth
        assert abs(sum(p.numel() for p in enc.parameters()) / 1e6 - millions) < 1.0
    with pytest.raises(ConfigError, match="'width'"):
        ENCODERS.build("av_tiny", width=3)
