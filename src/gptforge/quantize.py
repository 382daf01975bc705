"""int8 weight-only quantization of the linear layers, for faster generation on the CPU."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from gptforge.generate import plain_linears
from gptforge.model import GPTModel


def quantize_int8(model: GPTModel) -> GPTModel:
    """Return a copy of the model with its linear layers stored as int8 (dynamic quantization).

    Weights are quantized per tensor once; activations are quantized on the fly at each
    call. Halves to quarters the bytes read per generated token, which is what bounds
    CPU decoding speed. The result is for inference only, on the CPU; the model given
    is moved to the CPU and put in eval mode, and is otherwise left as it was.
    """
    model = model.to("cpu").eval()
    # PyTorch's quantization swaps exact nn.Linear layers only, so layers that
    # generation put in the decode layout become plain ones first (in the copy).
    copied = plain_linears(copy.deepcopy(model))
    with warnings.catch_warnings():
        # PyTorch marks torch.ao.quantization deprecated in favour of the torchao package.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copied, {nn.Linear}, dtype=torch.qint8, inplace=True)
