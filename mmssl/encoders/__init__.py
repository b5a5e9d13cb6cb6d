"""Encoders. Each module registers its presets in ``mmssl.registry.ENCODERS`` on import;
add new modules to the explicit import list below."""

from mmssl.encoders.base import EncoderOutput, Features, FrameSpec, SpeechEncoder

__all__ = ["EncoderOutput", "Features", "FrameSpec", "SpeechEncoder"]
