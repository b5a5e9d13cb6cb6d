import copy
import math

import pytest
import torch

from mmssl.encoders.base import EncoderOutput
from mmssl.errors import ConfigError
from mmssl.nn.transformer import (
    ConvPositionalEmbedding,
    RelativePositionBias,
    SelfAttention,
    StackedConvPositionalEmbedding,
    build_transformer,
    relative_position_bucket,
)


def _bucket_by_hand(rel: int, num_buckets: int = 320, max_distance: int = 800) -> int:
    half = num_buckets // 2  # 160: keys before or at the query, then keys after
    exact = half // 2  # 80 exact buckets per side
    base = half if rel > 0 else 0
    d = abs(rel)
    if d < exact:
        return base + d
    far = exact + int(math.log(d / exact) / math.log(max_distance / exact) * (half - exact))
    return base + min(half - 1, far)


def test_wavlm_buckets_match_hand_computed_values():
    # d = 100: 80 + floor(ln(1.25) / ln(10) * 80) = 80 + floor(7.75) = 87
    rel = torch.tensor([0, 1, -1, 79, -79, 80, 100, -100, 799, 800, 5000, -5000])
    expected = [0, 161, 1, 239, 79, 240, 247, 87, 319, 319, 319, 159]
    assert relative_position_bucket(rel).tolist() == expected
    assert expected == [_bucket_by_hand(r) for r in rel.tolist()]


def test_relative_bias_looks_up_the_bucket_of_key_minus_query():
    bias = RelativePositionBias(num_heads=2, num_buckets=32, max_distance=64)
    out = bias(10)  # (H, T, T)
    assert out.shape == (2, 10, 10)
    q, k = 3, 8
    bucket = relative_position_bucket(torch.tensor(k - q), 32, 64)
    assert torch.equal(out[:, q, k], bias.embed.weight[bucket])


