"""Window attention (a Jacobi window: W queries per row, causal with per-row offsets): the Triton
kernel and the ``sdpa`` op against SDPA with an explicit dense mask, the ``triton`` op's
fallbacks, and Jacobi decoding through it on the tiny model.

The oracle's mask is built element by element here (query w of row b sees slot j iff the slot
is open, j <= the query's slot and j < length), independently of the twin's vectorised mask.
Kernels run on CUDA when present, otherwise in Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``). Slots no query sees hold NaN (keys) and inf (values) when the kernel
runs: a masked load that leaked them would poison the result.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import glm_image_kernels as gk

from glm_image.ops import TorchOps
from glm_image.ops.selfcheck import TOLERANCES, CheckSizes
from glm_image.ops.triton_ops import TritonOps

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not gk.interpreted():
    pytest.skip("CPU run without TRITON_INTERPRET=1 at import time", allow_module_level=True)


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def _window(b: int, h: int, kv: int, w: int, capacity: int, d: int, dtype: torch.dtype, seed: int):
    """q (a strided view of a fused projection, as in the model), the cache, the rows' open slots
    (left padding, random holes, the window's own slots open) and query slots: row r's window
    starts 5 + 7r slots in, so every row sits at its own position."""
    q = _randn(b, w, h + 2 * kv, d, dtype=dtype, seed=seed)[:, :, :h].transpose(1, 2)  # (B, H, W, D)
    keys, values = (_randn(b, kv, capacity, d, dtype=dtype, seed=seed + s) for s in (1, 2))
    g = torch.Generator().manual_seed(seed + 3)
    visible = torch.rand(b, capacity, generator=g) > 0.3
    visible[-1, :4] = False  # left padding of the last row
    query_slots = torch.stack([torch.arange(w) + 5 + 7 * r for r in range(b)])
    visible[torch.arange(b)[:, None], query_slots] = True
    return q, keys, values, visible.to(DEVICE), query_slots.to(DEVICE)


def _dense_mask(visible: torch.Tensor, query_slots: torch.Tensor, length: int, off: int = 0) -> torch.Tensor:
    """(B, 1, W, C) bool, one element at a time; ``off`` = 1 is the off-by-one causal bound."""
    b, capacity = visible.shape
    w = query_slots.shape[1]
    rows = [
        [[bool(visible[r, j]) and j <= int(query_slots[r, t]) - off and j < length for j in range(capacity)]
        for t in range(w)]
        for r in range(b)
    ]  # fmt: skip
    return torch.tensor(rows, device=visible.device)[:, None]


def _oracle(q, keys, values, mask, scale):
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)


def _poison(keys, values, visible, query_slots):
    """NaN / inf in every slot no query of its row sees: closed, or past the row's last query."""
    b, kv, capacity, d = keys.shape
    past = torch.arange(capacity, device=keys.device) > query_slots.max(dim=1, keepdim=True).values
    unseen = (~visible | past)[:, None, :, None].expand(b, kv, capacity, d)
    return keys.masked_fill(unseen, float("nan")), values.masked_fill(unseen, float("inf"))


def _close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# (B, H, KV, W, capacity, D, length, split_size, dtype): length "int", "tensor" or None (the
# whole cache); split_size None = the default heuristic
CASES = [
    (2, 4, 2, 1, 40, 32, "int", 16, torch.float32),  # W = 1: a decode step with per-row slots
    (2, 4, 2, 3, 50, 32, "tensor", 16, torch.bfloat16),  # a device-tensor bound, chunks past it exit
    (3, 8, 2, 8, 45, 16, None, None, torch.float32),  # GQA 4: 32 rows, two programs of 16 (float32)
    (1, 16, 2, 16, 48, 32, "int", 16, torch.bfloat16),  # W = 16, GQA 8: one program of 128 rows
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).removeprefix("torch.") for x in c))
def test_the_kernel_and_the_reference_equal_sdpa_with_the_dense_mask(case):
    b, h, kv, w, capacity, d, length_kind, split, dtype = case
    q, keys, values, visible, query_slots = _window(b, h, kv, w, capacity, d, dtype, seed=sum(case[:6]))
    bound = int(query_slots.max()) + 1 + (3 if length_kind == "int" else 0)  # the int: past the last query
    scale = d**-0.5
    expected = _oracle(q, keys, values, _dense_mask(visible, query_slots, bound), scale)
    length = {"int": bound, "tensor": torch.tensor([bound], device=DEVICE), None: None}[length_kind]

    reference = gk.window_attention_reference(
        q, keys, values, visible, query_slots, scale=scale, length=length
    )
    _close(reference, expected, dtype, f"reference {case}")

    poisoned = _poison(keys, values, visible, query_slots)
    out = gk.window_attention(
        q, *poisoned, visible, query_slots, scale=scale, length=length, split_size=split
    )
    assert out.is_contiguous()
    _close(out, expected, dtype, f"kernel {case}")
    if w > 1:  # the comparison can fail: an off-by-one causal bound is far outside the tolerance
        mask = _dense_mask(visible, query_slots, bound, off=1) | _first_slot(visible)
        off = _oracle(q, keys, values, mask, scale)
        assert (off.float() - out.float()).abs().max() > 10 * sum(TOLERANCES[dtype])


