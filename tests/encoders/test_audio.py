import pytest
import torch

import mmssl.encoders  # noqa: F401  (registers the presets)
from mmssl.encoders.audio import AudioEncoder
from mmssl.encoders.base import EncoderOutput, Features, SpeechEncoder
from mmssl.errors import ConfigError, DataError
from mmssl.nn.transformer import TransformerEncoder
from mmssl.registry import ENCODERS
from mmssl.testing import tiny_audio_batch

TINY = [n for n in ENCODERS.names() if n.endswith("_tiny")]
SPEECH_TINY = ["wav2vec2_tiny", "hubert_tiny", "wavlm_tiny", "data2vec_tiny", "fbank_tiny"]
FULL_SIZE = [n for n in ENCODERS.names() if n.endswith(("_base", "_large"))]


def _speech(name: str, **overrides) -> SpeechEncoder:
    torch.manual_seed(0)
    enc = ENCODERS.build(name, **overrides)
    if not isinstance(enc, SpeechEncoder):
        pytest.skip(f"{name} is not a speech encoder")
    return enc


def test_speech_presets_are_registered():
    for name in SPEECH_TINY:
        assert name in ENCODERS
    for family in ("wav2vec2", "hubert", "wavlm", "data2vec", "fbank"):
        assert f"{family}_base" in ENCODERS and f"{family}_large" in ENCODERS


def _without_layer_drop(enc: SpeechEncoder) -> SpeechEncoder:
    for module in enc.modules():
        if isinstance(module, TransformerEncoder):
            module.layer_drop = 0.0
    return enc


@pytest.mark.parametrize("name", TINY)
def test_forward_backward_on_a_padded_batch(name):
    enc = _without_layer_drop(_speech(name)).train()
    batch = tiny_audio_batch()
    feats = enc.extract(batch["audio"], batch["audio_lens"])
    assert isinstance(feats, Features)
    lengths = enc.frame_lengths(batch["audio_lens"])
    assert torch.equal(feats.lengths, lengths)
    assert feats.x.shape == (3, int(lengths.max()), enc.dim)
    assert feats.raw.shape == (3, int(lengths.max()), enc.feature_dim)
    out = enc.contextualize(feats.x, feats.lengths)
    assert isinstance(out, EncoderOutput) and out.frame_rate == enc.frame_rate
    assert len(out.layers) == 2 and all(layer.shape == out.hidden.shape for layer in out.layers)
    keep = torch.arange(out.hidden.shape[1]) < out.lengths[:, None]
    (out.hidden[keep].pow(2).mean() + feats.raw.mean()).backward()
    unused = {"mask_embedding"}
    for pname, p in enc.named_parameters():
        if pname not in unused:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", TINY)
def test_padded_batch_equals_each_utterance_alone(name):
    enc = _speech(name).eval()
    batch = tiny_audio_batch(lengths=(8000, 5121, 3200, 1000))
    with torch.no_grad():
        out = enc(batch["audio"], batch["audio_lens"])
        for i, n in enumerate(batch["audio_lens"].tolist()):
            alone = enc(batch["audio"][i : i + 1, :n], batch["audio_lens"][i : i + 1])
            t = int(alone.lengths[0])
            assert int(out.lengths[i]) == t == alone.hidden.shape[1]
            for a, b in zip(out.layers + [out.hidden], alone.layers + [alone.hidden]):
                assert torch.allclose(a[i, :t], b[0], atol=1e-5), (name, i)


def test_frame_rates_and_frame_spec():
    conv, fb = _speech("hubert_tiny"), _speech("fbank_tiny")
    assert conv.frame_rate == 50.0 and fb.frame_rate == 25.0
    samples = torch.tensor([0, 399, 400, 719, 720, 16000, 16001])
    assert conv.frame_lengths(samples).tolist() == [0, 0, 1, 1, 2, 49, 49]
    # 100 Hz Kaldi frames (1 + (S - 400) // 160), stacked by 4 with the last group padded
    assert fb.frame_lengths(samples).tolist() == [0, 0, 1, 1, 1, 25, 25]


