"""The ``npu`` backend: torch_npu's fused operators on Ascend NPUs (Atlas 800T A2 / 910B).

HARDWARE-UNVERIFIED. torch_npu cannot be imported without the CANN toolkit, so this backend has
only run against ``tests/fake_torch_npu.py``, an emulation of the *documented* op contracts:
argument names and defaults (the attention scale defaults to 1.0), mask polarity (Ascend: True
= masked out; ours: True = may attend), the BSH/BSND/BNSD layouts, grouped-query heads through
``num_key_value_heads``, ``actual_seq_lengths_kv``, and the documented dtype and shape limits.
What only an NPU can tell: the speed of each op and of the whole engine; that decode attention
(static shapes, no host sync, ``length=None``) really captures into a torch.npu graph or compiles
with torchair; the exact numerics of the fused kernels (accumulation order, bf16/fp16 rounding,
the high-precision/high-performance modes); and what the documentation leaves open, e.g. whether
strided inputs that the docs do not forbid are accepted, or whether a masked key that holds NaN
can leak into the output (the reference ``sdpa`` path leaks it; nothing here relies on it).
On a real NPU the self-check (``Ops.verify``, ``selfcheck``) runs every op below against the
reference before it serves a (device, dtype): an operator whose behaviour departs from its
documentation is switched off for the process, with a warning, instead of trusted.

Where each op comes from (documentation cited at each call):

- ``attention`` / ``decode_attention``: ``npu_fused_infer_attention_score`` in layout BNSD (our
  (B, H, S, D)), GQA through ``num_key_value_heads``, the scale always passed, our mask inverted.
  float16/bfloat16 only, so float32 falls back; so do per-head masks (``atten_mask`` has no head
  axis) and additive biases with finite non-zero entries (see ``_ascend_mask``).
  ``window_attention`` (a Jacobi window) has no operator of its own: its dense mask
  (``window_mask``, as the reference's) goes through ``attention``.
- ``rms_norm``: ``npu_rms_norm``; ``add_rms_norm``: ``npu_rms_norm`` for GLM's sandwich norm,
  then ``npu_add_rms_norm`` for the residual add and the next norm in one kernel.
- ``rotary_`` (M-RoPE): ``npu_rotary_mul`` on the first ``rot`` channels. ``npu_mrope`` does not
  fit: it looks cos/sin up from positions in a ``cos_sin_cache`` itself, while our tables arrive
  precomputed (``models.ar.rotary_tables``); using it would change the ``rotary_`` contract.
- ``qk_norm_rope``: LayerNorm in torch (F.layer_norm runs natively), the image tokens' 2D RoPE
  through ``npu_rotary_mul`` in float32.
- ``swiglu``: ``npu_swiglu`` (its first half is the gate, as ours).
- ``quant_linear`` (int8): ``npu_weight_quant_batchmatmul`` with the weight's per-channel scale as
  ``antiquant_scale`` (``y = x @ (weight * antiquant_scale)``), the weight passed as the
  documented (K, N) transposed view of our (N, K) rows; float16/bfloat16 activations. int4 stays on
  the reference: the op takes int4 packed eight to an int32 by ``npu_convert_weight_to_int4pack``,
  a layout the loader does not write (and fp8 is not an Ascend format here).
- ``layer_norm_modulate``: inherited. torch_npu documents no AdaLN op (CANN's aclnnAdaLayerNorm
  is reachable only through MindIE-SD's plugin), and its LayerNorm ops take a (dim,) weight,
  not a per-sample (B, 1, dim) scale.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import ModuleType

import glm_image_kernels as kernels
import torch
import torch.nn.functional as F

from ..device import npu_module
from ..errors import GlmImageError
from .quant import TORCH_PATHS, QuantPath, _add_bias, _common_unfit
from .torch_ops import TorchOps, capturing

__all__ = ["NpuOps"]

_FIA = "npu_fused_infer_attention_score"
_HALF = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _argument_names(npu: ModuleType, op: str) -> frozenset[str] | None:
    """The keyword names ``npu.op`` accepts, or None when they cannot be read.

    torch_npu exposes its ops as ``torch.ops.npu`` packets (Ascend/pytorch torch_npu/__init__.py:
    ``globals()[name] = getattr(torch.ops.npu, name)``), whose schema lists the arguments.
    """
    fn = getattr(npu, op, None)
    schema = getattr(getattr(fn, "default", None), "_schema", None) or getattr(fn, "_schema", None)
    if schema is not None:
        return frozenset(argument.name for argument in schema.arguments)
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters)


def _scale_argument(npu: ModuleType) -> str | None:
    """The name of the attention scale: ``scale`` in the current docs (op-plugin master, 7.x),
    ``scale_value`` in torch_npu 6.0.x (hiascend.com Pytorch/600 and 60RC3 API pages). A wrong
    name would be a TypeError, and a missing one the default 1.0, so it is read, not guessed."""
    names = _argument_names(npu, _FIA)
    if names is None:
        return "scale"
    return next((name for name in ("scale", "scale_value") if name in names), None)


class _Memo:
    """Derived tensors, one per key, reused while the same source tensors come back.

    The models pass the same mask / rotary table objects to every layer of one forward and build
    new ones for the next (``models.ar``, ``models.dit``, ``engine.decode``), so a conversion
    (mask polarity, sin sign) runs once per forward, not once per layer. Sources are compared by
    identity (kept alive here, so an address cannot be reused) and, outside inference mode, by
    version counter; inference tensors have none, so a source rewritten in place between calls
    would go unnoticed. Nothing is reused while a graph is captured or compiled.
    """

    def __init__(self) -> None:
        self._slots: dict[object, tuple[tuple[torch.Tensor, ...], tuple[int, ...], object]] = {}

    @staticmethod
    def _versions(sources: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
        return tuple(-1 if t.is_inference() else t._version for t in sources)

    def get(self, key: object, sources: tuple[torch.Tensor, ...], build: Callable[[], object]) -> object:
        if capturing("npu"):
            return build()
        hit = self._slots.get(key)
        versions = self._versions(sources)
        if (
            hit is not None
            and all(a is b for a, b in zip(hit[0], sources, strict=True))
            and hit[1] == versions
        ):
            return hit[2]
        value = build()
        self._slots[key] = (sources, versions, value)
        return value


def _ascend_mask(
    mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor | None, str | None]:
    """Our mask -> Ascend's atten_mask (bool, True = masked out), or the reason it cannot be.

    npu_fused_infer_attention_score's atten_mask (the Ascend op-plugin documentation of that op):
    bool/int8/uint8, "1 = this position does not
    take part", shapes (B|1, 1, Q_S, KV_S) among others when Q_S > 1; there is no head axis.
    A float bias whose finite entries are all 0 is a pure mask (-inf = hidden; the DiT's glyph
    padding and condition-cache rows). Any other bias would need ``pse_shift``, whose placement
    relative to the scale the documentation gives only as a formula image and which must be
    materialised per head (B or 1, N, Q_S, KV_S): those fall back.
    """
    b, t, s = q.shape[0], q.shape[2], k.shape[2]
    if mask.dim() > 4:
        return None, f"a {mask.dim()}-D mask"
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if mask.shape[1] != 1:
        return None, "a per-head mask (atten_mask has no head axis)"
    if mask.shape[0] not in (1, b) or mask.shape[2] not in (1, t) or mask.shape[3] not in (1, s):
        return None, f"mask shape {tuple(mask.shape)} does not broadcast to the scores"
    if mask.dtype == torch.bool:
        blocked = mask.logical_not()
    elif mask.is_floating_point():
        if capturing("npu"):
            return None, "a float bias cannot be checked for a pure -inf mask while capturing a graph"
        finite = torch.isfinite(mask)
        if bool((mask[finite] != 0).any()) or bool((~finite & ~torch.isneginf(mask)).any()):
            return None, "an additive bias with finite non-zero (or +inf/NaN) entries would need pse_shift"
        blocked = torch.isneginf(mask)
    else:
        return None, f"a {mask.dtype} mask (the contract allows bool or float)"
    return blocked.expand(blocked.shape[0], 1, t, s).contiguous(), None


def _rope_factors(cos: torch.Tensor, signed_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our (cos, signed sin) tables -> npu_rotary_mul's (r1, r2), as (B, T, 1, rot).

    Our sin carries rotate-half's sign (-sin on the first half, ``Ops.rotary_``) because we roll
    x; npu_rotary_mul applies the sign itself (``cat(-x2, x1)``), so r2 is the plain sin.
    """
    half = cos.shape[-1] // 2
    plain_sin = torch.cat([signed_sin[..., :half].neg(), signed_sin[..., half:]], dim=-1)
    return cos.unsqueeze(2).contiguous(), plain_sin.unsqueeze(2)


