"""The encoder of DeCoAR 2.0 (Ling and Liu, 2020; the objective is ``mmssl.objectives.decoar2``):
80 log mels normalised per utterance, every second frame kept (50 Hz), a linear projection with
input dropout, and a wav2vec 2.0 transformer (convolutional positions, post-LN, LayerDrop).

Its shape is the released model's (awslabs/speech-representations ``models/decoar2.py``, read
again by s3prl ``upstream/decoar2``): ``post_extract_proj`` ``Linear(80, 768)`` with no
LayerNorm before it, ``dropout_input`` 0.1, then fairseq's wav2vec 2.0 ``TransformerEncoder`` with
12 layers of 768, 12 heads, FFN 3072, ``conv_pos`` 128 in 16 groups, dropout 0.1, attention
dropout 0.1, ``encoder_layerdrop`` 0.05, ``layer_norm_first`` False. It is an
``AudioEncoder`` that masks its input (``mask_input``): the learned ``mask_embedding`` is a
log-mel frame put on masked frames before the projection, as the first author's fairseq code
masks (``mask_emb`` of 80 values; the released model leaves it out), in pretraining as in
``mmssl finetune-asr``.

Shape legend: B batch, T frames (50 Hz), M mel bins, C model dim.
"""

from __future__ import annotations

from typing import Any

from mmssl.encoders.audio import AudioEncoder, FeatureProjection
from mmssl.nn import transformer as tr
from mmssl.nn.reconstruction import LogMelFrontend, SubsampledLogMelFrontend

# the released model's transformer (module docstring); TransformerOptions' defaults plus LayerDrop
DECOAR2_TRANSFORMER = tr.TransformerOptions(layer_drop=0.05)


def build_decoar2_encoder(
    transformer: tr.TransformerOptions = DECOAR2_TRANSFORMER,
    num_mel_bins: int = 80,
    frame_skip: int = 2,
    input_dropout: float = 0.1,
    **transformer_fields: Any,
) -> AudioEncoder:
    """Normalised log mels, every ``frame_skip``-th 10 ms frame kept (``1``: all of them,
    100 Hz) -> linear projection (no LayerNorm) and input dropout -> transformer.
    ``transformer_fields`` change fields of ``transformer`` (``dim=64, num_layers=2``), as
    ``mmssl.encoders.audio.build_fbank_encoder``'s. Defaults: the released DeCoAR 2.0 model."""
    options = transformer.replace(**transformer_fields)
    frontend = SubsampledLogMelFrontend(LogMelFrontend(num_mel_bins, normalize="utterance"), frame_skip)
    layers = options.build()
    projection = FeatureProjection(frontend.out_dim, options.dim, input_dropout, norm=False)
    return AudioEncoder(frontend, projection, layers, mask_input=True)