def test_mask_replaces_only_masked_frames_with_the_learned_embedding():
    enc = _speech("wav2vec2_tiny")
    x = torch.randn(2, 6, enc.dim)
    pred_mask = torch.zeros(2, 6, dtype=torch.bool)
    pred_mask[0, 1:3] = True
    pred_mask[1, 5] = True
    y = enc.mask(x, pred_mask)
    assert torch.equal(y[~pred_mask], x[~pred_mask])
    assert torch.equal(y[pred_mask], enc.mask_embedding.detach().expand(3, -1))
    y.sum().backward()
    assert torch.equal(enc.mask_embedding.grad, torch.full((enc.dim,), 3.0))


def test_an_input_masking_encoder_masks_frontend_frames_before_the_projection():
    """``mask_input`` (DeCoAR 2.0): masking the projected features equals projecting the input
    with its masked frames replaced by the learned input frame, LayerNorm included."""
    base = _speech("fbank_tiny")
    enc = AudioEncoder(base.frontend, base.projection, base.transformer, mask_input=True).eval()
    assert enc.mask_embedding.shape == (enc.feature_dim,) != (enc.dim,)
    raw = torch.randn(2, 6, enc.feature_dim)
    pred_mask = torch.zeros(2, 6, dtype=torch.bool)
    pred_mask[0, 1:3] = True
    pred_mask[1, 5] = True
    masked = torch.where(pred_mask.unsqueeze(-1), enc.mask_embedding, raw)
    expected = enc.projection.linear(enc.projection.norm(masked))
    assert torch.allclose(enc.mask(enc.project(raw)[0], pred_mask), expected, atol=1e-6)


def test_zero_length_utterance_in_a_batch_gets_no_frames():
    enc = _speech("wavlm_tiny").eval()
    audio = torch.randn(3, 4000)
    lens = torch.tensor([4000, 0, 300])
    with torch.no_grad():
        out = enc(audio, lens)
        alone = enc(audio[:1], lens[:1])
    assert out.lengths.tolist() == [12, 0, 0]
    assert torch.isfinite(out.hidden).all()
    assert torch.allclose(out.hidden[0], alone.hidden[0], atol=1e-5)


@pytest.mark.parametrize("name", ["hubert_tiny", "fbank_tiny"])
def test_batch_shorter_than_one_frame_is_a_data_error(name):
    enc = _speech(name)
    with pytest.raises(DataError, match="shorter than"):
        enc(torch.zeros(2, 250), torch.tensor([250, 100]))
    with pytest.raises(DataError, match="audio"):
        enc(torch.zeros(2, 3, 800), torch.tensor([800, 800]))


def test_feature_grad_scale_scales_only_the_frontend_gradient():
    grads = {}
    for scale in (1.0, 0.1):
        enc = _speech("hubert_tiny", feature_grad_scale=scale).eval()
        batch = tiny_audio_batch()
        out = enc(batch["audio"], batch["audio_lens"])
        out.hidden.sum().backward()
        grads[scale] = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    for name, g in grads[1.0].items():
        expected = 0.1 * g if name.startswith("frontend.") else g
        assert torch.allclose(grads[0.1][name], expected, rtol=1e-4, atol=1e-7), name


def test_overrides_apply_and_unknown_options_are_named():
    enc = _speech("hubert_tiny", dim=32, num_layers=3, num_heads=2, pos_conv_groups=2)
    assert enc.dim == 32 and len(enc.transformer.layers) == 3
    assert enc.transformer.layers[0].attention.num_heads == 2
    with pytest.raises(ConfigError, match="'dims'"):
        ENCODERS.build("hubert_tiny", dims=32)


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_parameter_counts(name):
    with torch.device("meta"):  # no memory, no initialisation time
        enc = ENCODERS.build(name)
    if not isinstance(enc, AudioEncoder):
        pytest.skip(f"{name} is not a speech encoder")
    millions = sum(p.numel() for p in enc.parameters()) / 1e6
    if name.endswith("_base"):
        # wav2vec 2.0 / HuBERT / WavLM base: ~94.4M, data2vec ~93.2M; the filterbank variant has no conv stack
        low = 85.0 if name.startswith("fbank") else 93.0
        assert low < millions < 95.5, millions
        assert enc.dim == 768 and len(enc.transformer.layers) == 12 and not enc.transformer.pre_norm
    else:
        assert 300.0 < millions < 320.0, millions
        assert enc.dim == 1024 and len(enc.transformer.layers) == 24 and enc.transformer.pre_norm


