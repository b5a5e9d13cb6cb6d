"""Transformer encoder of wav2vec 2.0 / HuBERT / WavLM / data2vec, usable for any modality.

Pieces, each built from plain arguments and injected into the next: a convolutional relative
position embedding (wav2vec 2.0, sec. 2 and 4.2: one grouped convolution, kernel 128,
16 groups, weight norm) or fixed sinusoidal positions (Mockingjay), self-attention through
PyTorch's ``scaled_dot_product_attention`` with a key padding mask, an optional gated relative
position bias (WavLM, Chen et al. 2022), a feed-forward block, and pre- or post-LayerNorm
layers with layer drop.

Shape legend: B batch, T frames, C channels, H heads, D head dim.

Padded frames are zeroed before the position convolution and masked out as attention keys,
so the valid frames of an utterance do not depend on how much padding follows it. The
padded frames of the outputs hold unspecified values: read outputs with ``lengths``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.errors import ConfigError
from mmssl.nn.dropout import Dropout, dropout
from mmssl.nn.outputs import EncoderOutput
from mmssl.nn.padding import lengths_to_padding_mask


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal absolute positions (Vaswani et al., 2017, sec. 3.5), Mockingjay's
    position encoding (sec. 2.2): ``sin`` on even and ``cos`` on odd channels of angle
    ``t / 10000^(2 floor(i/2) / C)``. Takes the place of the transformer's position
    convolution: ``x (B, T, C)`` -> the table ``(1, T, C)``, which the encoder adds."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        t, c = x.shape[1], x.shape[2]
        steps = torch.arange(t, device=x.device, dtype=torch.float32).unsqueeze(1)  # (T, 1)
        channel = torch.arange(c, device=x.device)
        rate = torch.exp(-math.log(10000.0) * torch.div(channel, 2, rounding_mode="floor").float() * 2.0 / c)
        angle = steps * rate  # (T, C)
        table = torch.where(channel % 2 == 0, angle.sin(), angle.cos())
        return table.unsqueeze(0).to(x.dtype)  # (1, T, C)


def bert_init(module: nn.Module) -> None:
    """BERT initialisation of linear layers (normal, std 0.02; zero bias), as fairseq's
    ``init_bert_params`` that wav2vec 2.0 and HuBERT use."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ConvPositionalEmbedding(nn.Module):
    """Relative position information from a grouped convolution over time, with weight
    normalisation over the kernel dimension (wav2vec 2.0, sec. 4.2; ``conv_pos=128``,
    ``conv_pos_groups=16``), followed by GELU. ``(B, T, C)`` -> ``(B, T, C)``.

    With ``causal=True`` the convolution only looks at the current and past frames (for
    autoregressive context networks)."""

    def __init__(self, dim: int, kernel: int = 128, groups: int = 16, causal: bool = False) -> None:
        super().__init__()
        if dim % groups:
            raise ConfigError(f"position conv: dim {dim} is not divisible by groups {groups}")
        self.dim, self.kernel, self.causal = dim, kernel, causal
        conv = nn.Conv1d(dim, dim, kernel, padding=0 if causal else kernel // 2, groups=groups)
        # fairseq's init: normal with std sqrt(4 / (kernel * dim)), zero bias
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (kernel * dim)))
        nn.init.zeros_(conv.bias)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        # an even kernel with symmetric padding gives one extra frame at the end
        self.trim = 1 if (kernel % 2 == 0 and not causal) else 0

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``x (B, T, C)`` with zeroed padding -> ``(B, T, C)`` (``padding_mask`` is not needed
        by a single convolution; it is taken for the same call as the stacked variant)."""
        # as a 2-d convolution over (B, C, 1, T): x's own memory is that tensor in channels-last
        # order, which oneDNN convolves without reordering it (nor the output back to (B, T, C));
        # on a CPU the small model's position conv ran in 0.54 ms where Conv1d took 0.96 (a 4-s
        # query), and a training step's forward and backward in half the time
        y = x.transpose(1, 2).unsqueeze(2)  # (B, C, 1, T)
        if self.causal:
            y = F.pad(y, (self.kernel - 1, 0))
        conv = self.conv
        y = F.conv2d(y, conv.weight.unsqueeze(2), conv.bias, padding=(0, conv.padding[0]), groups=conv.groups)
        y = y.squeeze(2)  # (B, C, T)
        if self.trim:
            y = y[..., : -self.trim]
        return F.gelu(y).transpose(1, 2)  # (B, T, C)


class StackedConvPositionalEmbedding(nn.Module):
    """data2vec's position embedding: ``depth`` grouped convolutions, each followed by a
    LayerNorm without affine parameters and GELU (data2vec audio: ``pos_conv_depth=5``,
    ``conv_pos=95`` split into kernels of 95 / 5 = 19, 16 groups). ``(B, T, C)`` -> ``(B, T, C)``.

    Padded frames are zeroed between layers, so a valid frame near the end sees the same
    zeros whether the utterance is padded in a batch or alone.
    """

    def __init__(self, dim: int, depth: int = 5, kernel: int = 19, groups: int = 16) -> None:
        super().__init__()
        if dim % groups:
            raise ConfigError(f"position conv: dim {dim} is not divisible by groups {groups}")
        if kernel % 2 == 0:
            raise ConfigError(f"stacked position conv: kernel must be odd, got {kernel}")
        self.dim, self.kernel = dim, kernel
        self.convs = nn.ModuleList(
            nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups) for _ in range(depth)
        )
        for conv in self.convs:
            nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (kernel * dim)))
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        keep = None if padding_mask is None else (~padding_mask).unsqueeze(1).to(x.dtype)  # (B, 1, T)
        y = x.transpose(1, 2)  # (B, C, T)
        for conv in self.convs:
            y = conv(y if keep is None else y * keep)
            y = F.gelu(F.layer_norm(y.transpose(1, 2), (self.dim,)).transpose(1, 2))
        return y.transpose(1, 2)  # (B, T, C)


def relative_position_bucket(relative: Tensor, num_buckets: int = 320, max_distance: int = 800) -> Tensor:
    """Bidirectional relative position buckets (WavLM; the T5 bucketing).

    Half the buckets are for keys after the query (``relative > 0``), half for the rest.
    Within a half, distances below ``num_buckets // 4`` get their own bucket; larger ones share
    log-spaced buckets up to ``max_distance``, beyond which everything falls in the last one.
    ``relative (...)`` long key-minus-query offsets -> ``(...)`` long bucket ids.
    """
    half = num_buckets // 2
    exact = half // 2
    offset = (relative > 0).long() * half
    distance = relative.abs()
    scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (scaled * (half - exact)).long()).clamp(max=half - 1)
    return offset + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """WavLM's relative position bias: one learned scalar per head and bucket, computed once
    and shared by every layer (WavLM; ``num_buckets=320``, ``max_distance=800``)."""

    def __init__(self, num_heads: int, num_buckets: int = 320, max_distance: int = 800) -> None:
        super().__init__()
        self.num_heads, self.num_buckets, self.max_distance = num_heads, num_buckets, max_distance
        self.embed = nn.Embedding(num_buckets, num_heads)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, length: int) -> Tensor:
        """-> ``(H, T, T)`` bias for queries (rows) and keys (columns) of a ``length``-frame input."""
        pos = torch.arange(length, device=self.embed.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.embed(buckets).permute(2, 0, 1)  # (H, T, T)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``.

    ``gated=True`` adds WavLM's gated relative position bias: a gate computed from each head's
    slice of the layer input scales the shared bias per query (the ``gru_rel_pos`` gate of
    the released WavLM).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, gated: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim, self.dropout = dim, num_heads, dim // num_heads, dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gated = gated
        if gated:
            self.gate_proj = nn.Linear(self.head_dim, 8)
            self.gate_scale = nn.Parameter(torch.ones(1, num_heads, 1, 1))

    def _gate(self, x: Tensor) -> Tensor:
        """``x (B, T, C)`` -> per head and query gate ``(B, H, T, 1)``."""
        b, t, _ = x.shape
        heads = x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        a, g = torch.sigmoid(self.gate_proj(heads).view(b, self.num_heads, t, 2, 4).sum(-1)).chunk(2, dim=-1)
        return a * (g * self.gate_scale - 1.0) + 2.0

    def forward(self, x: Tensor, padding_mask: Tensor, position_bias: Tensor | None = None) -> Tensor:
        """``x (B, T, C)``, ``padding_mask (B, T)`` (True = padded) -> ``(B, T, C)``.

        ``position_bias``: an additive attention bias ``(H, T, T)`` (or ``(1, T, T)``, e.g. a
        causal mask), gated per query when ``gated``; None for none."""
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        neg = torch.finfo(q.dtype).min
        keys_out = padding_mask[:, None, None, :]  # (B, 1, 1, T)
        if position_bias is None:
            bias = torch.zeros(keys_out.shape, dtype=q.dtype, device=q.device)
        else:
            bias = position_bias.unsqueeze(0).to(q.dtype)  # (1, H, T, T)
            if self.gated:
                bias = self._gate(x).to(q.dtype) * bias  # (B, H, T, T)
        attn_mask = bias.masked_fill(keys_out, neg)
        if self.training and self.dropout > 0 and q.device.type == "cpu":
            # SDPA's own dropout on a CPU draws its mask element by element (mmssl.nn.dropout):
            # at T = 100 the whole attention takes 4.5 ms with it and 2.6 ms written out here
            weights = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim**-0.5 + attn_mask, dim=-1)
            y = dropout(weights, self.dropout) @ v  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
            )
        return self.out_proj(y.transpose(1, 2).reshape(b, t, self.dim))


class FeedForward(nn.Module):
    """Linear -> GELU -> dropout -> linear -> dropout. ``(B, T, C)`` -> ``(B, T, C)``."""

    def __init__(self, dim: int, hidden: int, activation_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation_dropout = Dropout(activation_dropout)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.activation_dropout(F.gelu(self.fc1(x)))))


class TransformerLayer(nn.Module):
    """One encoder layer from an injected attention and feed-forward.

    Post-LN (wav2vec 2.0 base): ``x = LN(x + att(x)); x = LN(x + ff(x))``.
    Pre-LN (large models, ``layer_norm_first``): ``x = x + att(LN(x)); x = x + ff(LN(x))``.

    ``ffn_out``, when given, receives ``ff(...)``: the feed-forward output before the last
    residual connection (fairseq's ``layer_result``, data2vec's targets). Nothing is kept
    when it is None.
    """

    def __init__(
        self, attention: SelfAttention, feed_forward: FeedForward, dropout: float, pre_norm: bool
    ) -> None:
        super().__init__()
        self.attention, self.feed_forward, self.pre_norm = attention, feed_forward, pre_norm
        self.attention_norm = nn.LayerNorm(attention.dim)
        self.ff_norm = nn.LayerNorm(attention.dim)
        self.dropout = Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor,
        position_bias: Tensor | None = None,
        ffn_out: list[Tensor] | None = None,
    ) -> Tensor:
        if self.pre_norm:
            x = x + self.dropout(self.attention(self.attention_norm(x), padding_mask, position_bias))
            ff = self.feed_forward(self.ff_norm(x))
        else:
            x = self.attention_norm(x + self.dropout(self.attention(x, padding_mask, position_bias)))
            ff = self.feed_forward(x)
        if ffn_out is not None:
            ffn_out.append(ff)
        return x + ff if self.pre_norm else self.ff_norm(x + ff)


class TransformerEncoder(nn.Module):
    """Position convolution, then layers; every layer's output is returned.

    Post-LN models normalise once after the position embedding (before the first layer);
    pre-LN models normalise once after the last layer (wav2vec 2.0 / fairseq
    ``layer_norm_first``). ``EncoderOutput.layers`` holds each layer's output before that
    final norm, as torchaudio's ``Wav2Vec2Model.extract_features``; ``hidden`` is the
    normalised output. Layer drop (LayerDrop, Fan et al. 2020) skips whole layers in training;
    a skipped layer repeats its input in ``layers`` so indices stay meaningful.

    ``forward(..., keep_ffn=True)`` also fills ``EncoderOutput.ffn`` with each layer's
    feed-forward output before its last residual connection (data2vec's targets; zeros for a
    skipped layer, which adds nothing); by default it stays empty and costs nothing.
    """

    def __init__(
        self,
        pos_conv: ConvPositionalEmbedding | StackedConvPositionalEmbedding | None,
        layers: list[TransformerLayer],
        dim: int,
        dropout: float = 0.1,
        pre_norm: bool = False,
        layer_drop: float = 0.0,
        position_bias: RelativePositionBias | None = None,
    ) -> None:
        super().__init__()
        self.pos_conv = pos_conv
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim)
        self.dropout = Dropout(dropout)
        self.dim, self.pre_norm, self.layer_drop = dim, pre_norm, layer_drop
        self.position_bias = position_bias
        self._drop_seed, self._drop_calls = None, 0

    @torch.compiler.disable  # eager: host-side counters and a CPU generator, nothing to trace
    def _skipped(self) -> list[bool]:
        """Which layers LayerDrop skips in this call, drawn on the CPU (no device sync).

        Every rank must skip the same layers (FSDP2 gathers each layer's shards collectively;
        DDP reduces the same gradients). The trainer seeds the CPU generator alike on every
        rank at each step (``mmssl.train.loop``), but what else draws from it before this
        point can differ by rank (CPU dropout draws as many numbers as the local batch has
        elements). So the draw comes from a private generator seeded from that step seed
        (``torch.initial_seed()``) and the number of calls since it was set: the same on every
        rank, new at every step and for every micro-batch, and replayed after a resume.
        """
        if not self.training or self.layer_drop <= 0:
            return [False] * len(self.layers)
        seed = torch.initial_seed()
        if seed != self._drop_seed:
            self._drop_seed, self._drop_calls = seed, 0
        generator = torch.Generator().manual_seed(hash((seed, self._drop_calls)) & (2**63 - 1))
        self._drop_calls += 1
        return (torch.rand(len(self.layers), generator=generator) < self.layer_drop).tolist()

    def forward(
        self,
        x: Tensor,
        lengths: Tensor,
        frame_rate: float = 50.0,
        num_layers: int | None = None,
        keep_ffn: bool = False,
    ) -> EncoderOutput:
        """``x (B, T, C)``, ``lengths (B,)`` -> ``EncoderOutput`` (``frame_rate`` is passed through).

        ``num_layers`` stops after that many layers (feature extraction from an inner layer);
        ``hidden`` is then the last computed layer's output, without the final norm.
        ``keep_ffn`` fills ``EncoderOutput.ffn`` (one ``(B, T, C)`` per computed layer).
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"transformer expects (B, T, {self.dim}) input, got {tuple(x.shape)}")
        depth = len(self.layers) if num_layers is None else num_layers
        if not 1 <= depth <= len(self.layers):
            raise ConfigError(f"transformer: num_layers must be in [1, {len(self.layers)}], got {num_layers}")
        padding_mask = lengths_to_padding_mask(lengths, x.shape[1])
        x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        if self.pos_conv is not None:
            x = x + self.pos_conv(x, padding_mask)
        if not self.pre_norm:
            x = self.norm(x)
        x = self.dropout(x)
        bias = self.position_bias(x.shape[1]) if self.position_bias is not None else None
        outputs: list[Tensor] = []
        ffn: list[Tensor] | None = [] if keep_ffn else None
        for layer, skip in zip(self.layers[:depth], self._skipped()):
            if not skip:
                x = layer(x, padding_mask, bias, ffn)
            elif ffn is not None:
                ffn.append(torch.zeros_like(x))
            outputs.append(x)
        hidden = self.norm(x) if (self.pre_norm and depth == len(self.layers)) else x
        return EncoderOutput(
            hidden=hidden, lengths=lengths, layers=outputs, frame_rate=frame_rate, ffn=ffn or []
        )


