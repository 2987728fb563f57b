"""Fused Triton kernels for glm-image, each with its torch reference twin (``*_reference``).

The twins are the reference maths of the engine, not copies of it: ``glm_image.ops.TorchOps``
(the ``sdpa`` backend) binds them as its ops, and each twin's docstring is the op's contract
(shapes, masks, dtypes, formula). ``attention_reference`` is the one op without a kernel (prefill
and joint attention stay torch SDPA). One module per kernel family; every entry point takes
torch tensors, checks shapes, launches, and returns what its twin returns:

- ``decode_attention``: flash-decoding over the static KV cache, GQA, split-K (``flash_decoding``)
- ``window_attention``: the same for W queries per row, causal with per-row offsets: a Jacobi
  window (``window_attention``)
- ``rotary_``: M-RoPE applied in place to q and k heads (``rotary``)
- ``rms_norm``, ``add_rms_norm``: RMSNorm, and residual add + sandwich norms in one pass (``residual_norm``)
- ``layer_norm_modulate``: LayerNorm + AdaLN scale/shift (``adaln``)
- ``qk_norm_rope``: QK LayerNorm + 2D RoPE + transpose for the DiT (``dit_qk``)
- ``quant_linear``: weight-only int8 / int4 decode GEMM for 1 to ``MAX_QUANT_ROWS`` (128) rows,
  each weight tile read once per row block (``quant_linear``), with ``QuantWeight``, the
  quantized weight formats its twin dequantizes
- ``quantize_rows``, ``scale_int32``: per-token int8 / fp8 activation codes in one pass, and the
  int8 W8A8 GEMM's scaling epilogue (``act_quant``)

Importing never needs Triton (the twins are plain torch); calling a kernel does. Kernels run on
CUDA tensors, or on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
this package was imported (``interpreted()``). The package never imports ``glm_image``: imports
point from the ops layer to the kernels, not back.
"""

from ._triton import HAVE_TRITON, interpreted
from .act_quant import quantize_rows, quantize_rows_reference, scale_int32, scale_int32_reference
from .adaln import layer_norm_modulate, layer_norm_modulate_reference
from .dit_qk import qk_norm_rope, qk_norm_rope_reference
from .flash_decoding import (
    attention_reference,
    decode_attention,
    decode_attention_plan,
    decode_attention_reference,
    default_split_size,
)
from .quant_linear import MAX_ROWS as MAX_QUANT_ROWS
from .quant_linear import QuantWeight, quant_linear, quant_linear_reference, unpack_int4
from .residual_norm import MAX_DIM as MAX_NORM_DIM
from .residual_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from .rotary import rotary_, rotary_reference_
from .window_attention import (
    MAX_WINDOW,
    window_attention,
    window_attention_plan,
    window_attention_reference,
    window_mask,
)

__all__ = [
    "HAVE_TRITON",
    "MAX_NORM_DIM",
    "MAX_QUANT_ROWS",
    "MAX_WINDOW",
    "QuantWeight",
    "add_rms_norm",
    "add_rms_norm_reference",
    "attention_reference",
    "decode_attention",
    "decode_attention_plan",
    "decode_attention_reference",
    "default_split_size",
    "interpreted",
    "layer_norm_modulate",
    "layer_norm_modulate_reference",
    "qk_norm_rope",
    "qk_norm_rope_reference",
    "quant_linear",
    "quant_linear_reference",
    "quantize_rows",
    "quantize_rows_reference",
    "rms_norm",
    "rms_norm_reference",
    "rotary_",
    "rotary_reference_",
    "scale_int32",
    "scale_int32_reference",
    "unpack_int4",
    "window_attention",
    "window_attention_plan",
    "window_attention_reference",
    "window_mask",
]
