"""The built-in generated corpus: spoken scene descriptions with lip video, and scene images
with five spoken captions each, plus a noise bank (``mmssl synth``)."""

from mmssl.data.synth.corpus import PRESETS, SynthConfig, config_for, generate

__all__ = ["PRESETS", "SynthConfig", "config_for", "generate"]
