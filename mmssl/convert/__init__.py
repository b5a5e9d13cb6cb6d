"""Import checkpoints from torchaudio, fairseq and Hugging Face into mmssl encoders."""

from mmssl.convert.torchaudio import from_torchaudio, torchaudio_state_dict

__all__ = ["from_torchaudio", "torchaudio_state_dict"]
