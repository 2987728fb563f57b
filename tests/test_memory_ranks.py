"""The memory estimate on several devices (issue 25): one device's share of tensor-parallel,
CFG-parallel and Ulysses ranks, and the plan that follows from it.

The per-rank weights are checked against the whole model's state dict split by hand (which
tensors a tensor-parallel rank slices, and how), not against the rank model the estimate builds;
the activation terms against the formulas written out from the configs.
"""

from __future__ import annotations

import json

import pytest
import torch

from glm_image.config import CheckpointConfig
from glm_image.errors import GlmImageError
from glm_image.parallel.config import ParallelConfig
from glm_image.residency import RESERVE, estimate_memory, plan_memory, weight_bytes

F32 = torch.float32


def _ar_whole_and_split_bytes(root) -> tuple[int, int]:
    """(bytes of the whole AR decoder, bytes a tensor-parallel split divides), float32, from the
    whole model's state dict: the attention (q/k/v with their biases, o) and MLP weights of every
    layer and the lm_head are sliced; the embedding and the norms are not."""
    from glm_image.models.ar import ArModel
    from glm_image.weights import build_on_meta

    model = build_on_meta(lambda: ArModel(CheckpointConfig.from_dir(root).ar.text))
    whole = split = 0
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * 4
        whole += nbytes
        if name.startswith("lm_head") or any(
            part in name for part in ("qkv_proj", "o_proj.weight", "gate_up_proj", "down_proj")
        ):
            split += nbytes
    return whole, split


def test_a_tensor_parallel_rank_holds_half_the_sliced_weights(tiny_checkpoint):
    whole, split = _ar_whole_and_split_bytes(tiny_checkpoint)
    one = weight_bytes(tiny_checkpoint, "none", F32)["ar_text_decoder"]["bytes"]
    rank = weight_bytes(tiny_checkpoint, "none", F32, ar_tp=2)["ar_text_decoder"]["bytes"]
    assert one == whole
    # tiny: 4 query heads and 2 KV heads, so at 2 ranks every sliced tensor halves exactly
    assert rank == whole - split // 2