def build_transformer(
    dim: int,
    num_layers: int,
    num_heads: int,
    ffn_dim: int,
    dropout: float = 0.1,
    attention_dropout: float = 0.1,
    activation_dropout: float = 0.0,
    layer_drop: float = 0.0,
    pre_norm: bool = False,
    pos_conv_kernel: int = 128,
    pos_conv_groups: int = 16,
    pos_conv_depth: int = 1,
    rel_pos_buckets: int = 0,
    rel_pos_max_distance: int = 800,
) -> TransformerEncoder:
    """A wav2vec 2.0-style transformer encoder.

    Defaults follow wav2vec 2.0 base (``dropout=0.1``, ``attention_dropout=0.1``,
    ``activation_dropout=0.0``, ``conv_pos=128``, ``conv_pos_groups=16``). ``rel_pos_buckets > 0``
    adds WavLM's gated relative position bias (WavLM base/large: 320 buckets, max distance
    800). ``pos_conv_depth > 1`` stacks that many convolutions of kernel ``pos_conv_kernel``
    (data2vec: 5 of kernel 19). ``pos_conv_kernel=0`` leaves out the position convolution.
    """
    if num_layers < 1:
        raise ConfigError(f"transformer: num_layers must be >= 1, got {num_layers}")
    if not 0.0 <= layer_drop < 1.0:
        raise ConfigError(f"transformer: layer_drop must be in [0, 1), got {layer_drop}")
    gated = rel_pos_buckets > 0
    layers = [
        TransformerLayer(
            SelfAttention(dim, num_heads, attention_dropout, gated=gated),
            FeedForward(dim, ffn_dim, activation_dropout, dropout),
            dropout=dropout,
            pre_norm=pre_norm,
        )
        for _ in range(num_layers)
    ]
    for layer in layers:
        bert_init(layer)
    pos_conv: nn.Module | None = None
    if pos_conv_kernel > 0 and pos_conv_depth > 1:
        pos_conv = StackedConvPositionalEmbedding(dim, pos_conv_depth, pos_conv_kernel, pos_conv_groups)
    elif pos_conv_kernel > 0:
        pos_conv = ConvPositionalEmbedding(dim, pos_conv_kernel, pos_conv_groups)
    bias = RelativePositionBias(num_heads, rel_pos_buckets, rel_pos_max_distance) if gated else None
    return TransformerEncoder(pos_conv, layers, dim, dropout, pre_norm, layer_drop, bias)


@dataclasses.dataclass(frozen=True)
class TransformerOptions:
    """The arguments of ``build_transformer`` as one value, so that the encoder builders
    (``mmssl.encoders.audio``, ``mmssl.encoders.av``) hand them on together.

    Defaults are ``build_transformer``'s (wav2vec 2.0 base, sec. 4.2; no layer drop).
    ``replace(**fields)`` gives a copy with some fields changed; ``build()`` makes the encoder.
    """

    dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layer_drop: float = 0.0
    pre_norm: bool = False
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    pos_conv_depth: int = 1
    rel_pos_buckets: int = 0
    rel_pos_max_distance: int = 800

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **fields: Any) -> TransformerOptions:
        """A copy with ``fields`` changed; an unknown name is a ``ConfigError`` naming it."""
        unknown = sorted(set(fields) - set(self.field_names()))
        if unknown:
            raise ConfigError(
                f"transformer has no option {', '.join(map(repr, unknown))}; "
                f"it takes: {', '.join(self.field_names())}"
            )
        return dataclasses.replace(self, **fields)

    def build(self) -> TransformerEncoder:
        return build_transformer(**dataclasses.asdict(self))
