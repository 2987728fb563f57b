"""Decode attention (one new query per row) over the static KV cache: flash-decoding for GQA.

Why a kernel: a decode step reads the whole layer cache for a single query per head, so it is
memory bound, and the natural grid (one program per batch row and KV head: B * 2 for the
released model) leaves almost every SM idle. Flash-decoding splits the cache axis into chunks
handled by separate programs, then combines their partial results:

1. ``_split_kernel``, grid (num_splits, B * KV). Program (s, b, g) covers cache slots
   [s * split_size, (s + 1) * split_size) below the bound, for the G = H / KV query heads that
   share KV head g: each K/V tile is loaded once for all G heads (a (G, D) x (D, N) product), the
   softmax is online in float32 (exp2, scale folded with log2 e). The chunk is TILES tiles of
   BLOCK_N slots, a compile-time trip count; tiles past the bound load
   nothing. It writes the normalised partial output (G, D) and its log2-sum-exp (G,) in float32;
   a chunk starting at or past the bound writes nothing.
2. ``_reduce_kernel``, grid (B * H,): weights each active chunk by exp2(lse - max) and writes
   the output (B, H, 1, D) in q's dtype.

``length`` (the bound) is an int, None (the whole cache), or a one-element integer tensor on the
device: then the number of chunks is fixed by the capacity and chunks past the bound exit at
once, so one launch can be captured in a CUDA graph and replayed with a changing bound.

Invisible slots are never read: K and V loads are masked by ``visible``, so NaN or inf left in
unused cache slots cannot leak into the result.

A Jacobi window (W queries per row, causal with per-row offsets) is ``window_attention``'s: the
same split / reduce structure with W x G rows per program. The two kernels share the tile step
of the online softmax (``_attend_tile``), its end (``_finish``), the reduce and the launch plan
(``launch_plan``); decode's results are bit for bit what they were before the window kernel
(compared in Triton's interpreter).

Products, both float32-accurate: with 16-bit inputs on CUDA (``NATIVE_DOT``) the tensor cores
take q, K, V as they are (exact products, float32 accumulation) and P as hi + lo halves in the
cache dtype (two products, ~16 significant bits of P); otherwise (float32 inputs, and Triton's
interpreter, which cannot multiply 16-bit operands) every operand is float32 and the products
use ``tf32x3`` (three TF32 tensor-core products; float32 in the interpreter).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._triton import cdiv, interpreted, next_power_of_2, require_triton, tl, triton

__all__ = [
    "attention_reference",
    "decode_attention",
    "decode_attention_plan",
    "decode_attention_reference",
    "default_split_size",
]

_LOG2E = 1.4426950408889634
_REDUCE_BLOCK = 16  # chunks combined per step of the reduce loop


@triton.jit
def _bound(len_ptr, length, capacity, LENGTH_IN_TENSOR: tl.constexpr):
    """No slot at or past the bound is visible: ``length`` (or the device tensor), at most C."""
    bound = tl.load(len_ptr).to(tl.int32) if LENGTH_IN_TENSOR else length
    return tl.minimum(bound, capacity)


@triton.jit
def _attend_tile(q, k, v, allowed, m, denom, acc, scale_log2, NATIVE_DOT: tl.constexpr):
    """One tile of the online softmax: q (M, D) against k, v (N, D); ``allowed`` (M or 1, N)
    says which scores count (the loads of k and v are masked by the caller, so slots no row may
    see were never read). Running max ``m`` (log2 units), ``denom`` (M,), ``acc`` (M, D) in
    float32; returns them updated."""
    if NATIVE_DOT:  # 16-bit operands, float32 accumulation: the products are exact
        s = tl.dot(q, tl.trans(k))
    else:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="tf32x3")
    s = s * scale_log2  # (M, BLOCK_N), log2 units
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-hidden tile: exp2(-inf) = 0
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    denom = denom * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if NATIVE_DOT:  # p = hi + lo in the cache dtype: ~16 significant bits, two products
        p_hi = p.to(v.dtype)
        acc = tl.dot(p_hi, v, acc)
        acc = tl.dot((p - p_hi.to(tl.float32)).to(v.dtype), v, acc)
    else:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="tf32x3")
    return m_new, denom, acc


@triton.jit
def _finish(m, denom, acc):
    """A chunk's normalised partial output (M, D) and its log2-sum-exp (M,); -inf where the
    chunk held nothing a row may see (its weight in the reduce is then 0)."""
    seen_any = denom > 0
    safe = tl.where(seen_any, denom, 1.0)
    return acc / safe[:, None], tl.where(seen_any, m + tl.log2(safe), float("-inf"))


@triton.jit
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    vis_ptr,
    len_ptr,
    part_o_ptr,
    part_lse_ptr,
    length,
    scale_log2,
    kv_heads,
    capacity,
    num_splits,
    sq_b,
    sq_h,
    sk_b,
    sk_h,
    sk_c,
    sv_b,
    sv_h,
    sv_c,
    svis_b,
    svis_c,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILES: tl.constexpr,
    LENGTH_IN_TENSOR: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    split = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // kv_heads
    g = bg % kv_heads
    bound = _bound(len_ptr, length, capacity, LENGTH_IN_TENSOR)
    start = split * (TILES * BLOCK_N)
    if start < bound:
        end = tl.minimum(start + TILES * BLOCK_N, bound)
        rows = tl.arange(0, BLOCK_G)
        dims = tl.arange(0, HEAD_DIM)
        heads = g * GROUP + rows
        row_ok = rows < GROUP
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + dims[None, :], mask=row_ok[:, None], other=0.0)
        if not NATIVE_DOT:
            q = q.to(tl.float32)
        k_base = k_ptr + b * sk_b + g * sk_h
        v_base = v_ptr + b * sv_b + g * sv_h
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        # a static trip count (Triton 3.9 does not pipeline these loads on sm_90); tiles past
        # ``end`` load nothing
        for i in range(TILES):
            slots = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
            seen = tl.load(vis_ptr + b * svis_b + slots * svis_c, mask=slots < end, other=0) != 0
            k = tl.load(k_base + slots[:, None] * sk_c + dims[None, :], mask=seen[:, None], other=0.0)
            v = tl.load(v_base + slots[:, None] * sv_c + dims[None, :], mask=seen[:, None], other=0.0)
            m, denom, acc = _attend_tile(q, k, v, seen[None, :], m, denom, acc, scale_log2, NATIVE_DOT)
        out, lse = _finish(m, denom, acc)
        part = (b * kv_heads * GROUP + heads) * num_splits + split  # (B, H, num_splits) index
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=row_ok[:, None])
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _reduce_kernel(
    part_o_ptr,
    part_lse_ptr,
    out_ptr,
    len_ptr,
    length,
    capacity,
    split_size,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    LENGTH_IN_TENSOR: tl.constexpr,
):
    """Two passes over the active chunks, BLOCK_S at a time (a runtime trip count: ``while``):
    the largest lse, then the weighted sum. Running values are per lane, reduced at the end."""
    bh = tl.program_id(0)
    active = tl.cdiv(_bound(len_ptr, length, capacity, LENGTH_IN_TENSOR), split_size)
    lanes = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_DIM)
    lse_ptr = part_lse_ptr + bh * num_splits
    top = tl.full([BLOCK_S], float("-inf"), tl.float32)
    s0 = bh * 0
    while s0 < active:
        top = tl.maximum(top, tl.load(lse_ptr + s0 + lanes, mask=s0 + lanes < active, other=float("-inf")))
        s0 += BLOCK_S
    m = tl.max(top, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, HEAD_DIM], tl.float32)
    s0 = bh * 0
    while s0 < active:
        idx = s0 + lanes
        ok = idx < active
        w = tl.exp2(tl.load(lse_ptr + idx, mask=ok, other=float("-inf")) - m)
        o = tl.load(
            part_o_ptr + (bh * num_splits + idx)[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None]
        )
        denom += w
        acc += w[:, None] * tl.where(ok[:, None], o, 0.0)
        s0 += BLOCK_S
    total = tl.sum(denom, 0)
    out = tl.sum(acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + bh * HEAD_DIM + dims, out)


def _block_n(head_dim: int, itemsize: int) -> int:
    """Cache slots per tile: one K tile of at most 16 KiB (64 x 128 in 16-bit), so the pipelined
    K/V buffers stay within the ~99 KiB of shared memory a consumer GPU gives one program."""
    return max(16, min(64, 16384 // (head_dim * itemsize)))


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(
        torch.cuda.current_device() if index is None else index
    ).multi_processor_count


def default_split_size(batch_kv: int, span: int, block_n: int, device: torch.device) -> int:
    """Cache slots per chunk: enough chunks that B * KV * chunks covers the GPU's SMs once, no
    chunk shorter than one tile; the tiles per chunk are rounded up to a power of two, since it
    is a compile-time constant (a few variants as the bound grows, not one per step). More chunks
    would add partial-result traffic (G x D float32 per chunk) without adding bandwidth. To be
    tuned with the split sweep of benchmarks/bench_kernels.py."""
    programs = _sm_count(device.index) if device.type == "cuda" else 4
    splits = max(1, min(cdiv(programs, batch_kv), cdiv(span, block_n)))
    return next_power_of_2(cdiv(cdiv(span, splits), block_n)) * block_n


def decode_attention_plan(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    length: int | torch.Tensor | None = None,
    split_size: int | None = None,
    block_n: int | None = None,
    native_dot: bool | None = None,
) -> dict:
    """The launch ``decode_attention`` makes for these inputs: split_size, block_n, splits (the
    number of chunks) and native_dot, defaults filled in and overrides checked."""
    return launch_plan("decode_attention", q, keys, values, length, split_size, block_n, native_dot)


def launch_plan(
    op: str,
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    length: int | torch.Tensor | None,
    split_size: int | None,
    block_n: int | None,
    native_dot: bool | None,
    blocks: int = 1,
) -> dict:
    """``decode_attention_plan`` for ``op`` (named in errors), whose grid has ``blocks``
    programs per (row, KV head, chunk): the default chunking counts them."""
    b, kv, capacity, d = keys.shape
    # a device-tensor bound can change between graph replays: chunk the whole capacity
    span = (
        capacity if length is None or isinstance(length, torch.Tensor) else max(1, min(int(length), capacity))
    )
    if block_n is None:
        block_n = _block_n(d, keys.element_size())
        if split_size is not None:  # the largest tile that divides the chunk
            block_n = next((n for n in (block_n, 32, 16) if split_size % n == 0), block_n)
    if block_n not in (16, 32, 64):
        raise ValueError(f"{op}: block_n = {block_n} must be 16, 32 or 64")
    if split_size is None:
        split_size = default_split_size(b * kv * blocks, span, block_n, keys.device)
    elif split_size % block_n:
        raise ValueError(f"{op}: split_size = {split_size} must be a multiple of {block_n}")
    sixteen_bit = keys.element_size() == 2 and q.dtype == keys.dtype == values.dtype
    gpu = q.is_cuda and not interpreted()
    if native_dot is None:
        native_dot = sixteen_bit and gpu
    elif native_dot and not (sixteen_bit and gpu):
        raise ValueError(f"{op}: native_dot needs 16-bit inputs on CUDA (not the interpreter)")
    return {
        "split_size": split_size,
        "block_n": block_n,
        "splits": cdiv(span, split_size),
        "native_dot": native_dot,
    }


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor,
    *,
    scale: float,
    length: int | torch.Tensor | None = None,
    split_size: int | None = None,
    block_n: int | None = None,
    native_dot: bool | None = None,
) -> torch.Tensor:
    """q (B, H, 1, D); keys, values (B, KV, C, D); visible (B, C) bool; all with a unit last
    stride, D a power of two in [16, 256], H a multiple of KV. ``length``: None, an int, or a
    one-element integer tensor on q's device. Returns (B, H, 1, D) in q's dtype, contiguous.

    Tuning overrides (tests, benchmarks): ``split_size`` the chunk length (a multiple of the
    tile), ``block_n`` the tile (16, 32 or 64 slots), ``native_dot`` the product path."""
    require_triton()
    b, h, t, d = q.shape
    kv, capacity = keys.shape[1], keys.shape[2]
    if t != 1 or h % kv or keys.shape != values.shape or visible.shape != (b, capacity):
        raise ValueError(
            f"decode_attention: q {tuple(q.shape)}, keys {tuple(keys.shape)}, values "
            f"{tuple(values.shape)}, visible {tuple(visible.shape)} do not fit (B, H, 1, D) / (B, KV, C, D)"
        )
    in_tensor = isinstance(length, torch.Tensor)
    if in_tensor and (length.numel() != 1 or length.dtype.is_floating_point or length.device != q.device):
        raise ValueError("decode_attention: a length tensor holds one integer on q's device")
    bound = capacity if length is None or in_tensor else max(0, min(int(length), capacity))
    plan = decode_attention_plan(q, keys, values, length, split_size, block_n, native_dot)
    split_size, block_n, num_splits, native_dot = (
        plan[k] for k in ("split_size", "block_n", "splits", "native_dot")
    )
    group = h // kv

    part_o = torch.empty((b, h, num_splits, d), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((b, h, num_splits), device=q.device, dtype=torch.float32)
    out = torch.empty((b, h, 1, d), device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    vis = visible.view(torch.uint8)
    len_arg = length if in_tensor else vis  # any pointer serves when the kernel ignores it
    _split_kernel[(num_splits, b * kv)](
        q,
        keys,
        values,
        vis,
        len_arg,
        part_o,
        part_lse,
        bound,
        scale * _LOG2E,
        kv,
        capacity,
        num_splits,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        vis.stride(0),
        vis.stride(1),
        GROUP=group,
        BLOCK_G=max(16, next_power_of_2(group)),
        HEAD_DIM=d,
        BLOCK_N=block_n,
        TILES=split_size // block_n,
        LENGTH_IN_TENSOR=in_tensor,
        NATIVE_DOT=native_dot,
        num_warps=4,
    )
    _reduce_kernel[(b * h,)](
        part_o,
        part_lse,
        out,
        len_arg,
        bound,
        capacity,
        split_size,
        num_splits,
        HEAD_DIM=d,
        BLOCK_S=_REDUCE_BLOCK,
        LENGTH_IN_TENSOR=in_tensor,
        num_warps=4,
    )
    return out


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """The reference ``attention`` op (prefill / joint attention; no kernel: torch SDPA is fast).

    q (B, H, T, D); k, v (B, KV, S, D) with H a multiple of KV (grouped-query: query head h reads
    KV head h // (H / KV)). ``mask``: None (every query sees every key), a bool tensor
    broadcastable to (B, H, T, S) with True = may attend, or a float tensor of the same shape
    added to the scores. Returns (B, H, T, D) in q's dtype.
    """
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def decode_attention_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor,
    *,
    scale: float,
    length: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """The twin, and the reference ``decode_attention`` op: one new query per row over a layer's
    static KV cache, ``attention_reference`` with ``visible`` as the mask.

    q (B, H, 1, D); keys, values (B, KV, C, D): the whole cache (C = capacity); visible (B, C)
    bool, True = may attend (every row sees at least one slot). ``length``, when given, is a
    bound: no slot at or past it is visible, so an implementation may skip them. It is a Python
    int, or a one-element integer tensor on the device (a CUDA graph's changing bound), or None.
    Only an int bound slices the cache here: a tensor bound would need a host read (no sync,
    e.g. under graph capture), and the mask alone already bounds the attention.
    Returns (B, H, 1, D).
    """
    if isinstance(length, int):
        keys, values, visible = keys[:, :, :length], values[:, :, :length], visible[:, :length]
    return attention_reference(q, keys, values, mask=visible[:, None, None, :], scale=scale)