def _first_slot(visible: torch.Tensor) -> torch.Tensor:
    """Keeps every query of the off-by-one mask seeing at least one slot (the row's first open)."""
    first = torch.zeros_like(visible)
    first[torch.arange(visible.shape[0]), visible.long().argmax(dim=1)] = True
    return first[:, None, None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_one_query_window_is_the_decode_step(dtype):
    """W = 1 with every row's query at the bound's last slot: the decode kernel's maths (the
    shared tile step and reduce), bit for bit. (The decode kernel itself is unchanged by the
    window's: its outputs were compared bit for bit before and after, and tests/test_kernels.py
    holds it against its twin.)"""
    b, h, kv, capacity, d, bound = 2, 16, 1, 77, 64, 70
    q, keys, values, visible, _ = _window(b, h, kv, 1, capacity, d, dtype, seed=9)
    visible[:, bound - 1], visible[:, bound:] = True, False
    slots = torch.full((b, 1), bound - 1, device=DEVICE)
    for length, split in ((bound, 32), (torch.tensor([bound], device=DEVICE), 64)):
        decode = gk.decode_attention(q, keys, values, visible, scale=d**-0.5, length=length, split_size=split)
        window = gk.window_attention(
            q, keys, values, visible, slots, scale=d**-0.5, length=length, split_size=split
        )
        if DEVICE.type == "cpu":
            assert torch.equal(window, decode), f"length {length}, split {split}"
        else:  # compiled apart, the two kernels' products may be scheduled differently
            _close(window, decode, dtype, f"length {length}, split {split}")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
def test_the_kernel_replays_in_a_cuda_graph_with_moving_windows():
    """One capture, replayed as Jacobi's static step runs it: the rows' windows and the bound
    move between replays (device tensors updated in place)."""
    b, h, kv, w, capacity, d = 2, 32, 2, 8, 300, 128
    q, keys, values, visible, _ = _window(b, h, kv, w, capacity, d, torch.bfloat16, seed=5)
    visible.fill_(True)
    slots = torch.zeros(b, w, dtype=torch.long, device=DEVICE)
    length = torch.zeros(1, dtype=torch.int32, device=DEVICE)

    def move(end: int) -> None:
        slots.copy_(torch.stack([torch.arange(w) + end - w - 11 * r for r in range(b)]))
        length.fill_(end)

    move(100)
    gk.window_attention(q, keys, values, visible, slots, scale=d**-0.5, length=length)  # compile outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gk.window_attention(q, keys, values, visible, slots, scale=d**-0.5, length=length)
    for end in (100, 101, 257, 300):
        move(end)
        graph.replay()
        expected = gk.window_attention_reference(q, keys, values, visible, slots, scale=d**-0.5, length=end)
        _close(out, expected, torch.bfloat16, f"replay at {end}")


def test_bad_inputs_name_what_does_not_fit():
    q, keys, values, visible, slots = _window(1, 4, 2, 3, 20, 32, torch.float32, seed=1)
    with pytest.raises(ValueError, match="do not fit"):
        gk.window_attention(q, keys, values, visible, slots[:, :2], scale=1.0)
    with pytest.raises(ValueError, match="query_slots holds integers"):
        gk.window_attention(q, keys, values, visible, slots.float(), scale=1.0)
    with pytest.raises(ValueError, match="must be a multiple of"):
        gk.window_attention(q, keys, values, visible, slots, scale=1.0, split_size=24)


# ---------------------------------------------------------------------- the ops layer


def _checked_ops(tiny_ar) -> TritonOps:
    """A ``triton`` backend whose self-check ran at the tiny model's sizes (once per process; at
    the released sizes the interpreter would take seconds), as an engine checks its own."""
    ops = TritonOps(DEVICE)
    rows = ops.verify(torch.float32, CheckSizes.from_config(tiny_ar.config))
    assert {row.op: row.status for row in rows}.get("window_attention") == "ok"
    return ops


def test_the_ops_take_the_kernel_or_fall_back_with_their_reason(tiny_ar):
    ops, ref = _checked_ops(tiny_ar), TorchOps(DEVICE)
    assert TorchOps.window_attention is gk.window_attention_reference  # the twin is the reference op
    q, keys, values, visible, slots = _window(2, 4, 2, 3, 30, 32, torch.float32, seed=2)
    with torch.inference_mode():
        out = ops.window_attention(q, keys, values, visible, slots, scale=0.2, length=20)
        _close(
            out,
            ref.window_attention(q, keys, values, visible, slots, scale=0.2, length=20),
            torch.float32,
            "",
        )
        assert ops.fallbacks == []
        long_q = _randn(2, 4, gk.MAX_WINDOW + 1, 32, dtype=torch.float32, seed=3)
        long_slots = torch.arange(gk.MAX_WINDOW + 1, device=DEVICE).expand(2, -1)
        calls = [
            ((long_q, keys, values, visible, long_slots), f"a window of 17 queries (kernel serves 1 to {gk.MAX_WINDOW})"),
            ((q, keys, values, visible, slots.float()), "query_slots torch.float32 (2, 3) (needs integers (B, W))"),
            (_window(2, 4, 2, 3, 30, 24, torch.float32, seed=4), "head_dim 24 (kernel needs a power of two in [16, 256])"),
        ]  # fmt: skip
        for args, reason in calls:
            got = ops.window_attention(*args, scale=0.2, length=20)
            _close(got, ref.window_attention(*args, scale=0.2, length=20), torch.float32, reason)
            assert ("window_attention", reason) in ops.fallbacks


# ---------------------------------------------------------------------- the engine


def test_jacobi_through_the_kernel_writes_the_sequential_tokens(tiny_ar):
    """Greedy Jacobi decoding through the ``triton`` backend (two prompts of different lengths:
    rows at their own positions) writes sequential decoding's tokens (the ``sdpa`` backend)."""
    prompts = ["a sign that says 'OPEN'", "一张海报，标题写着「春节快乐」"]
    call = {"greedy": True, "max_new_tokens": 4}
    sequential = tiny_ar.generate(prompts, 64, 64, **call).tokens
    saved, tiny_ar.model.ops = tiny_ar.model.ops, _checked_ops(tiny_ar)
    try:
        jacobi = tiny_ar.generate(prompts, 64, 64, decoding="jacobi", jacobi_window=3, **call)
        fallbacks = tiny_ar.model.ops.fallbacks
    finally:
        tiny_ar.model.ops = saved
    assert torch.equal(jacobi.tokens, sequential)
    assert not [op for op, _ in fallbacks if op == "window_attention"], fallbacks
