"""Window attention (W queries per row, causal with per-row offsets) over the static KV cache.

Speculative Jacobi decoding runs a window of W tokens per row through the model at once; row b's
query w was written to cache slot ``query_slots[b, w]`` and sees the row's open slots up to its
own: slot j iff ``visible[b, j]`` and ``j <= query_slots[b, w]``. Rows sit at different
positions. Torch SDPA with a dense (B, W, C) mask over the whole cache paid for the mask, for
GQA's expanded K/V and for SDPA's mask path; on the H200 a Jacobi W=4 forward saved 41% of the
forwards but only 5% of the time (issue 24). The decode step's flash-decoding kernel
(``flash_decoding``) reads each K/V tile once for the G query heads of a KV head; here one
program reads it once for all W x G (query, head) pairs of its KV head, so a window costs the
cache reads of one decode step (the pattern of FlashDecoding / vLLM's multi-query "spec decode"
attention, and of FlashAttention-2's M x N tiles):

1. ``_window_split_kernel``, grid (num_splits, B * KV, m_blocks). Program (s, b, g, mb) takes
   rows mb * BLOCK_M .. of the (W * G) (query, head) pairs of KV head g (row r: query r // G,
   head g * G + r % G) and cache chunk s: a (BLOCK_M, D) x (D, BLOCK_N) product per tile, the
   per-query causal bound applied per element, the online softmax of ``flash_decoding`` in
   float32 (``_attend_tile``, the same code). No dense mask exists: the bound is a compare of
   the tile's slot ids with the rows' query slots. The chunk is read only up to the largest
   query slot of the program's rows (and the bound); a chunk past it writes "saw nothing"
   (lse -inf) without reading the cache.
2. ``flash_decoding._reduce_kernel``, grid (B * H * W,): the partials are laid out
   (B, H, W, splits), so the decode step's reduce combines them unchanged into (B, H, W, D).
   With one chunk the partial is the output, copied (a short cache, or many rows: no reduce).

``length`` is an int, None or a one-element integer tensor on the device, as for
``decode_attention``: with a tensor the number of chunks is fixed by the capacity and chunks past
the bound exit at once, so the launch can be captured in a CUDA graph.

What is read: K and V loads are masked by ``visible`` and by the largest query slot of the
program, so NaN or inf in slots no query of the program sees cannot leak. A slot that some
query of a program sees is read for all of them and weighted 0 for the others: such slots are
the window's own keys (written by this forward), finite by construction.

Products as in ``flash_decoding``: 16-bit inputs on CUDA take the tensor cores as they are (P as
hi + lo halves); float32 inputs and the interpreter use ``tf32x3`` / float32 operands.
"""

from __future__ import annotations

import torch

from ._triton import cdiv, next_power_of_2, require_triton, tl, triton
from .flash_decoding import (
    _LOG2E,
    _REDUCE_BLOCK,
    _attend_tile,
    _bound,
    _finish,
    _reduce_kernel,
    attention_reference,
    launch_plan,
)

__all__ = [
    "MAX_WINDOW",
    "window_attention",
    "window_attention_plan",
    "window_attention_reference",
    "window_mask",
]

MAX_WINDOW = 16  # queries per row the kernel serves (Jacobi windows are 2..16)
# (query, head) rows per program: FlashAttention-2's M tile at head_dim 128 for 16-bit inputs
# (sm_90, ptxas: 228 registers with 8 warps, no spills, 64 KiB of shared memory); float32
# inputs keep the decode kernel's 16 rows (tf32x3 operands: 84 KiB, within a consumer GPU's
# ~99 KiB per program; 32 rows would take 104 KiB)
_MAX_BLOCK_M = {2: 128, 4: 16}


