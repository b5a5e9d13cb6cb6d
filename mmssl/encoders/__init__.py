"""Encoders. Each module registers its presets in ``mmssl.registry.ENCODERS`` on import;
add new modules to the explicit import list below."""

import mmssl.encoders.audio  # noqa: F401  (registers the speech encoder presets)
import mmssl.encoders.av  # noqa: F401  (registers the audio-visual presets av_*)
import mmssl.encoders.image  # noqa: F401  (registers the open_clip image towers clip_image_*)
import mmssl.encoders.text  # noqa: F401  (registers the open_clip text towers clip_text_*)
from mmssl.encoders.base import EncoderOutput, Features, FrameSpec, SpeechEncoder

__all__ = ["EncoderOutput", "Features", "FrameSpec", "SpeechEncoder"]