_WQBMM = "npu_weight_quant_batchmatmul"


def _wqbmm_unfit(x: torch.Tensor, weight) -> str | None:
    """npu_weight_quant_batchmatmul's documented limits (hiascend.com "torch_npu.
    npu_weight_quant_batchmatmul", 6.0.0 / 7.0.0, Atlas A2): x float16/bfloat16 (M, K); weight
    int8 (K, N), a transposed view allowed (recommended per channel); antiquant_scale (N,) of x's
    dtype."""
    npu = npu_module()
    if npu is None or not callable(getattr(npu, _WQBMM, None)):
        return f"this torch_npu has no {_WQBMM}"
    if x.dtype not in _HALF:
        return f"{_WQBMM} takes float16/bfloat16 activations, not {x.dtype}"
    return _common_unfit(x, weight)


def _wqbmm(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    # bias is added here: its documented dtypes changed between releases (float16/float32 only
    # in 6.0.x, whatever x is), and the addition costs nothing next to the matmul
    return _add_bias(getattr(npu_module(), _WQBMM)(x, weight.data.t(), weight.scale.to(x.dtype)), bias)


WQBMM_PATH = QuantPath("npu-wqbmm", ("int8",), _wqbmm_unfit, _wqbmm)


class NpuOps(TorchOps):
    """``npu``: torch_npu fused operators, each checked against its documented limits first."""

    name = "npu"
    quant_paths = (WQBMM_PATH, *TORCH_PATHS)

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        npu = npu_module()
        if npu is None:
            raise GlmImageError(
                "attention_backend = 'npu' needs torch_npu, which is not importable here "
                "(it needs the CANN toolkit; pip install 'glm-image[npu]')"
            )
        self._npu = npu
        self._scale_argument = _scale_argument(npu)
        self._memo = _Memo()

    def _missing(self, *ops: str) -> str | None:
        absent = [op for op in ops if not callable(getattr(self._npu, op, None))]
        return f"this torch_npu has no {', '.join(absent)}" if absent else None

    # ------------------------------------------------------------------ attention

    def _fia_limits(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
        """Why npu_fused_infer_attention_score cannot take these inputs, or None. Limits from
        the Ascend op-plugin documentation of npu_fused_infer_attention_score (Atlas A2)."""
        if missing := self._missing(_FIA):
            return missing
        if self._scale_argument is None:
            return f"this torch_npu's {_FIA} takes neither `scale` nor `scale_value`"
        if q.dtype not in _HALF:
            return f"{_FIA} takes float16/bfloat16 queries, not {q.dtype}"
        if k.dtype != q.dtype or v.dtype != q.dtype:
            return "query, key and value dtypes differ"
        if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
            return "shapes outside (B, H, T, D) / (B, KV, S, D)"
        b, heads, t, d = q.shape
        kv, s = k.shape[1], k.shape[2]
        if heads % kv or heads // kv > 64:
            return f"{heads} query heads over {kv} KV heads (needs a multiple, at most 64 per KV head)"
        if b > 65536 or heads > 256 or d > 512:
            return f"B = {b}, N = {heads}, D = {d} (limits 65536, 256, 512)"
        if t > 1 and d % 16:
            return f"head_dim {d} is not a multiple of 16 (needed for fp16/bf16 when Q_S > 1)"
        if t == 1 and s > 262144:
            return f"KV length {s} > 262144 for a single query"
        return None

    def _fia(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        blocked: torch.Tensor | None,
        scale: float,
        kv_lengths: list[int] | None = None,
    ) -> torch.Tensor:
        # torch_npu.npu_fused_infer_attention_score (the Ascend op-plugin documentation of the
        # op): query/key/value must be contiguous;
        # input_layout "BNSD" is our (B, H, S, D) (the default is "BSH"); num_heads and
        # num_key_value_heads must equal the N axes of query and key/value (GQA; the docs do not
        # spell out the grouping: assumed standard, query head h reads KV head h // (H / KV), as
        # ours); `scale` defaults to 1.0, so 1/sqrt(D) is always passed;
        # atten_mask True = masked out. Q_S = 1 takes the IncreFlashAttention branch, Q_S > 1
        # PromptFlashAttention. Returns (attention_out in query's layout, softmax_lse).
        extra = {} if kv_lengths is None else {"actual_seq_lengths_kv": kv_lengths}
        out, _ = getattr(self._npu, _FIA)(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            atten_mask=blocked,
            num_heads=q.shape[1],
            num_key_value_heads=k.shape[1],
            input_layout="BNSD",
            **{self._scale_argument: float(scale)},
            **extra,
        )
        return out

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        why = self._fia_limits(q, k, v)
        blocked = None
        if why is None and mask is not None:
            key = ("mask", q.shape[0], q.shape[2], k.shape[2])
            blocked, why = self._memo.get(key, (mask,), lambda: _ascend_mask(mask, q, k))
        why = why or self._switched_off("attention", q)
        if why is not None:
            self.fallback("attention", why)
            return super().attention(q, k, v, mask=mask, scale=scale)
        return self._fia(q, k, v, blocked, scale)

    def decode_attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        visible: torch.Tensor,
        *,
        scale: float,
        length: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        why = self._fia_limits(q, keys, values)
        if why is None and (q.shape[2] != 1 or visible.dtype != torch.bool):
            why = "decode takes one query per row and a bool `visible`"
        if why is None and tuple(visible.shape) != (q.shape[0], keys.shape[2]):
            why = f"visible {tuple(visible.shape)} is not (B, capacity)"
        why = why or self._switched_off("decode_attention", q)
        if why is not None:
            self.fallback("decode_attention", why)
            return super().decode_attention(q, keys, values, visible, scale=scale, length=length)
        # Q_S = 1: atten_mask (B, 1, 1, KV_S) is a documented shape. Built on every call, not
        # memoised: `visible` is updated in place each step, and inside a captured graph the
        # inversion has to be part of the graph. Shapes stay static (the whole cache).
        blocked = visible.logical_not().view(q.shape[0], 1, 1, keys.shape[2])
        # actual_seq_lengths_kv: "the effective KV length of each batch; one value applies to
        # every batch"; the kernel does not read past it, which is what `length` promises (no
        # visible slot at or past it). It is a host int list: a device-tensor bound (a captured
        # graph's) would need a host read, so then the mask alone bounds the attention.
        lengths = [min(length, keys.shape[2])] if isinstance(length, int) else None
        return self._fia(q, keys, values, blocked, scale, lengths)

    def window_attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        visible: torch.Tensor,
        query_slots: torch.Tensor,
        *,
        scale: float,
        length: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """No window kernel here: the window's dense mask (B, 1, W, C) through ``attention``
        (npu_fused_infer_attention_score, the PromptFlashAttention branch), as the reference
        builds it (an int ``length`` slices the cache); ``attention`` falls back on its own."""
        return kernels.window_attention_reference(
            q, keys, values, visible, query_slots, scale=scale, length=length, attention=self.attention
        )

    # ------------------------------------------------------------------ normalisation

    def _norm_limits(self, op: str, x: torch.Tensor, *weights: torch.Tensor) -> str | None:
        """npu_rms_norm / npu_add_rms_norm (hiascend.com "(beta)torch_npu.npu_rms_norm", 6.0.0 and
        7.0.0): float16/bfloat16/float32, gamma of x's dtype, x of 2-8 dims."""
        if missing := self._missing(op):
            return missing
        if x.dtype not in _FLOATS or any(w.dtype != x.dtype for w in weights):
            return f"{op} takes float16/bfloat16/float32 with gamma of x's dtype"
        if not 2 <= x.dim() <= 8 or any(tuple(w.shape) != (x.shape[-1],) for w in weights):
            return f"{op} takes x of 2-8 dims and a (dim,) gamma"
        return None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if why := self._norm_limits("npu_rms_norm", x, weight) or self._switched_off("rms_norm", x):
            self.fallback("rms_norm", why)
            return super().rms_norm(x, weight, eps)
        # torch_npu.npu_rms_norm(self, gamma, epsilon=1e-06) -> (y, rstd): y = x / sqrt(mean(x^2)
        # + eps) * gamma, rstd float32 (kept for backward). One rounding of y instead of the
        # reference's two (normalised value, then weight): within the dtype's tolerance.
        return self._npu.npu_rms_norm(x, weight, eps)[0]

    def add_rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        *,
        pre_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weights = (weight,) if pre_weight is None else (weight, pre_weight)
        why = self._norm_limits("npu_add_rms_norm", x, *weights)
        if why is None and pre_weight is not None:
            why = self._missing("npu_rms_norm")
        if why is None and (residual.dtype != x.dtype or residual.shape != x.shape):
            why = "x and residual differ in dtype or shape"
        why = why or self._switched_off("add_rms_norm", x)
        if why is not None:
            self.fallback("add_rms_norm", why)
            return super().add_rms_norm(x, residual, weight, eps, pre_weight=pre_weight)
        h = x if pre_weight is None else self._npu.npu_rms_norm(x, pre_weight, eps)[0]
        # torch_npu.npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06) -> (y, rstd, x): x = x1 + x2,
        # y = gamma * x * rsqrt(mean(x^2) + eps); the THIRD output is the sum (AddRmsNorm proto,
        # in CANN's ops-math, and op-plugin's own test of npu_add_rms_norm: `y, rstd, x`).
        normed, _, new_residual = self._npu.npu_add_rms_norm(residual, h, weight, eps)
        return normed, new_residual

    # ------------------------------------------------------------------ rotary embeddings

    def _rotary_limits(
        self, shape: tuple[int, ...], dtype: torch.dtype, tables: tuple[torch.Tensor, ...], rot: int
    ) -> str | None:
        """npu_rotary_mul (the Ascend op-plugin documentation of the op; half mode, A2):
        4-D input of float16/bfloat16/float32 with r1/r2 of its dtype; D even and < 896; B and N
        below 1000; for BSND input, r1/r2 of shape 1S1D, BS1D or BSND."""
        if missing := self._missing("npu_rotary_mul"):
            return missing
        if len(shape) != 4 or dtype not in _FLOATS or any(t.dtype != dtype for t in tables):
            return "npu_rotary_mul takes a 4-D float16/bfloat16/float32 input with tables of its dtype"
        if rot % 2 or rot >= 896 or rot > shape[-1]:
            return f"rotary dim {rot} (must be even, < 896, <= head_dim)"
        if shape[0] >= 1000 or shape[2] >= 1000:
            return f"B = {shape[0]}, N = {shape[2]} (npu_rotary_mul needs both below 1000)"
        if 0 in shape:
            return "an empty input"
        return None

    def rotary_(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
        rot = cos.shape[-1]
        why = self._rotary_limits(tuple(x.shape), x.dtype, (cos, signed_sin), rot)
        if why is None and (cos.shape != signed_sin.shape or tuple(cos.shape) != (*x.shape[:2], rot)):
            why = "tables are not (B, T, rot)"
        why = why or self._switched_off("rotary_", x)
        if why is not None:
            self.fallback("rotary_", why)
            super().rotary_(x, cos, signed_sin)
            return
        key = ("rope", tuple(cos.shape))
        r1, r2 = self._memo.get(key, (cos, signed_sin), lambda: _rope_factors(cos, signed_sin))
        x_rot = x[..., :rot]  # (B, T, heads, rot): BSND with r1/r2 of shape BS1D
        # torch_npu.npu_rotary_mul(input, r1, r2, rotary_mode='half') (the Ascend op-plugin
        # documentation of the op): out = r1 * x + r2 * cat(-x2, x1), a new tensor of x's
        # shape and dtype. Strided input is not documented, so the slice is made contiguous, and
        # the result is copied back because our contract is in place.
        x_rot.copy_(self._npu.npu_rotary_mul(x_rot.contiguous(), r1, r2))

    def qk_norm_rope(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        text_len: int,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image_shape = (q.shape[0], q.shape[1] - text_len, *q.shape[2:])  # rotated in float32
        why = self._rotary_limits(image_shape, torch.float32, (cos, sin), q.shape[-1])
        if why is None and not cos.shape == sin.shape == (image_shape[1], q.shape[-1]):
            why = "rotary tables are not (S - text_len, D)"
        why = why or self._switched_off("qk_norm_rope", q)
        if why is not None:
            self.fallback("qk_norm_rope", why)
            return super().qk_norm_rope(q, k, cos, sin, text_len, eps)
        r1, r2 = cos[None, :, None], sin[None, :, None]  # (1, S_img, 1, D): "1S1D" for BSND input
        out = []
        for x in (q, k):
            x = F.layer_norm(x, (x.shape[-1],), eps=eps).to(x.dtype)
            # npu_rotary_mul (torch_npu-npu_rotary_mul.md) half mode is exactly the contract's
            # float32 ``x * cos + rotate_half(x) * sin``: run it on the float32 image tokens.
            image = self._npu.npu_rotary_mul(x[:, text_len:].float().contiguous(), r1, r2).to(x.dtype)
            out.append(torch.cat([x[:, :text_len], image], dim=1).transpose(1, 2))
        return out[0], out[1]

    # ------------------------------------------------------------------ activations

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        why = self._missing("npu_swiglu")
        if why is None and (x.dtype not in _FLOATS or not 1 <= x.dim() <= 8 or x.shape[-1] % 2):
            why = "npu_swiglu takes float16/bfloat16/float32 of 1-8 dims, even along the split"
        why = why or self._switched_off("swiglu", x)
        if why is not None:
            self.fallback("swiglu", why)
            return super().swiglu(x)
        # torch_npu.npu_swiglu(input, dim=-1) (hiascend.com "(beta)torch_npu.npu_swiglu", 6.0.0 /
        # 7.2.0): outputs = swish(A) * B = A * sigmoid(A) * B, "A the first half, B the second
        # half" along dim, i.e. our [gate, up]. Strided input is not supported.
        return self._npu.npu_swiglu(x.contiguous(), dim=-1)
