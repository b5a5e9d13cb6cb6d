"""Cheaper spoken queries on a CPU: the model's linear layers in int8 (``mmssl serve --quantize``)."""

from __future__ import annotations

import warnings

import torch


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every ``nn.Linear`` replaced by PyTorch's dynamically quantized int8
    linear (weights int8 per tensor, activations quantized per call; fbgemm/x86 kernels, CPU
    only). For queries on a CPU: the small model's speech encoder costs about 40 % less
    (BENCHMARKS.md, "Search service"), and its embedding keeps a cosine above 0.999 with the
    float one the index was made with (tests/serve). PyTorch marks this eager API as moving to
    torchao, whose CPU path needs ``torch.compile``; its deprecation notice is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
