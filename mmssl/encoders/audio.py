"""Speech encoders: a frontend, a feature projection and a transformer, and their presets.

``AudioEncoder`` implements ``SpeechEncoder``: ``extract`` runs the frontend and the
projection (LayerNorm -> Linear -> dropout, wav2vec 2.0's ``post_extract_proj`` with its
``layer_norm``), ``mask`` puts the learned ``mask_embedding`` on masked frames,
``contextualize`` runs the transformer.

``CPCEncoder`` implements it for CPC and wav2vec (Schneider et al., 2019): a strided conv
frontend gives the latents ``z`` (100 Hz), which are the features ``contextualize`` reads
(no projection, nothing to mask), and a causal context network (``mmssl.nn.context``) gives
``c``, one entry of ``EncoderOutput.layers`` per recurrent or transformer layer. APC's encoder
(``mmssl.encoders.recurrent.build_apc_encoder``) is the same class on a log-mel frontend.

Presets (``ENCODERS``): ``{wav2vec2,hubert,wavlm,data2vec}_{tiny,base,large}`` on the waveform
(50 Hz), ``fbank_{tiny,small,base,large}`` on 80 filterbanks stacked x4 (25 Hz, AV-HuBERT's audio
input) and ``cpc_{tiny,base,large}`` (100 Hz). Every preset takes keyword overrides of the
arguments of ``build_conv_encoder`` / ``build_fbank_encoder`` (``TransformerOptions`` fields
included) / ``build_cpc_encoder``.

Shape legend: B batch, S samples, T frames, C model dim, F frontend features.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from mmssl.encoders.base import EncoderOutput, Features, SpeechEncoder, check_depth
from mmssl.errors import ConfigError
from mmssl.nn import frontend as fe
from mmssl.nn import transformer as tr
from mmssl.nn.context import CausalTransformerContext, RecurrentContext
from mmssl.nn.dropout import Dropout
from mmssl.nn.gradient import scale_grad
from mmssl.nn.reconstruction import LogMelFrontend, SubsampledLogMelFrontend
from mmssl.registry import ENCODERS


class FeatureProjection(nn.Module):
    """LayerNorm over frontend features, linear to the model dim, dropout (wav2vec 2.0
    ``layer_norm`` + ``post_extract_proj`` + ``dropout_input``). ``(B, T, F)`` -> ``(B, T, C)``.
    ``norm=False`` leaves out the LayerNorm (an identity in its place): DeCoAR 2.0 projects its
    normalised log mels directly, and a per-frame norm would erase each frame's level."""

    def __init__(self, in_dim: int, dim: int, dropout: float = 0.1, norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim) if norm else nn.Identity()
        self.linear = nn.Linear(in_dim, dim)
        self.dropout = Dropout(dropout)

    def project(self, x: Tensor) -> Tensor:
        """LayerNorm and linear, without the dropout. ``(B, T, F)`` -> ``(B, T, C)``."""
        return self.linear(self.norm(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.project(x))


class AudioEncoder(SpeechEncoder):
    """Frontend -> projection -> (mask) -> transformer, from injected parts.

    ``Features.raw`` is the frontend output before the projection's LayerNorm (the feature
    penalty of wav2vec 2.0 is taken there; its quantizer reads ``projection.norm(raw)``);
    ``Features.clean`` is the projection's output before its dropout (data2vec's teacher input).
    ``feature_grad_scale`` scales the gradient reaching the frontend (fairseq
    ``feature_grad_mult``; 0.1 in wav2vec 2.0 and HuBERT pretraining, 1.0 in data2vec's).
    ``normalize_waveform``: each utterance is brought to zero mean and unit variance over its
    own samples first (``normalize_waveforms``, with ``normalize_eps``), as the models trained
    on normalised audio expect (the large wav2vec 2.0 / HuBERT / data2vec models: fairseq
    ``task.normalize``, eps 1e-5 of its ``F.layer_norm``; HF ``do_normalize``, eps 1e-7);
    ``mmssl convert`` sets both for them.
    ``mask_input``: the learned ``mask_embedding`` is a frontend frame (``F`` values) that
    replaces masked frames before the projection, as DeCoAR 2.0 masks its log mels (the first
    author's fairseq code: ``mask_emb`` of 80 values, ``apply_mask`` before ``post_extract_proj``);
    otherwise it is a model-dim vector that replaces projected frames (wav2vec 2.0, HuBERT).
    """

    def __init__(
        self,
        frontend: fe.ConvFrontend | fe.FbankFrontend | SubsampledLogMelFrontend,
        projection: FeatureProjection,
        transformer: tr.TransformerEncoder,
        feature_grad_scale: float = 1.0,
        normalize_waveform: bool = False,
        normalize_eps: float = 1e-7,
        mask_input: bool = False,
    ) -> None:
        super().__init__()
        self.frontend, self.projection, self.transformer = frontend, projection, transformer
        self.feature_grad_scale = feature_grad_scale
        self.normalize_waveform, self.normalize_eps = normalize_waveform, normalize_eps
        self.dim = transformer.dim
        self.feature_dim = frontend.out_dim
        self.frame_rate = frontend.frame_rate
        self.frame_spec = frontend.frame_spec
        # fairseq wav2vec 2.0 / HuBERT (and DeCoAR 2.0's input frame): drawn uniformly in [0, 1)
        self.mask_input = mask_input
        self.mask_embedding = nn.Parameter(torch.rand(self.feature_dim if mask_input else self.dim))

    @property
    def num_layers(self) -> int:
        """Transformer layers (``EncoderOutput.layers`` has this many entries)."""
        return len(self.transformer.layers)

    def extract(self, audio: Tensor, audio_lens: Tensor) -> Features:
        """``audio (B, S)``, ``audio_lens (B,)`` -> ``Features`` (``x (B, T, C)``, ``raw (B, T, F)``).

        A batch shorter than one frame's window raises ``DataError``; a single clip that short
        inside a longer batch gets ``lengths == 0``.
        """
        if self.normalize_waveform:
            audio = normalize_waveforms(audio, audio_lens, self.normalize_eps)
        raw, lengths = self.frontend(audio, audio_lens)
        raw = scale_grad(raw, self.feature_grad_scale)
        clean, x = self.project(raw)
        return Features(x=x, raw=raw, lengths=lengths, clean=clean)

    def project(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """``raw (B, T, F)`` -> the projected features ``(B, T, C)`` before and after the input
        dropout: ``(clean, x)``."""
        clean = self.projection.project(raw)
        return clean, self.projection.dropout(clean)

    def mask(self, x: Tensor, pred_mask: Tensor) -> Tensor:
        """Replace the frames of the projected features ``x (B, T, C)`` where ``pred_mask (B, T)``
        is True with ``mask_embedding`` (wav2vec 2.0, sec. 3.1; HuBERT, sec. 3.2). With
        ``mask_input``, with the projection of the input frame ``mask_embedding``: the projection
        is per frame, so that is the projection of the input with its masked frames replaced
        (only the input dropout, applied before, spares the masked frames here)."""
        value = self.projection.project(self.mask_embedding) if self.mask_input else self.mask_embedding
        return torch.where(pred_mask.unsqueeze(-1), value.to(x.dtype), x)

    def contextualize(self, x: Tensor, lengths: Tensor, num_layers: int | None = None) -> EncoderOutput:
        """``x (B, T, C)`` -> ``EncoderOutput``; ``num_layers`` stops early (see
        ``TransformerEncoder.forward``)."""
        return self.transformer(x, lengths, frame_rate=self.frame_rate, num_layers=num_layers)


def normalize_waveforms(audio: Tensor, audio_lens: Tensor, eps: float = 1e-7) -> Tensor:
    """Each row of ``audio (B, S)`` at zero mean and unit variance over its first
    ``audio_lens[b]`` samples, the padding after them kept at 0 (Hugging Face's
    ``Wav2Vec2FeatureExtractor(do_normalize=True)``, whose ``eps`` this is; fairseq's
    ``F.layer_norm(wav, wav.shape)`` differs only in its eps, 1e-5). One pass, no host sync."""
    x = audio.float()
    valid = torch.arange(x.shape[1], device=x.device) < audio_lens.to(x.device).unsqueeze(1)  # (B, S)
    count = valid.sum(1, keepdim=True).clamp(min=1)
    mean = (x * valid).sum(1, keepdim=True) / count
    var = ((x - mean).square() * valid).sum(1, keepdim=True) / count
    return ((x - mean) * torch.rsqrt(var + eps) * valid).to(audio.dtype)


class CPCEncoder(SpeechEncoder):
    """Frontend -> causal context network, from injected parts (CPC and wav2vec on a conv
    frontend; APC on running-normalised log mels, whose frame ``t`` reads no later audio).

    ``extract`` gives the latents: ``Features.x`` and ``Features.raw`` are both ``z (B, T, F)``
    (``F = feature_dim``, the frontend width), the context network's input and the
    objective's prediction targets. ``contextualize(z, lengths)`` gives ``c``: ``hidden (B, T, C)``
    (``C = dim``) and ``layers``, each context layer's output before any final norm.
    """

    def __init__(
        self, frontend: fe.ConvFrontend | LogMelFrontend, context: RecurrentContext | CausalTransformerContext
    ) -> None:
        super().__init__()
        self.frontend, self.context = frontend, context
        self.dim = context.dim
        self.feature_dim = frontend.out_dim
        self.frame_rate = frontend.frame_rate
        self.frame_spec = frontend.frame_spec

    @property
    def num_layers(self) -> int:
        """Layers of the context network (``EncoderOutput.layers`` has this many entries)."""
        return len(self.context.layers)

    def extract(self, audio: Tensor, audio_lens: Tensor) -> Features:
        """``audio (B, S)``, ``audio_lens (B,)`` -> ``Features`` with ``x = raw = z (B, T, F)``."""
        z, lengths = self.frontend(audio, audio_lens)
        return Features(x=z, raw=z, lengths=lengths)

    def contextualize(self, x: Tensor, lengths: Tensor, num_layers: int | None = None) -> EncoderOutput:
        """``x (B, T, F)`` -> ``EncoderOutput`` (``hidden (B, T, C)``); ``num_layers`` keeps the
        first layers only, ``hidden`` then being the last kept layer's output."""
        depth = check_depth("causal encoder", num_layers, self.num_layers)
        layers = self.context.layer_outputs(x, lengths)[:depth]
        hidden = self.context.final(layers[-1]) if depth == self.num_layers else layers[-1]
        return EncoderOutput(hidden=hidden, lengths=lengths, layers=layers, frame_rate=self.frame_rate)


# CPC, sec. 3.1 / wav2vec, sec. 2: five convolutions, 160-sample hop (100 Hz)
CPC_KERNELS = (10, 8, 4, 4, 4)
CPC_STRIDES = (5, 4, 2, 2, 2)
CONTEXTS = ("gru", "lstm", "transformer")


def build_cpc_encoder(
    channels: int = 512,
    context_dim: int = 256,
    context_layers: int = 1,
    context: str = "gru",
) -> CPCEncoder:
    """CPC's encoder; defaults are CPC's (sec. 3.1: 512-channel convolutions, one 256-unit GRU).
    ``context``: ``gru`` / ``lstm`` (unidirectional) or ``transformer`` (causal)."""
    # a layer norm over channels after every convolution keeps padded samples out of valid frames
    frontend = fe.build_conv_frontend(channels, CPC_KERNELS, CPC_STRIDES, norm="layer", bias=True)
    if context in ("gru", "lstm"):
        net: RecurrentContext | CausalTransformerContext = RecurrentContext(
            frontend.out_dim, context_dim, context_layers, cell=context
        )
    elif context == "transformer":
        net = CausalTransformerContext(frontend.out_dim, context_dim, num_layers=context_layers)
    else:
        raise ConfigError(f"cpc encoder: context must be one of {', '.join(CONTEXTS)}; got {context!r}")
    return CPCEncoder(frontend, net)


# wav2vec 2.0 base (sec. 4.2) with fairseq's ``encoder_layerdrop=0.05``
WAV2VEC2_TRANSFORMER = tr.TransformerOptions(layer_drop=0.05)


def build_conv_encoder(
    transformer: tr.TransformerOptions = WAV2VEC2_TRANSFORMER,
    conv_channels: int | tuple[int, ...] = 512,
    conv_kernels: tuple[int, ...] = fe.WAV2VEC2_KERNELS,
    conv_strides: tuple[int, ...] = fe.WAV2VEC2_STRIDES,
    conv_norm: str = "group",
    conv_bias: bool = False,
    input_dropout: float = 0.1,
    feature_grad_scale: float = 1.0,
    normalize_waveform: bool = False,
    normalize_eps: float = 1e-7,
    **transformer_fields: Any,
) -> AudioEncoder:
    """A waveform encoder (conv frontend, 50 Hz). Defaults are wav2vec 2.0 base.
    ``normalize_waveform``, ``normalize_eps``: see ``AudioEncoder``.

    ``transformer_fields`` change fields of ``transformer`` (``dim=256, num_layers=4``), so a
    flat set of keywords (a preset's, a converted checkpoint's) reaches the options unchanged.
    """
    options = transformer.replace(**transformer_fields)
    frontend = fe.build_conv_frontend(
        conv_channels, tuple(conv_kernels), tuple(conv_strides), conv_norm, conv_bias
    )
    encoder = _assemble(frontend, options, input_dropout, feature_grad_scale)
    encoder.normalize_waveform, encoder.normalize_eps = normalize_waveform, normalize_eps
    return encoder


def build_fbank_encoder(
    transformer: tr.TransformerOptions = WAV2VEC2_TRANSFORMER,
    num_mel_bins: int = 80,
    stack: int = 4,
    input_dropout: float = 0.1,
    feature_grad_scale: float = 1.0,
    **transformer_fields: Any,
) -> AudioEncoder:
    """A filterbank encoder: ``num_mel_bins`` Kaldi filterbanks stacked ``stack`` at a time
    (25 Hz for the default x4, AV-HuBERT's audio stream), a linear projection, the transformer.
    ``transformer_fields`` change fields of ``transformer``, as in ``build_conv_encoder``."""
    options = transformer.replace(**transformer_fields)
    return _assemble(fe.FbankFrontend(num_mel_bins, stack), options, input_dropout, feature_grad_scale)


def _assemble(
    frontend: fe.ConvFrontend | fe.FbankFrontend,
    options: tr.TransformerOptions,
    input_dropout: float,
    feature_grad_scale: float,
) -> AudioEncoder:
    # built in this order (frontend, transformer, projection) so a seed gives the same weights
    transformer = options.build()
    projection = FeatureProjection(frontend.out_dim, options.dim, input_dropout)
    return AudioEncoder(frontend, projection, transformer, feature_grad_scale)


def build_preset(builder: Any, preset: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """``builder(**defaults updated by overrides)``. The keys a preset takes are flat: the
    builder's named arguments and, when it takes ``**transformer_fields``, the
    ``TransformerOptions`` fields (not a whole ``transformer`` value, which the preset's own
    fields would override); any other key is a ``ConfigError`` naming the preset."""
    params = inspect.signature(builder).parameters
    known = {
        k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD and k != "transformer"
    }
    if "transformer_fields" in params:
        known |= set(tr.TransformerOptions.field_names())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(
            f"encoder {preset!r} has no option {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(sorted(known))}"
        )
    return builder(**{**defaults, **overrides})


# --- sizes -----------------------------------------------------------------------------------
# wav2vec 2.0, sec. 4.2 / HuBERT, table 1: BASE 12 blocks, dim 768, FFN 3072, 8 heads in the
# paper's text but 12 in the released models (fairseq ``encoder_attention_heads=12``);
# LARGE 24 blocks, dim 1024, FFN 4096, 16 heads, layer-norm conv frontend, pre-LN.
BASE = dict(dim=768, num_layers=12, num_heads=12, ffn_dim=3072, pre_norm=False)
LARGE = dict(
    dim=1024, num_layers=24, num_heads=16, ffn_dim=4096, pre_norm=True, dropout=0.0, attention_dropout=0.0
)
# for tests: same kernels and strides (50 Hz), narrow everything
TINY = dict(dim=64, num_layers=2, num_heads=4, ffn_dim=128, pre_norm=False)
# for CPUs (the demo): 4 pre-norm layers of 256 dims (pre-norm trains from scratch at a higher rate)
SMALL = dict(dim=256, num_layers=4, num_heads=4, ffn_dim=1024, pre_norm=True)
# fairseq ``feature_grad_mult=0.1`` (wav2vec 2.0 / HuBERT / WavLM pretraining configs)
CONV_BASE = dict(conv_channels=512, conv_norm="group", conv_bias=False, feature_grad_scale=0.1)
# fairseq ``conv_bias``: True for wav2vec 2.0 large (LV-60k), False for HuBERT and WavLM large
CONV_LARGE = dict(conv_channels=512, conv_norm="layer", conv_bias=False, feature_grad_scale=0.1)
CONV_TINY = dict(conv_channels=32, conv_norm="group", conv_bias=False, pos_conv_kernel=16, pos_conv_groups=4)
# WavLM base and large: gated relative position bias, 320 buckets, max distance 800
WAVLM = dict(rel_pos_buckets=320, rel_pos_max_distance=800)
# data2vec audio (released base model): layer-norm conv frontend and a position embedding of
# 5 stacked convolutions of kernel 19 (fairseq ``pos_conv_depth=5``, ``conv_pos=95``); no input
# dropout and a full frontend gradient (fairseq data2vec audio/pretraining/base_librispeech.yaml:
# ``dropout_input: 0.0``, ``feature_grad_mult: 1.0``; there is no published data2vec 1.0 large
# audio config, so large keeps these too)
DATA2VEC = dict(
    conv_norm="layer",
    conv_bias=False,
    pos_conv_depth=5,
    pos_conv_kernel=19,
    pos_conv_groups=16,
    input_dropout=0.0,
    feature_grad_scale=1.0,
)


@ENCODERS.register
def wav2vec2_tiny(**overrides: Any) -> AudioEncoder:
    return build_preset(build_conv_encoder, "wav2vec2_tiny", {**TINY, **CONV_TINY}, overrides)


@ENCODERS.register
def wav2vec2_base(**overrides: Any) -> AudioEncoder:
    return build_preset(build_conv_encoder, "wav2vec2_base", {**BASE, **CONV_BASE}, overrides)


@ENCODERS.register
def wav2vec2_large(**overrides: Any) -> AudioEncoder:
    return build_preset(
        build_conv_encoder, "wav2vec2_large", {**LARGE, **CONV_LARGE, "conv_bias": True}, overrides
    )


@ENCODERS.register
def hubert_tiny(**overrides: Any) -> AudioEncoder:
    return build_preset(build_conv_encoder, "hubert_tiny", {**TINY, **CONV_TINY}, overrides)


@ENCODERS.register
def hubert_base(**overrides: Any) -> AudioEncoder:
    return build_preset(build_conv_encoder, "hubert_base", {**BASE, **CONV_BASE}, overrides)


@ENCODERS.register
def hubert_large(**overrides: Any) -> AudioEncoder:
    return build_preset(build_conv_encoder, "hubert_large", {**LARGE, **CONV_LARGE}, overrides)


@ENCODERS.register
def wavlm_tiny(**overrides: Any) -> AudioEncoder:
    return build_preset(build_conv_encoder, "wavlm_tiny", {**TINY, **CONV_TINY, **WAVLM}, overrides)


@ENCODERS.register
def wavlm_base(**overrides: Any) -> AudioEncoder:
    return build_preset(build_conv_encoder, "wavlm_base", {**BASE, **CONV_BASE, **WAVLM}, overrides)


@ENCODERS.register
def wavlm_large(**overrides: Any) -> AudioEncoder:
    return build_preset(build_conv_encoder, "wavlm_large", {**LARGE, **CONV_LARGE, **WAVLM}, overrides)


@ENCODERS.register
def data2vec_tiny(**overrides: Any) -> AudioEncoder:
    defaults = {**TINY, **CONV_TINY, **DATA2VEC, "pos_conv_kernel": 5, "pos_conv_groups": 4}
    return build_preset(build_conv_encoder, "data2vec_tiny", defaults, overrides)


@ENCODERS.register
def data2vec_base(**overrides: Any) -> AudioEncoder:
    return build_preset(build_conv_encoder, "data2vec_base", {**BASE, **CONV_BASE, **DATA2VEC}, overrides)


@ENCODERS.register
def data2vec_large(**overrides: Any) -> AudioEncoder:
    return build_preset(build_conv_encoder, "data2vec_large", {**LARGE, **CONV_LARGE, **DATA2VEC}, overrides)


@ENCODERS.register
def fbank_tiny(**overrides: Any) -> AudioEncoder:
    defaults = {**TINY, "pos_conv_kernel": 16, "pos_conv_groups": 4}
    return build_preset(build_fbank_encoder, "fbank_tiny", defaults, overrides)


@ENCODERS.register
def fbank_small(**overrides: Any) -> AudioEncoder:
    defaults = {**SMALL, "pos_conv_kernel": 32, "pos_conv_groups": 16}
    return build_preset(build_fbank_encoder, "fbank_small", defaults, overrides)


@ENCODERS.register
def fbank_base(**overrides: Any) -> AudioEncoder:
    return build_preset(build_fbank_encoder, "fbank_base", BASE, overrides)


@ENCODERS.register
def fbank_large(**overrides: Any) -> AudioEncoder:
    return build_preset(build_fbank_encoder, "fbank_large", LARGE, overrides)


# CPC sizes: base is CPC's (512 conv channels, one GRU of 256 units); large widens the context
CPC_TINY = dict(channels=32, context_dim=32, context_layers=2)
CPC_BASE = dict(channels=512, context_dim=256, context_layers=1)
CPC_LARGE = dict(channels=512, context_dim=512, context_layers=2)


@ENCODERS.register
def cpc_tiny(**overrides: Any) -> CPCEncoder:
    return build_preset(build_cpc_encoder, "cpc_tiny", CPC_TINY, overrides)


@ENCODERS.register
def cpc_base(**overrides: Any) -> CPCEncoder:
    return build_preset(build_cpc_encoder, "cpc_base", CPC_BASE, overrides)


@ENCODERS.register
def cpc_large(**overrides: Any) -> CPCEncoder:
    return build_preset(build_cpc_encoder, "cpc_large", CPC_LARGE, overrides)