@triton.jit
def _window_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    vis_ptr,
    qs_ptr,
    len_ptr,
    part_o_ptr,
    part_lse_ptr,
    length,
    scale_log2,
    num_heads,
    kv_heads,
    window,
    capacity,
    num_splits,
    sq_b,
    sq_h,
    sq_w,
    sk_b,
    sk_h,
    sk_c,
    sv_b,
    sv_h,
    sv_c,
    svis_b,
    svis_c,
    sqs_b,
    sqs_w,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
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
        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < window * GROUP
        query = rows // GROUP
        heads = g * GROUP + rows % GROUP
        dims = tl.arange(0, HEAD_DIM)
        limit = tl.load(qs_ptr + b * sqs_b + query * sqs_w, mask=row_ok, other=-1).to(tl.int32)
        # no slot past the program's furthest query is read
        end = tl.minimum(tl.minimum(start + TILES * BLOCK_N, bound), tl.max(limit, 0) + 1)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if start < end:
            q = tl.load(
                q_ptr + b * sq_b + heads[:, None] * sq_h + query[:, None] * sq_w + dims[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )
            if not NATIVE_DOT:
                q = q.to(tl.float32)
            k_base = k_ptr + b * sk_b + g * sk_h
            v_base = v_ptr + b * sv_b + g * sv_h
            for i in range(TILES):  # a compile-time trip count; tiles past ``end`` load nothing
                slots = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
                seen = tl.load(vis_ptr + b * svis_b + slots * svis_c, mask=slots < end, other=0) != 0
                k = tl.load(k_base + slots[:, None] * sk_c + dims[None, :], mask=seen[:, None], other=0.0)
                v = tl.load(v_base + slots[:, None] * sv_c + dims[None, :], mask=seen[:, None], other=0.0)
                allowed = seen[None, :] & (slots[None, :] <= limit[:, None])  # causal, per query
                m, denom, acc = _attend_tile(q, k, v, allowed, m, denom, acc, scale_log2, NATIVE_DOT)
        out, lse = _finish(m, denom, acc)
        part = ((b * num_heads + heads) * window + query) * num_splits + split  # (B, H, W, splits)
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=row_ok[:, None])
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


def _block_m(rows: int, itemsize: int) -> int:
    return min(_MAX_BLOCK_M.get(itemsize, 16), max(16, next_power_of_2(rows)))


