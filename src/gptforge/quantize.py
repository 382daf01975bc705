"""int8 weight-only quantization of the linear layers, for faster generation on the CPU.

Decoding one token reads every weight once, so its speed on the CPU is how fast the
weights stream from memory; int8 weights are a quarter of the bytes of float32 ones.
`quantize_int8` stores each linear layer's weight (the output head's too) as int8 with
one float32 scale per output channel, and computes with PyTorch's weight-only int8
kernel, `torch.ops.aten._weight_int8pack_mm` (the one torchao's CPU int8 path calls).
Embeddings and norms stay as they are: a lookup reads one row per token, a negligible
share of the bytes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.decoder import DecoderModel
from gptforge.errors import BadInputError
from gptforge.model import GPTModel

# The kernel's activations: its float32 path is a plain loop many times slower than its
# bfloat16 one, and bfloat16 rounding of the inputs costs less than int8 weights do.
_KERNEL_DTYPE = torch.bfloat16


def per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of an [out, in] weight and its scales, one per output row.

    `codes[o, i] * scales[o]` approximates `weight[o, i]` to within half a scale, so a
    row of large values costs precision in that row only. The scales are float32 values
    that bfloat16 holds exactly (the kernel takes them in the activations' dtype).
    Returns (int8 [out, in] contiguous, float32 [out]).
    """
    w = weight.detach().to("cpu", torch.float32)
    scales = w.abs().amax(dim=1).clamp(min=1e-30) / 127  # (out,)
    # Rounded up to the nearest bfloat16, so the kernel takes them exactly and the codes
    # still fit in [-127, 127]: clear the 16 low bits of the float32, carrying up.
    bits = scales.view(torch.int32)
    scales = ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return codes, scales


class Int8Linear(nn.Module):
    """A linear layer for inference whose weight is int8 with one scale per output channel.

    The forward pass on the CPU runs any number of rows (one token or a batch of them
    while decoding, a whole prompt while prefilling) through PyTorch's weight-only int8
    kernel, which reads the one-byte weight directly; the inputs go in as bfloat16, the
    output comes back in the input's dtype, with the bias added in float32.
    Elsewhere, and for inputs that need gradients, the weight is expanded to the input's
    dtype for `F.linear`. There are no parameters: `weight` (int8), `scales` and `bias`
    are buffers, in the state dict under those names, so a quantized model's state dict
    loads into another quantized model. `train(True)` is refused: int8 layers are for
    inference; train the float model and quantize it again.
    """

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        codes, scales = per_channel_int8(layer.weight)
        self.register_buffer("weight", codes)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) float32
        bias = None if layer.bias is None else layer.bias.detach().to("cpu", torch.float32).clone()
        self.register_buffer("bias", bias)
        # The same values in the kernel's dtype (exactly: see per_channel_int8).
        self.register_buffer("_kernel_scales", scales.to(_KERNEL_DTYPE), persistent=False)
        self.training = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._kernel_scales = self.scales.to(_KERNEL_DTYPE)  # follows the loaded scales

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, int8 per-channel"

    def train(self, mode: bool = True) -> Int8Linear:
        if mode:
            raise BadInputError("an int8-quantized model is for inference only; train the float model "
                                "and call quantize_int8 on it again")
        return super().train(False)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the int8 codes stand for, [out, in] in `dtype`."""
        return (self.weight.to(torch.float32) * self.scales[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.requires_grad:
            bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
            return F.linear(x, self.dequantized(x.dtype).to(x.device), bias)
        rows = x.reshape(-1, self.in_features).to(_KERNEL_DTYPE).contiguous()  # (N, in)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self._kernel_scales)  # (N, out) bfloat16
        if self.bias is not None:
            y = torch.add(self.bias, y)  # float32: one operation adds and widens
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def quantize_int8(model: GPTModel | DecoderModel) -> GPTModel | DecoderModel:
    """Return a copy of the model with every linear layer as an `Int8Linear`.

    Every nn.Linear (and `DecodeLinear`) is replaced, the output head included, also
    when it shares its weight with the token embedding (the embedding keeps the float
    weight, the head gets an int8 copy). Weights are quantized once, with one scale per
    output channel; the rest of the model (embeddings, norms) keeps its dtype. The
    result is for inference only, on the CPU, in eval mode; the model given is moved to
    the CPU and put in eval mode, and is otherwise left as it was.
    """
    model = model.to("cpu").eval()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    # The copy leaves the linear weights behind (they are quantized from the original),
    # so quantizing never holds two float copies of them; a weight tied to another
    # module (the token embedding) is copied with that module.
    others = {id(p) for m in model.modules() if not isinstance(m, nn.Linear)
              for p in m.parameters(recurse=False)}
    memo = {id(m.weight): None for m in linears.values() if id(m.weight) not in others}
    copied = copy.deepcopy(model, memo)
    for name, module in list(copied.named_modules()):
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                source = linears[f"{name}.{child_name}" if name else child_name]
                setattr(module, child_name, Int8Linear(source))
    return copied.eval()
