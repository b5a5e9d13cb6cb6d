"""Objectives, one file per method. Each registers its builder in
``mmssl.registry.OBJECTIVES`` on import; add new modules to the explicit import list below."""

import mmssl.objectives.apc  # noqa: F401  (apc)
import mmssl.objectives.av_hubert  # noqa: F401  (av_hubert)
import mmssl.objectives.cca  # noqa: F401  (dcca, soft_cca, dccae)
import mmssl.objectives.cpc  # noqa: F401  (cpc, wav2vec)
import mmssl.objectives.ctc  # noqa: F401  (ctc: fine-tuning for ASR)
import mmssl.objectives.data2vec  # noqa: F401  (data2vec)
import mmssl.objectives.decoar  # noqa: F401  (decoar)
import mmssl.objectives.decoar2  # noqa: F401  (decoar2)
import mmssl.objectives.hubert  # noqa: F401  (hubert, wavlm)
import mmssl.objectives.masked_recon  # noqa: F401  (masked_recon: Mockingjay, TERA)
import mmssl.objectives.multi  # noqa: F401  (multi: several objectives on one encoder)
import mmssl.objectives.multiview_contrastive  # noqa: F401  (multiview_contrastive)
import mmssl.objectives.speech_image  # noqa: F401  (speech_image)
import mmssl.objectives.vqvae  # noqa: F401  (autoencoder, vqvae)
import mmssl.objectives.wav2vec2  # noqa: F401  (wav2vec2)
from mmssl.objectives.base import Objective

__all__ = ["Objective"]
