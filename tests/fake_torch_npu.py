"""A fake ``torch_npu`` for CPU tests: the documented contracts of the fused operators that the
``npu`` backend calls, in plain torch.

torch_npu cannot be imported without the CANN toolkit, so the backend is tested against this
emulation. It is written from the torch_npu / CANN documentation, not from
``glm_image.ops``: where the two disagree, the backend is wrong. Each function states its
source. What the documentation fixes is enforced the way the real op would enforce it (an
error, not a silent result): dtypes, layouts, shapes, contiguity where it is required. What the
backend does not use (quantisation, page attention, pse_shift, sparse modes, interleaved rotary)
raises NotImplementedError, so a backend that starts relying on it fails loudly here first.

Sources (the Ascend op-plugin documentation of each operator and the Ascend PyTorch API
reference, 6.0.0 to 7.x, hiascend.com "torch_npu.npu_*" pages):

- npu_fused_infer_attention_score: query fp16/bf16, no strided tensors; input_layout "BSH" by
  default, also "BSND", "BNSD"; ``scale`` defaults to 1.0 (torch_npu 6.0.x names it
  ``scale_value``, see ``make_module``); atten_mask bool/int8/uint8 where 1 = the position does
  not take part; num_key_value_heads 0 = as many as query heads, else a divisor of num_heads
  (ratio <= 64) equal to the N axis of key/value (which query heads share a KV head is not
  spelled out; emulated as the standard GQA grouping, query head h -> KV head h // (N / KV),
  as in torch's SDPA enable_gqa and transformers' repeat_kv); actual_seq_lengths_kv: the
  effective KV length per batch (one value: every batch), slots past it are not read;
  outputs (attention_out in query's layout, softmax_lse).
- npu_rms_norm(self, gamma, epsilon=1e-06) -> (y, rstd); npu_add_rms_norm(x1, x2, gamma,
  epsilon=1e-06) -> (y, rstd, x) with x = x1 + x2 (the AddRmsNorm proto in CANN's ops-math, and
  op-plugin's own test of npu_add_rms_norm).
- npu_rotary_mul(input, r1, r2, rotary_mode='half'): ``r1 * x + r2 * cat(-x2, x1)``.
- npu_swiglu(input, dim=-1): ``A * sigmoid(A) * B``, A the first half along ``dim``.
"""

from __future__ import annotations

import importlib.machinery
import inspect
import sys
import types

import torch

__all__ = ["install", "make_module", "reference_attention"]

_INT_MAX = 2147483647
_HALF = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_MASK_DTYPES = (torch.bool, torch.int8, torch.uint8)