def window_attention_plan(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    length: int | torch.Tensor | None = None,
    split_size: int | None = None,
    block_n: int | None = None,
    native_dot: bool | None = None,
) -> dict:
    """The launch ``window_attention`` makes: ``decode_attention_plan``'s keys (split_size,
    block_n, splits, native_dot) and block_m (rows per program), m_blocks (programs per row, KV
    head and chunk)."""
    rows = q.shape[2] * (q.shape[1] // keys.shape[1])  # W x G (query, head) pairs per KV head
    block_m = _block_m(rows, keys.element_size())
    blocks = cdiv(rows, block_m)
    plan = launch_plan("window_attention", q, keys, values, length, split_size, block_n, native_dot, blocks)
    return plan | {"block_m": block_m, "m_blocks": blocks}


def window_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor,
    query_slots: torch.Tensor,
    *,
    scale: float,
    length: int | torch.Tensor | None = None,
    split_size: int | None = None,
    block_n: int | None = None,
    native_dot: bool | None = None,
) -> torch.Tensor:
    """q (B, H, W, D) with 1 <= W <= ``MAX_WINDOW``; keys, values (B, KV, C, D); visible (B, C)
    bool; query_slots (B, W) integer, each in [0, min(length, C)); unit last strides, D a power
    of two in [16, 256], H a multiple of KV. ``length``: None, an int, or a one-element integer
    tensor on q's device. Returns (B, H, W, D) in q's dtype, contiguous.

    Tuning overrides as ``decode_attention``'s (tests, benchmarks)."""
    require_triton()
    b, h, w, d = q.shape
    kv, capacity = keys.shape[1], keys.shape[2]
    if (
        not 1 <= w <= MAX_WINDOW
        or h % kv
        or keys.shape != values.shape
        or keys.shape[0] != b
        or keys.shape[3] != d
        or visible.shape != (b, capacity)
        or query_slots.shape != (b, w)
    ):
        raise ValueError(
            f"window_attention: q {tuple(q.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}, "
            f"visible {tuple(visible.shape)}, query_slots {tuple(query_slots.shape)} do not fit "
            f"(B, H, W <= {MAX_WINDOW}, D) / (B, KV, C, D) / (B, C) / (B, W)"
        )
    if query_slots.dtype.is_floating_point or query_slots.device != q.device:
        raise ValueError("window_attention: query_slots holds integers on q's device")
    in_tensor = isinstance(length, torch.Tensor)
    if in_tensor and (length.numel() != 1 or length.dtype.is_floating_point or length.device != q.device):
        raise ValueError("window_attention: a length tensor holds one integer on q's device")
    bound = capacity if length is None or in_tensor else max(0, min(int(length), capacity))
    plan = window_attention_plan(q, keys, values, length, split_size, block_n, native_dot)
    group = h // kv

    part_o = torch.empty((b, h, w, plan["splits"], d), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((b, h, w, plan["splits"]), device=q.device, dtype=torch.float32)
    out = torch.empty((b, h, w, d), device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    vis = visible.view(torch.uint8)
    len_arg = length if in_tensor else vis  # any pointer serves when the kernel ignores it
    _window_split_kernel[(plan["splits"], b * kv, plan["m_blocks"])](
        q,
        keys,
        values,
        vis,
        query_slots,
        len_arg,
        part_o,
        part_lse,
        bound,
        scale * _LOG2E,
        h,
        kv,
        w,
        capacity,
        plan["splits"],
        q.stride(0),
        q.stride(1),
        q.stride(2),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        vis.stride(0),
        vis.stride(1),
        query_slots.stride(0),
        query_slots.stride(1),
        GROUP=group,
        BLOCK_M=plan["block_m"],
        HEAD_DIM=d,
        BLOCK_N=plan["block_n"],
        TILES=plan["split_size"] // plan["block_n"],
        LENGTH_IN_TENSOR=in_tensor,
        NATIVE_DOT=plan["native_dot"],
        num_warps=8 if plan["block_m"] >= 64 else 4,  # 4 warps at 64 rows spill (ptxas, sm_90)
    )
    if plan["splits"] == 1:  # one chunk: its partial is the output (the reduce would weight it by 1)
        return out.copy_(part_o[:, :, :, 0])
    _reduce_kernel[(b * h * w,)](
        part_o,
        part_lse,
        out,
        len_arg,
        bound,
        capacity,
        plan["split_size"],
        plan["splits"],
        HEAD_DIM=d,
        BLOCK_S=_REDUCE_BLOCK,
        LENGTH_IN_TENSOR=in_tensor,
        num_warps=4,
    )
    return out


def window_attention_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor,
    query_slots: torch.Tensor,
    *,
    scale: float,
    length: int | torch.Tensor | None = None,
    attention=attention_reference,
) -> torch.Tensor:
    """The twin, and the reference ``window_attention`` op: W queries per row over a layer's
    static KV cache, ``attention`` (``attention_reference``, or a backend's own dense-mask
    attention) with the dense mask of the window.

    q (B, H, W, D); keys, values (B, KV, C, D): the whole cache; visible (B, C) bool, the row's
    open slots (True = may attend); query_slots (B, W) integer: the slot query w of row b was
    written to. Query w of row b attends slot j iff ``visible[b, j]`` and
    ``j <= query_slots[b, w]`` (causal with per-row offsets); it sees its own slot, so it sees
    at least one. ``length``, when given, is a bound: every query slot lies below it, so no slot
    at or past it is read. A Python int, a one-element integer tensor on the device (a CUDA
    graph's changing bound), or None; only an int slices the cache here (as
    ``decode_attention_reference``: a tensor would need a host read). Returns (B, H, W, D).
    """
    if isinstance(length, int):
        keys, values, visible = keys[:, :, :length], values[:, :, :length], visible[:, :length]
    return attention(q, keys, values, mask=window_mask(visible, query_slots), scale=scale)


def window_mask(visible: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """The window's dense mask (B, 1, W, C) bool for ``attention``: slot j of row b for query w
    iff ``visible[b, j]`` and ``j <= query_slots[b, w]``; C = visible's length."""
    slots = torch.arange(visible.shape[1], device=visible.device)
    return (slots <= query_slots[:, :, None]).logical_and_(visible[:, None, :])[:, None]
