"""The rates of the batch contract (DESIGN.md, "Contracts every part keeps"), defined once:
waveforms at 16 kHz, lip video at 25 frames per second."""

SAMPLE_RATE = 16_000  # Hz: every waveform in a batch, whatever rate its file had
VIDEO_FPS = 25.0  # frames per second of lip video (LRS3, AV-HuBERT)