def _reference_attention(att: SelfAttention, x, pad, bias=None):
    b, t, c = x.shape
    h, d = att.num_heads, att.head_dim
    q = att.q_proj(x).view(b, t, h, d).transpose(1, 2)
    k = att.k_proj(x).view(b, t, h, d).transpose(1, 2)
    v = att.v_proj(x).view(b, t, h, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        gate = torch.ones(b, h, t, 1)
        if att.gated:  # WavLM's gate: a * (b * w - 1) + 2 from the head's slice of the input
            g = torch.sigmoid(att.gate_proj(x.view(b, t, h, d).transpose(1, 2)).view(b, h, t, 2, 4).sum(-1))
            gate = g[..., :1] * (g[..., 1:] * att.gate_scale - 1.0) + 2.0
        scores = scores + gate * bias
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    y = scores.softmax(-1) @ v
    return att.out_proj(y.transpose(1, 2).reshape(b, t, c))


@pytest.mark.parametrize("gated", [False, True])
def test_sdpa_attention_matches_explicit_softmax(gated):
    torch.manual_seed(0)
    att = SelfAttention(16, 4, gated=gated).eval()
    if gated:
        torch.nn.init.normal_(att.gate_scale)
    x = torch.randn(2, 7, 16)
    pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    bias = torch.randn(4, 7, 7) if gated else None
    out = att(x, pad, bias)
    assert torch.allclose(out, _reference_attention(att, x, pad, bias), atol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_cpu_training_attention_with_dropout_is_the_explicit_softmax(gated):
    # in training on a CPU, attention with dropout is written out (mmssl.nn.dropout); with a
    # dropout that keeps every weight it must equal the eval-mode (SDPA) result
    torch.manual_seed(0)
    att = SelfAttention(16, 4, dropout=1e-9, gated=gated)
    if gated:
        torch.nn.init.normal_(att.gate_scale)
    x = torch.randn(2, 7, 16)
    pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    bias = torch.randn(4, 7, 7) if gated else None
    trained = att.train()(x, pad, bias)
    assert torch.allclose(trained, att.eval()(x, pad, bias), atol=1e-5)
    assert torch.allclose(trained, _reference_attention(att, x, pad, bias), atol=1e-5)


def test_cpu_attention_dropout_drops_weights_in_training_only():
    torch.manual_seed(0)
    att = SelfAttention(16, 4, dropout=0.5)
    x, pad = torch.randn(2, 7, 16), torch.zeros(2, 7, dtype=torch.bool)
    assert not torch.allclose(att.train()(x, pad), att.eval()(x, pad), atol=1e-3)
    assert torch.equal(att.eval()(x, pad), att.eval()(x, pad))


def test_conv_position_embedding_keeps_length_and_causal_variant_ignores_future():
    torch.manual_seed(0)
    for kernel in (4, 5):
        pos = ConvPositionalEmbedding(8, kernel, 2)
        assert pos(torch.randn(1, 9, 8)).shape == (1, 9, 8)
    causal = ConvPositionalEmbedding(8, 4, 2, causal=True)
    x = torch.randn(1, 9, 8)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 4, 8)
    assert torch.allclose(causal(x)[:, :5], causal(y)[:, :5])
    assert not torch.allclose(causal(x)[:, 5:], causal(y)[:, 5:])


def test_stacked_position_conv_is_conv_layernorm_gelu_repeated():
    torch.manual_seed(0)
    pos = StackedConvPositionalEmbedding(8, depth=2, kernel=3, groups=2)
    x = torch.randn(1, 6, 8)
    y = x.transpose(1, 2)
    for conv in pos.convs:
        z = conv(y)  # (1, C, T)
        mean = z.mean(1, keepdim=True)
        var = z.var(1, unbiased=False, keepdim=True)
        y = torch.nn.functional.gelu((z - mean) / torch.sqrt(var + 1e-5))
    assert torch.allclose(pos(x), y.transpose(1, 2), atol=1e-5)
    with pytest.raises(ConfigError, match="odd"):
        StackedConvPositionalEmbedding(8, kernel=4, groups=2)


@pytest.mark.parametrize(
    "options",
    [
        dict(pre_norm=False),
        dict(pre_norm=True),
        dict(pre_norm=False, rel_pos_buckets=32, rel_pos_max_distance=64),
        dict(pre_norm=False, pos_conv_depth=3, pos_conv_kernel=5),
    ],
)
def test_padded_batch_equals_each_sequence_alone(options):
    torch.manual_seed(0)
    options = {"pos_conv_kernel": 8, **options}
    enc = build_transformer(32, 2, 4, 64, pos_conv_groups=4, **options).eval()
    lengths = torch.tensor([11, 6, 1])
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        out = enc(x, lengths, frame_rate=25.0)
        assert isinstance(out, EncoderOutput) and out.frame_rate == 25.0 and len(out.layers) == 2
        for i, n in enumerate(lengths.tolist()):
            alone = enc(x[i : i + 1, :n], lengths[i : i + 1])
            for a, b in zip(out.layers + [out.hidden], alone.layers + [alone.hidden]):
                assert torch.allclose(a[i, :n], b[0], atol=1e-5)
    if options["pre_norm"]:  # pre-LN: hidden is the final LayerNorm of the last layer
        assert torch.allclose(out.hidden, enc.norm(out.layers[-1]))
    else:
        assert torch.equal(out.hidden, out.layers[-1])


def test_num_layers_stops_early_with_the_same_inner_outputs():
    torch.manual_seed(0)
    enc = build_transformer(16, 3, 2, 32, pre_norm=True, pos_conv_kernel=4, pos_conv_groups=2).eval()
    x, lengths = torch.randn(2, 5, 16), torch.tensor([5, 3])
    with torch.no_grad():
        full, part = enc(x, lengths), enc(x, lengths, num_layers=2)
    assert len(part.layers) == 2
    assert all(torch.equal(a, b) for a, b in zip(part.layers, full.layers[:2]))
    assert torch.equal(part.hidden, full.layers[1])
    with pytest.raises(ConfigError, match="num_layers"):
        enc(x, lengths, num_layers=4)


def test_layer_drop_only_in_training():
    torch.manual_seed(0)
    enc = build_transformer(
        16,
        3,
        2,
        32,
        dropout=0.0,
        attention_dropout=0.0,
        layer_drop=0.999,
        pos_conv_kernel=4,
        pos_conv_groups=2,
    )
    x, lengths = torch.randn(2, 5, 16), torch.tensor([5, 3])
    out = enc.train()(x, lengths)
    # every layer skipped: each entry repeats the normalised input
    assert all(torch.equal(layer, out.layers[0]) for layer in out.layers)
    out = enc.eval()(x, lengths)
    assert not torch.allclose(out.layers[0], out.layers[1])


def test_layer_drop_depends_on_the_step_seed_and_call_count_only():
    """Two ranks seeded alike at a step skip the same layers even when other draws from the
    global generator differ between them; the choice changes with the seed and per call."""
    enc = build_transformer(8, 12, 2, 16, layer_drop=0.5, pos_conv_kernel=0).train()
    ranks = [copy.deepcopy(enc), copy.deepcopy(enc)]

    def decisions(module, seed, other_draws):
        torch.manual_seed(seed)
        torch.rand(other_draws)  # e.g. CPU dropout over a batch of another size
        return [module._skipped() for _ in range(3)]  # three micro-batches of one step

    for step in range(3):
        rank0, rank1 = decisions(ranks[0], 100 + step, 10), decisions(ranks[1], 100 + step, 999 + step)
        assert rank0 == rank1
    assert rank0[0] != rank0[1] or rank0[1] != rank0[2]  # micro-batches differ
    assert decisions(ranks[0], 6, 0) != rank0  # another step differs
    rate = sum(sum(d) for s in range(40) for d in decisions(enc, s, 0)) / (40 * 3 * 12)
    assert 0.4 < rate < 0.6


def test_keep_ffn_gives_each_layers_ffn_output_and_nothing_by_default():
    torch.manual_seed(0)
    enc = build_transformer(
        16, 2, 2, 32, dropout=0.0, attention_dropout=0.0, pos_conv_kernel=4, pos_conv_groups=2
    ).eval()
    x, lengths = torch.randn(2, 7, 16), torch.tensor([7, 4])
    plain = enc(x, lengths)
    kept = enc(x, lengths, keep_ffn=True)
    assert plain.ffn == [] and len(kept.ffn) == 2
    assert torch.equal(plain.hidden, kept.hidden)
    assert all(f.shape == (2, 7, 16) for f in kept.ffn)
    # post-LN: the last layer's output is ff_norm(h + ffn), h its attention block's output
    last = enc.layers[1]
    pad = torch.arange(7)[None] >= lengths[:, None]
    h = last.attention_norm(kept.layers[0] + last.attention(kept.layers[0], pad))
    assert torch.allclose(kept.ffn[1], last.feed_forward(h), atol=1e-6)
    assert torch.allclose(last.ff_norm(h + kept.ffn[1]), kept.layers[1], atol=1e-6)