# Documented keyword arguments of npu_fused_infer_attention_score that the emulation does not
# implement: accepted only at their defaults (None / 0 / False).
_FIA_NOT_EMULATED = (
    "dequant_scale1",
    "quant_scale1",
    "dequant_scale2",
    "quant_scale2",
    "quant_offset2",
    "antiquant_scale",
    "antiquant_offset",
    "block_table",
    "query_padding_size",
    "kv_padding_size",
    "key_antiquant_scale",
    "key_antiquant_offset",
    "value_antiquant_scale",
    "value_antiquant_offset",
    "key_shared_prefix",
    "value_shared_prefix",
    "actual_shared_prefix_len",
    "query_rope",
    "key_rope",
    "key_rope_antiquant_scale",
    "antiquant_mode",
    "key_antiquant_mode",
    "value_antiquant_mode",
)
_DOCUMENTED_LAYOUTS = (
    *("BSH", "BSND", "BNSD", "BNSD_BSND", "BSH_NBSD", "BSND_NBSD", "BNSD_NBSD"),
    *("TND", "TND_NTD", "NTD_TND"),
)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def _to_bnsd(x: torch.Tensor, layout: str, heads: int, name: str) -> torch.Tensor:
    """(B, N, S, D) view of a query/key/value given in ``layout`` with ``heads`` heads."""
    if layout == "BSH":
        _require(x.dim() == 3 and x.shape[-1] % heads == 0, f"{name}: BSH needs (B, S, H), H a multiple of N")
        b, s, h = x.shape
        return x.view(b, s, heads, h // heads).transpose(1, 2)
    _require(x.dim() == 4, f"{name}: {layout} needs a 4-D tensor, got {tuple(x.shape)}")
    x = x.transpose(1, 2) if layout == "BSND" else x
    _require(x.shape[1] == heads, f"{name}: N axis is {x.shape[1]}, the head count given is {heads}")
    return x


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BSH":
        return x.transpose(1, 2).flatten(2).contiguous()
    return x.transpose(1, 2).contiguous() if layout == "BSND" else x.contiguous()


def _blocked(mask: torch.Tensor, b: int, q_s: int, kv_s: int) -> torch.Tensor:
    """atten_mask -> (B or 1, 1, Q_S, KV_S) bool, True = masked out, in its documented shapes.

    Q_S > 1: (Q_S, KV_S), (B|1, Q_S, KV_S), (B|1, 1, Q_S, KV_S). Q_S = 1: (B, KV_S),
    (B, 1, KV_S), (B, 1, 1, KV_S). The S axes may be padded up to an aligned length.
    """
    _require(mask.dtype in _MASK_DTYPES, f"atten_mask dtype {mask.dtype} is not bool, int8 or uint8")
    shape = tuple(mask.shape)
    if q_s > 1:
        if mask.dim() == 2:
            mask = mask[None, None]
        elif mask.dim() == 3:
            mask = mask[:, None]
        _require(mask.dim() == 4 and mask.shape[1] == 1, f"atten_mask shape {shape} has no documented form")
    else:
        documented = mask.dim() in (2, 3, 4) and all(size == 1 for size in mask.shape[1:-1])
        _require(documented, f"atten_mask shape {shape} has no documented form for Q_S = 1")
        mask = mask.view(mask.shape[0], 1, 1, mask.shape[-1])
    _require(mask.shape[0] in (1, b), f"atten_mask batch {mask.shape[0]} is neither 1 nor {b}")
    _require(mask.shape[2] >= q_s and mask.shape[3] >= kv_s, f"atten_mask {shape} is smaller than the scores")
    return mask[:, :, :q_s, :kv_s] != 0


def npu_fused_infer_attention_score(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    pse_shift: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None,
    actual_seq_lengths: list[int] | None = None,
    actual_seq_lengths_kv: list[int] | None = None,
    num_heads: int = 1,
    scale: float = 1.0,
    pre_tokens: int = _INT_MAX,
    next_tokens: int = _INT_MAX,
    input_layout: str = "BSH",
    num_key_value_heads: int = 0,
    sparse_mode: int = 0,
    inner_precise: int = 0,
    block_size: int = 0,
    softmax_lse_flag: bool = False,
    **not_emulated,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * Q K^T, masked) V per head, as documented (see the module docstring)."""
    for name, value_ in not_emulated.items():
        if name not in _FIA_NOT_EMULATED:
            raise TypeError(f"npu_fused_infer_attention_score() got an unexpected keyword argument {name!r}")
        if value_ not in (None, 0, False):
            raise NotImplementedError(f"{name} is not emulated")
    if pse_shift is not None:
        raise NotImplementedError("pse_shift is not emulated")
    if block_size:
        raise NotImplementedError("page attention is not emulated")
    if input_layout not in ("BSH", "BSND", "BNSD"):
        if input_layout in _DOCUMENTED_LAYOUTS:
            raise NotImplementedError(f"input_layout {input_layout!r} is not emulated")
        raise RuntimeError(f"input_layout {input_layout!r} is not supported")
    _require(query.dtype in _HALF, f"query dtype {query.dtype} is not supported (float16, bfloat16)")
    _require(key.dtype == query.dtype and value.dtype == query.dtype, "key/value dtype differs from query")
    for name, t in (("query", query), ("key", key), ("value", value), ("atten_mask", atten_mask)):
        _require(t is None or t.is_contiguous(), f"{name}: non-contiguous tensors are not supported")
    _require(key.shape == value.shape, "key and value shapes differ")

    kv_heads = num_key_value_heads or num_heads
    _require(num_heads % kv_heads == 0, f"num_heads {num_heads} is not a multiple of {kv_heads}")
    _require(num_heads // kv_heads <= 64, "num_heads / num_key_value_heads is over 64")
    q = _to_bnsd(query, input_layout, num_heads, "query")
    k = _to_bnsd(key, input_layout, kv_heads, "key")
    v = _to_bnsd(value, input_layout, kv_heads, "value")
    b, n, q_s, d = q.shape
    kv_s = k.shape[2]
    _require(k.shape[0] == b and k.shape[3] == d, "key batch/head_dim differ from query")
    _require(b <= 65536 and n <= 256 and d <= 512, "B <= 65536, N <= 256, D <= 512")
    if q_s > 1:
        _require(d % 16 == 0, f"D = {d}: float16/bfloat16 inputs need D aligned to 16 when Q_S > 1")
        if actual_seq_lengths is not None:
            raise NotImplementedError("actual_seq_lengths with Q_S > 1 is not emulated")
        if sparse_mode != 0:
            raise NotImplementedError(f"sparse_mode {sparse_mode} is not emulated")
        if atten_mask is not None and (pre_tokens, next_tokens) != (_INT_MAX, _INT_MAX):
            raise NotImplementedError("pre_tokens/next_tokens bands are not emulated")
    else:
        _require(kv_s <= 262144, "KV_S <= 262144 when Q_S = 1")

    k, v = k.float(), v.float()
    blocked = torch.zeros(1, 1, q_s, kv_s, dtype=torch.bool)
    if atten_mask is not None:
        blocked = blocked | _blocked(atten_mask, b, q_s, kv_s)
    if actual_seq_lengths_kv is not None:
        lengths = list(actual_seq_lengths_kv)
        _require(len(lengths) == 1 or len(lengths) >= b, "actual_seq_lengths_kv: give 1 or >= B values")
        lengths = (lengths * b)[:b] if len(lengths) == 1 else lengths[:b]
        _require(all(0 <= x <= kv_s for x in lengths), "actual_seq_lengths_kv exceeds the KV length")
        past = torch.arange(kv_s)[None, :] >= torch.tensor(lengths)[:, None]  # (B, KV_S)
        # The kernel does not read slots past the effective length: their contents cannot matter.
        k = k.masked_fill(past[:, None, :, None], 0)
        v = v.masked_fill(past[:, None, :, None], 0)
        blocked = blocked | past[:, None, None, :]
    group = n // kv_heads  # query head h reads KV head h // group (grouped-query attention)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(blocked, float("-inf"))
    probs = scores.softmax(dim=-1)
    if inner_precise in (2, 3):  # "row-invalid correction": a fully masked row gives zeros
        probs = probs.nan_to_num(0.0)
    out = _from_bnsd((probs @ v).to(query.dtype), input_layout)
    lse = scores.logsumexp(dim=-1, keepdim=True) if softmax_lse_flag else torch.zeros(1)
    return out, lse


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """The textbook formula on (B, N, S, D) float tensors, heads grouped as GQA; for tests."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if blocked is not None:
        scores = scores.masked_fill(blocked, float("-inf"))
    return scores.softmax(-1) @ v.float()


def _norm_dtypes(*tensors: torch.Tensor) -> None:
    dtype = tensors[0].dtype
    _require(dtype in _FLOATS, f"dtype {dtype} is not supported (float16, bfloat16, float32)")
    _require(all(t.dtype == dtype for t in tensors), "all inputs must share one dtype")


def _rms(x: torch.Tensor, gamma: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    _require(2 <= x.dim() <= 8, f"input of {x.dim()} dims (2-8 supported)")
    _require(tuple(gamma.shape) == tuple(x.shape[x.dim() - gamma.dim() :]), "gamma must match the last dims")
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    rstd = torch.rsqrt(x.float().pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (x.float() * rstd * gamma.float()).to(x.dtype), rstd


def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06):
    """(y, rstd): y = x / sqrt(mean(x^2) + eps) * gamma over gamma's dims; rstd float32."""
    _norm_dtypes(self, gamma)
    return _rms(self, gamma, epsilon)


def npu_add_rms_norm(x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06):
    """(y, rstd, x) with x = x1 + x2 (in the inputs' dtype) and y = rms_norm(x) * gamma."""
    _norm_dtypes(x1, x2, gamma)
    _require(x1.shape == x2.shape, "x1 and x2 shapes differ")
    x = x1 + x2
    y, rstd = _rms(x, gamma, epsilon)
    return y, rstd, x


def _rotary_layout(x: torch.Tensor, r: torch.Tensor) -> tuple[int, int] | None:
    """The (B, N) sizes of ``x`` under the first layout whose documented r1/r2 form ``r`` has."""
    a, b_, c, _ = x.shape
    forms = {  # layout: (B, N, allowed r1 shapes without D)
        "BNSD": (a, b_, {(1, 1, c), (a, 1, c), (a, b_, c)}),
        "BSND": (a, c, {(1, b_, 1), (a, b_, 1), (a, b_, c)}),
        "SBND": (b_, c, {(a, 1, 1), (a, b_, 1), (a, b_, c)}),
    }
    for batch, heads, shapes in forms.values():
        if tuple(r.shape[:3]) in shapes:
            return batch, heads
    return None


def npu_rotary_mul(input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half"):
    """half mode: ``r1 * x + r2 * cat(-x2, x1)`` with x1, x2 the halves of the last dim."""
    if rotary_mode == "interleave":
        raise NotImplementedError("rotary_mode 'interleave' is not emulated")
    _require(rotary_mode == "half", f"rotary_mode {rotary_mode!r} is not half or interleave")
    _norm_dtypes(input, r1, r2)
    _require(input.dim() == 4 and r1.dim() == 4 and r2.shape == r1.shape, "input, r1, r2 must be 4-D")
    d = input.shape[-1]
    _require(d % 2 == 0 and d < 896 and r1.shape[-1] == d, f"D = {d} must be even, < 896, shared by r1/r2")
    sizes = _rotary_layout(input, r1)
    _require(
        sizes is not None, f"r1 shape {tuple(r1.shape)} fits no BNSD/BSND/SBND form of {tuple(input.shape)}"
    )
    _require(sizes[0] < 1000 and sizes[1] < 1000, "B and N must be below 1000")
    x = input.float()
    x1, x2 = x.chunk(2, dim=-1)
    return (r1.float() * x + r2.float() * torch.cat((-x2, x1), dim=-1)).to(input.dtype)


def npu_swiglu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``A * sigmoid(A) * B`` with A, B the first and second halves of ``input`` along ``dim``."""
    _norm_dtypes(input)
    _require(input.is_contiguous(), "non-contiguous tensors are not supported")
    _require(1 <= input.dim() <= 8 and -input.dim() <= dim < input.dim(), "1-8 dims, dim in range")
    _require(input.shape[dim] % 2 == 0, f"size {input.shape[dim]} along dim {dim} is not even")
    a, b = input.float().chunk(2, dim=dim)
    return (a * torch.sigmoid(a) * b).to(input.dtype)


def _schema_signature(fn):
    """The real op's schema names every argument (no ``**kwargs``); so does this stand-in's
    signature, with the not-emulated arguments as keywords defaulting to None."""
    signature = inspect.signature(fn)
    named = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in _FIA_NOT_EMULATED]
    fn.__signature__ = signature.replace(parameters=named + extra)
    return fn


_schema_signature(npu_fused_infer_attention_score)


def _with_scale_value(fia):
    """torch_npu 6.0.x's signature: the scale is ``scale_value`` (hiascend.com Pytorch/600 API)."""

    def npu_fused_infer_attention_score(query, key, value, *, scale_value: float = 1.0, **kwargs):
        if "scale" in kwargs:
            raise TypeError("npu_fused_infer_attention_score() got an unexpected keyword argument 'scale'")
        return fia(query, key, value, scale=scale_value, **kwargs)

    signature = inspect.signature(fia)
    parameters = [
        p.replace(name="scale_value") if p.name == "scale" else p for p in signature.parameters.values()
    ]
    npu_fused_infer_attention_score.__signature__ = signature.replace(parameters=parameters)
    return npu_fused_infer_attention_score


def make_module(*, scale_argument: str = "scale", omit: tuple[str, ...] = ()) -> types.ModuleType:
    """A fresh fake ``torch_npu``. ``scale_argument``: "scale" (7.x) or "scale_value" (6.0.x);
    ``omit``: op names this "version" lacks."""
    module = types.ModuleType("torch_npu")
    module.__file__ = __file__
    # Libraries probe for torch_npu with importlib.util.find_spec, which needs a spec once the
    # module sits in sys.modules; they then look for torch.npu, which the fake does not add.
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)
    ops = {
        "npu_fused_infer_attention_score": npu_fused_infer_attention_score,
        "npu_rms_norm": npu_rms_norm,
        "npu_add_rms_norm": npu_add_rms_norm,
        "npu_rotary_mul": npu_rotary_mul,
        "npu_swiglu": npu_swiglu,
    }
    if scale_argument == "scale_value":
        ops["npu_fused_infer_attention_score"] = _with_scale_value(npu_fused_infer_attention_score)
    for name, fn in ops.items():
        if name not in omit:
            setattr(module, name, fn)
    return module


def install(monkeypatch, module: types.ModuleType | None = None) -> types.ModuleType:
    """Put a fake ``torch_npu`` where ``glm_image.device.npu_module`` imports it from."""
    from glm_image.device import npu_module

    module = module or make_module()
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    npu_module.cache_clear()
    return module
