"""mmssl: self-supervised speech representation learning, alone and with other modalities."""

__version__ = "0.1.0"
