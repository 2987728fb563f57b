"""The quantized linear layer, and which linear layers of each model are quantized.

``QuantLinear`` replaces an ``nn.Linear`` while the loader reads its weight (``weights.
load_weights(quantize=...)``): the full-precision weight is read, quantized on the device and
dropped, so the full-precision model never sits there. Its forward is ``ops.quant_linear``, the
one dispatch point of the quantized matmuls (``glm_image.ops``). The quantized tensors are
parameters (without gradients), so ``module.parameters()`` counts the bytes a step reads and
``module.to(device)`` moves them.

What stays in full precision (``kept_linears`` lists the linears; embeddings and norms are never
quantized):

- AR: the token embedding (a lookup, one row per token: quantizing it saves memory, not time),
  every RMSNorm, and the lm_head, whose logits the sampler reads directly (top-p over 16512 image
  codes): 0.8% of the decoder's weights, 1.6% of the bytes an int8 decode step reads on a GPU in
  bf16. (On a CPU in float32 it is 20% of an int8 step's time, the price of exact logits.)
- DiT: what peers found sensitive (the vLLM-Omni and diffusers quantization studies): the timestep
  and size/crop embedders, the AdaLN modulation of every block (``norm1.linear``: it scales and
  gates the whole residual stream), the prior-token embedding and projector, the glyph and patch
  projectors (the inputs), and ``norm_out`` / ``proj_out`` (the velocity itself).
- ByT5 and the VAE are loaded as they are (small, run once per image).

Quantized: the AR's attention (``qkv_proj``, ``o_proj``) and MLP (``gate_up_proj``,
``down_proj``) of every layer; the DiT's attention (``attn1.qkv``, ``attn1.to_out.0``) and
feed-forward (``ff.net.0.proj``, ``ff.net.2``) of every block: 91.5% of the released AR
decoder's parameters (8.16 of 8.91 billion) and 87.2% of the DiT's (6.04 of 6.93 billion; the
AdaLN modulation alone is 0.76 billion, kept in bf16: 1.5 GB of the int8 DiT's 7.8 GB).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .formats import QuantWeight, quantize, shard_columns

__all__ = ["QuantLinear", "kept_linears", "linear_quantizers", "quantized_linears"]

# per model class: the names of the quantized linears, relative to a layer / block
_QUANTIZED = {
    "ArModel": ("layers", ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")),
    "DitModel": ("transformer_blocks", ("attn1.qkv", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")),
}


# The models whose int8 linears may quantize their activations too where a GEMM path does (W8A8:
# CUDA, more rows than a decode step; ``ops.quant``): the DiT. The AR's stay weight-only: LLM
# activations have outlier channels that per-token int8 rounds coarsely (LLM.int8(), SmoothQuant),
# and its time is decoding, which never takes a W8A8 path.
W8A8_MODELS = ("DitModel",)


class QuantLinear(nn.Module):
    """``y = x @ dequantize(weight)^T + bias`` through ``ops.quant_linear``."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None, ops, *, w8a8: bool = False) -> None:
        super().__init__()
        self.kind, self.group, self.w8a8 = weight.kind, weight.group, w8a8 and weight.kind == "int8"
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.q = nn.Parameter(weight.data, requires_grad=False)
        self.scale = nn.Parameter(weight.scale, requires_grad=False)
        self.zero = nn.Parameter(weight.zero, requires_grad=False) if weight.zero is not None else None
        self.bias = bias
        self.ops = ops
        self.paths: dict = {}  # the path chosen per kind of call (``Ops.quant_linear``'s ``choices``)

    @property
    def weight_q(self) -> QuantWeight:
        return QuantWeight(self.kind, self.q, self.scale, self.zero, self.group, self.w8a8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.quant_linear(x, self.weight_q, self.bias, choices=self.paths)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.kind == "int4" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}{group}, "
            f"bias={self.bias is not None}"
        )


def quantized_linears(model: nn.Module) -> list[str]:
    """The names of the linears of ``model`` (an ``ArModel`` or ``DitModel``) that are quantized."""
    spec = _QUANTIZED.get(type(model).__name__)
    if spec is None:
        return []
    blocks, names = spec
    return [f"{blocks}.{i}.{name}" for i in range(len(getattr(model, blocks))) for name in names]


def kept_linears(model: nn.Module) -> list[str]:
    """The ``nn.Linear`` modules of ``model`` that stay in full precision under any scheme."""
    quantized = set(quantized_linears(model))
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]


def linear_quantizers(
    kind: str,
) -> Callable[[nn.Module], dict[str, Callable[[nn.Linear, torch.Tensor], nn.Module]]] | None:
    """For ``load_model(quantize=...)``: given the model built on ``meta``, each quantized
    linear's name -> what turns its loaded weight into a ``QuantLinear``. None for "none".

    A tensor-parallel rank's row-parallel linear gets the whole weight and the ``columns`` it
    holds: it is quantized whole and cut (``formats.shard_columns``), so each rank's codes and
    scales are the unsharded model's."""
    if kind == "none":
        return None

    def plan(model: nn.Module) -> dict[str, Callable[[nn.Linear, torch.Tensor], nn.Module]]:
        ops = model.ops
        w8a8 = type(model).__name__ in W8A8_MODELS

        def convert(linear: nn.Linear, weight: torch.Tensor, columns: tuple[int, int] | None = None):
            q = quantize(weight, kind) if columns is None else shard_columns(weight, kind, *columns)
            return QuantLinear(q, linear.bias, ops, w8a8=w8a8)

        return dict.fromkeys(quantized_linears(model), convert)

    return plan
