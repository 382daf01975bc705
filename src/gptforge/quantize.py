"""int8 weight-only quantization of the linear layers, for faster generation on the CPU."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from gptforge.model import GPTModel


def quantize_int8(model: GPTModel) -> GPTModel:
    """Return the model with its nn.Linear layers stored as int8 (dynamic quantization).

    Weights are quantized per tensor once; activations are quantized on the fly at each
    call. Halves to quarters the bytes read per generated token, which is what bounds
    CPU decoding speed. The result is for inference only, on the CPU.
    """
    model = model.to("cpu").eval()
    with warnings.catch_warnings():
        # PyTorch marks torch.ao.quantization deprecated in favour of the torchao package.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        quantized = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return quantized
