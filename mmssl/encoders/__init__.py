"""Encoders. Each module registers its presets in ``mmssl.registry.ENCODERS`` on import;
add new modules to the explicit import list below.

Two kinds, declared in ``mmssl.encoders.base``: ``SpeechEncoder`` (``audio.py``: conv or
filterbank frontend + transformer, CPC's causal encoder; ``recurrent.py``: APC's and DeCoAR's
LSTMs; ``mockingjay.py``: Mockingjay / TERA; ``decoar2.py``: DeCoAR 2.0's log-mel transformer;
``autoencoder.py``: the frame autoencoders) and ``AudioVisualEncoder`` (``av.py``, with
``video.py``'s lip encoder and ``fusion.py``), plus the open_clip towers of ``image.py`` and
``text.py``. :func:`build_family` builds a preset by family and model size, the way objectives
pick their encoders.
"""

from typing import Any

import mmssl.encoders.audio  # noqa: F401  (registers the speech encoder presets)
import mmssl.encoders.av  # noqa: F401  (registers the audio-visual presets av_*)
import mmssl.encoders.image  # noqa: F401  (registers the open_clip image towers clip_image_*)
import mmssl.encoders.text  # noqa: F401  (registers the open_clip text towers clip_text_*)
from mmssl.encoders.base import AudioVisualEncoder, EncoderOutput, Features, FrameSpec, SpeechEncoder
from mmssl.errors import ConfigError
from mmssl.registry import ENCODERS

__all__ = ["AudioVisualEncoder", "EncoderOutput", "Features", "FrameSpec", "SpeechEncoder", "build_family"]


def build_family(
    family: str,
    size: str,
    overrides: dict[str, Any] | None = None,
    feature_grad_mult: float | None = None,
    what: str | None = None,
) -> Any:
    """The registered encoder preset ``<family>_<size>`` with keyword ``overrides``.

    ``feature_grad_mult`` (fairseq's name) sets the encoder's ``feature_grad_scale``, the one
    place the frontend gradient is scaled; None keeps the preset's (0.1 for base and large).
    ``what`` names the option that chose the family, for errors."""
    name = f"{family}_{size}"
    if name not in ENCODERS:
        known = sorted({n.rsplit("_", 1)[0] for n in ENCODERS.names()})
        chosen = f"{what}={family!r}, " if what else ""
        raise ConfigError(
            f"{chosen}model.size={size!r}: there is no encoder preset {name!r} (families: {', '.join(known)})"
        )
    overrides = dict(overrides or {})
    if feature_grad_mult is not None:
        overrides["feature_grad_scale"] = feature_grad_mult
    return ENCODERS.build(name, **overrides)