@pytest.mark.cuda
@pytest.mark.parametrize("name", SPEECH_TINY)
def test_bf16_autocast_on_cuda_is_close_to_float32(name):
    enc = _speech(name).cuda().eval()
    batch = tiny_audio_batch(lengths=(8000, 5121, 300))
    audio, lens = batch["audio"].cuda(), batch["audio_lens"].cuda()
    with torch.no_grad():
        ref = enc(audio, lens)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = enc(audio, lens)
    assert torch.isfinite(out.hidden).all()
    keep = torch.arange(out.hidden.shape[1], device="cuda") < out.lengths[:, None]
    err = (out.hidden.float() - ref.hidden)[keep].abs().mean() / ref.hidden[keep].abs().mean()
    assert err < 0.05, float(err)


def test_cpc_presets_are_100hz_causal_encoders_with_every_context_layer():
    from mmssl.encoders.audio import CPCEncoder

    for name in ("cpc_tiny", "cpc_base", "cpc_large"):
        assert name in ENCODERS
    enc = _speech("cpc_tiny", context="transformer").eval()
    assert isinstance(enc, CPCEncoder) and enc.frame_rate == 100.0 and enc.num_layers == 2
    # receptive field 465 samples, hop 160: one frame from 465 samples, a new one every 160
    samples = torch.tensor([464, 465, 624, 625, 16000])
    assert enc.frame_lengths(samples).tolist() == [0, 1, 1, 2, 1 + (16000 - 465) // 160]
    batch = tiny_audio_batch()
    with torch.no_grad():
        feats = enc.extract(batch["audio"], batch["audio_lens"])
        assert feats.x is feats.raw and feats.x.shape[-1] == enc.feature_dim
        out = enc.contextualize(feats.x, feats.lengths)
        first = enc.contextualize(feats.x, feats.lengths, num_layers=1)
        # hidden is the context network's output: its final norm over the last layer
        assert torch.allclose(out.hidden, enc.context(feats.x, feats.lengths), atol=1e-6)
        assert torch.allclose(out.hidden, enc.context.norm(out.layers[-1]), atol=1e-6)
        assert torch.equal(first.hidden, out.layers[0]) and len(first.layers) == 1
        # causal: changing the audio after a frame's window changes no earlier frame
        cut = 3000
        later = batch["audio"].clone()
        later[0, cut:] = torch.randn(later.shape[1] - cut)
        other = enc(later, batch["audio_lens"])
        ok = int(enc.frame_lengths(torch.tensor(cut)))  # frames whose window ends before `cut`
        for a, b in zip(out.layers, other.layers):
            assert torch.allclose(a[0, :ok], b[0, :ok], atol=1e-5)
            assert not torch.allclose(a[0, ok:], b[0, ok:], atol=1e-3)
    with pytest.raises(ConfigError, match="num_layers"):
        enc.contextualize(feats.x, feats.lengths, num_layers=3)
    with pytest.raises(ConfigError, match="context"):
        ENCODERS.build("cpc_tiny", context="conv")
    with pytest.raises(ConfigError, match="'depth'"):
        ENCODERS.build("cpc_tiny", depth=3)


def test_cpc_base_has_cpc_sizes():
    with torch.device("meta"):
        enc = ENCODERS.build("cpc_base")
    assert enc.dim == 256 and enc.feature_dim == 512 and enc.num_layers == 1
    # five biased convolutions of 512 channels, each with a layer norm, then one GRU of 256 units
    convs = sum(c_in * 512 * k + 512 + 2 * 512 for c_in, k in zip((1, 512, 512, 512, 512), (10, 8, 4, 4, 4)))
    gru = 3 * (512 * 256 + 256 * 256 + 2 * 256)
    assert sum(p.numel() for p in enc.parameters()) == convs + gru


def test_normalize_waveforms_is_each_utterance_alone_with_padding_zero():
    from mmssl.encoders.audio import normalize_waveforms

    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1000, 640, 1])
    audio = torch.zeros(3, 1000)
    for i, n in enumerate(lengths.tolist()):
        audio[i, :n] = 0.05 * torch.randn(n, generator=g) + 0.01 * (i + 1)
    out = normalize_waveforms(audio, lengths, eps=1e-5)
    for i, n in enumerate(lengths.tolist()):
        alone = torch.nn.functional.layer_norm(audio[i, :n], (n,))  # fairseq's task.normalize
        torch.testing.assert_close(out[i, :n], alone, atol=1e-5, rtol=1e-5)
        assert not out[i, n:].any()
