"""Import checkpoints from torchaudio, fairseq and Hugging Face into mmssl encoders."""