@pytest.mark.parametrize("tp", [2, 4])
def test_a_ranks_kv_cache_holds_its_kv_heads(tiny_checkpoint, tp):
    text = CheckpointConfig.from_dir(tiny_checkpoint).ar.text
    one = estimate_memory(tiny_checkpoint, "none", F32, height=256, width=256).parts
    ranks = estimate_memory(
        tiny_checkpoint, "none", F32, height=256, width=256, parallel=ParallelConfig(ar_tp=tp)
    ).parts
    # tiny has 2 KV heads: 2 ranks hold one each; 4 ranks hold one each too (replicated)
    kv_per_rank = max(1, text.num_key_value_heads // tp)
    assert ranks["ar_kv_cache"] * text.num_key_value_heads == one["ar_kv_cache"] * kv_per_rank
    assert ranks["ar_scores"] * tp == one["ar_scores"]
    assert ranks["ar_noise"] == one["ar_noise"]  # the first rank draws every row's noise


def test_cfg_and_ulysses_ranks_hold_their_rows_and_tokens(tiny_checkpoint):
    kwargs = {"height": 256, "width": 256, "batch": 2, "conditions": 1, "step_cache": True}
    one = estimate_memory(tiny_checkpoint, "none", F32, **kwargs).parts
    cfg = estimate_memory(
        tiny_checkpoint, "none", F32, parallel=ParallelConfig(dit_cfg_parallel=True), **kwargs
    ).parts
    sp = estimate_memory(tiny_checkpoint, "none", F32, parallel=ParallelConfig(dit_sp=2), **kwargs).parts
    assert cfg["dit_block"] * 2 == one["dit_block"]  # one branch's rows
    assert cfg["dit_step_cache"] * 2 == one["dit_step_cache"]
    assert cfg["dit_condition_kv"] == one["dit_condition_kv"]  # the conditional branch's, whole
    assert sp["dit_condition_kv"] * 2 == one["dit_condition_kv"]  # 256 tokens split evenly
    assert sp["dit_step_cache"] * 2 == one["dit_step_cache"]
    assert sp["vae_decode"] == one["vae_decode"]  # the first rank decodes every image


def test_placement_separate_takes_the_larger_stage_and_same_adds_them(tiny_checkpoint):
    same = estimate_memory(tiny_checkpoint, "none", F32, parallel=ParallelConfig(ar_tp=2))
    apart = estimate_memory(
        tiny_checkpoint, "none", F32, parallel=ParallelConfig(ar_tp=2, placement="separate")
    )
    ar = apart.ar_stage + apart.ar_activations
    dit = apart.dit_stage + max(apart.dit_activations, apart.vae_activations)
    assert apart.peak("resident") == max(ar, dit) + RESERVE
    run = max(same.ar_activations, same.dit_activations, same.vae_activations)
    assert same.peak("resident") == same.ar_stage + same.dit_stage + run + RESERVE
    assert same.residencies == ("resident",) and list(same.to_json()["peak_bytes"]) == ["resident"]
    with pytest.raises(GlmImageError, match=r"residency = 'swap'.*allowed: resident"):
        same.peak("swap")


def test_the_plan_is_one_devices_and_fits_where_one_device_would_not():
    """The released preset at bf16 on meta: 34.6 GB on one device does not fit 24 GB; with the AR
    on 2 ranks and the DiT on its own devices each device needs at most the DiT's share."""
    from glm_image.synthetic import preset_dir

    root = preset_dir("glm-image")
    one = plan_memory(root, "meta", torch.bfloat16, quantize="none", max_memory="24GB", residency="resident")
    apart = ParallelConfig(ar_tp=2, dit_cfg_parallel=True, placement="separate")
    spread = plan_memory(root, "meta", torch.bfloat16, quantize="none", max_memory="24GB", parallel=apart)
    assert not one.fits and spread.fits and spread.residency == "resident"
    assert spread.peak_bytes < one.peak_bytes and "each device" in spread.reason
    with pytest.raises(GlmImageError, match=r"residency = 'dit_offload'.*allowed: resident or none"):
        plan_memory(root, "meta", torch.bfloat16, max_memory="24GB", residency="dit_offload", parallel=apart)


def test_info_json_gives_the_plan_of_one_device(cli):
    out = cli(
        "info", "--preset", "glm-image", "--quantize", "int8", "--json", "--ar-tp", "2", "--dit-sp", "2"
    )
    plan = json.loads(out.stdout)["plan"]
    assert plan["parallel"] == "AR tensor parallel x2, DiT Ulysses SP x2 (placement: same)"
    assert plan["estimate"]["ranks"] == {"ar_tp": 2, "dit_cfg": 1, "dit_sp": 2, "placement": "same"}
    assert list(plan["estimate"]["peak_bytes"]) == ["resident"]
    whole = json.loads(out.stdout)["components"]["ar_text_decoder"]["bytes"]
    assert plan["estimate"]["weights_bytes"]["ar_text_decoder"] < 0.7 * whole


def test_the_graph_buckets_the_ar_keeps_count_while_it_stays_on_the_device(tiny_checkpoint):
    """``engine.graphs`` keeps up to ``DEFAULT_BUCKETS`` buckets (a KV cache and noise each) after
    a call: resident and on the AR's own devices they stay through the DiT; a residency that
    moves the AR off the device clears them (``ArEngine.to``)."""
    from glm_image.engine.graphs import DEFAULT_BUCKETS

    plain = estimate_memory(tiny_checkpoint, "none", F32, height=256, width=256)
    kept = estimate_memory(tiny_checkpoint, "none", F32, height=256, width=256, graph_buckets=DEFAULT_BUCKETS)
    bucket = plain.parts["ar_kv_cache"] + plain.parts["ar_noise"]
    assert kept.kept == DEFAULT_BUCKETS * bucket > 0
    assert kept.peak("resident") == plain.peak("resident") + DEFAULT_BUCKETS * bucket
    for residency in ("swap", "dit_offload", "offload"):
        assert kept.peak(residency) == plain.peak(residency)
    # planned for an accelerator (meta) they are counted; on a CPU (no graphs) they are not
    assert plan_memory(tiny_checkpoint, "meta", F32).graph_buckets == DEFAULT_BUCKETS
    assert plan_memory(tiny_checkpoint, "cpu", F32).estimate.kept == 0
