"""LoRA on stages of several ranks (issue 28): tensor-parallel AR (each rank applies its shard's
part of the update: rows of B on a column shard, columns of A on a row shard, summed by the
model's all-reduce) and the DiT split by CFG over two gloo ranks, on the CPU, against the same
adapters on one process (tokens equal, pixels within 1/255, as the parallel tests allow for the
all-reduce's order of sums). The adapters travel in the calls (``lora.StageLora``): a stage that
never saw ``load`` (a replaced worker) reads them at its first call."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lora_helpers import peft_ar, peft_dit
from safetensors.torch import load_file, save_file

from glm_image import GlmImage
from glm_image.errors import GlmImageError
from glm_image.request import GenerationRequest

PROMPT = "A storefront sign that says 'OPEN'"
SIZE, STEPS = 128, 2


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    """Two adapters made by PEFT: ``both`` (AR and DiT, one folder) and ``ar`` (the AR alone,
    another seed and rank)."""
    root = tmp_path_factory.mktemp("lora")
    peft_ar(tiny_checkpoint, root / "both" / "vision_language_encoder")
    peft_dit(tiny_checkpoint, root / "both" / "transformer", lora_alpha=8)
    peft_ar(tiny_checkpoint, root / "ar", seed=7, r=8, lora_alpha=8)
    return root


@pytest.fixture(scope="module")
def single(tiny_checkpoint):
    """One process (the session's ``glm`` stays without adapters: other modules share it)."""
    return GlmImage.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def spread(tiny_checkpoint):
    """AR over two tensor-parallel ranks, the DiT's CFG branches over two ranks."""
    with GlmImage.from_pretrained(tiny_checkpoint, device="cpu", ar_tp=2, dit_cfg_parallel=True) as pipe:
        yield pipe


def _near(ours, expected) -> None:
    assert torch.equal(ours.prior_token_ids, expected.prior_token_ids)
    for a, b in zip(ours.images, expected.images, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def _generate(pipe, seed, lora=None):
    return pipe.generate(PROMPT, SIZE, SIZE, num_inference_steps=STEPS, seed=seed, lora=lora)


def test_an_adapter_on_ranks_gives_the_image_of_one_process(spread, single, adapters):
    lora = [(adapters / "both", 0.8)]
    ours = _generate(spread, 3, lora)
    expected = _generate(single, 3, lora)
    _near(ours, expected)
    base = _generate(single, 3)
    assert not torch.equal(expected.prior_token_ids, base.prior_token_ids), (
        "the adapter must change the tokens"
    )
    zero = _generate(spread, 3, [(adapters / "both", 0.0)])
    _near(zero, base)
    assert [a["stages"] for a in spread.lora.describe()] == [["ar", "dit"]]


def test_rows_with_different_adapters_share_a_call_on_ranks(spread, single, adapters):
    """One call over the ranks, each request with its own adapter (or none), equals each request
    alone on one process."""
    spread.load_lora("tuned", adapters / "ar")
    size = {"width": SIZE, "height": SIZE, "steps": STEPS}
    requests = [
        GenerationRequest(PROMPT, seed=11, lora=(("tuned", 1.0),), **size),
        GenerationRequest(PROMPT, seed=12, **size),
        GenerationRequest("a cat", seed=13, lora=((str(adapters / "both"), 0.5),), **size),
    ]
    outputs = spread.run_batch(requests)
    single.load_lora("tuned", adapters / "ar")
    for request, output in zip(requests, outputs, strict=True):
        _near(output, single.run(request))


def test_a_bad_adapter_fails_on_the_ranks_before_any_work(spread, adapters, tmp_path):
    """An adapter whose shapes fit no rank fails as ``load`` is called, naming the module; the
    ranks hold nothing of it and serve on."""
    broken = tmp_path / "broken"
    broken.mkdir()
    source = adapters / "ar"
    (broken / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    tensors = load_file(source / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("o_proj.lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(GlmImageError, match=r"o_proj: .* do not fit its weight"):
        spread.load_lora("broken", broken)
    assert "broken" not in spread.lora.sources
    with pytest.raises(GlmImageError, match="'broken'"):
        _generate(spread, 1, [("broken", 1.0)])
    assert json.loads((broken / "adapter_config.json").read_text())  # the file is untouched


def test_merged_at_load_on_tensor_parallel_ranks(tiny_checkpoint, single, adapters):
    """``from_pretrained(lora=...)`` merges each rank's shard of the update into its weights."""
    lora = [(adapters / "ar", 0.7)]
    with GlmImage.from_pretrained(tiny_checkpoint, device="cpu", ar_tp=2, lora=lora) as merged:
        assert merged.lora.merged and not merged.lora.sources
        _near(_generate(merged, 4), _generate(single, 4, lora))


def test_a_stage_that_never_saw_the_adapter_reads_it_at_its_call(tiny_checkpoint, single, adapters):
    """A call carries its adapters' sources: a fresh engine (a replaced worker) holds them at
    its first call and answers as the engine that loaded them beforehand."""
    import dataclasses

    from glm_image.engine import ArEngine
    from glm_image.lora import LoraRegistry
    from glm_image.stages import LocalStage, plan_call

    request = GenerationRequest(PROMPT, width=SIZE, height=SIZE, steps=STEPS, seed=21)
    fresh = LocalStage("ar", ArEngine.from_pretrained(tiny_checkpoint))
    registry = LoraRegistry({"ar": fresh, "dit": None})
    registry.sources["tuned"], registry.stages["tuned"] = str(adapters / "ar"), ("ar",)
    carried = registry.for_stages((("tuned", 1.0),))
    assert carried["dit"] is None and carried["ar"].sources == (("tuned", str(adapters / "ar")),)
    call = dataclasses.replace(plan_call([request], single.limits), lora=carried["ar"])
    prior = fresh.run(call)
    expected = _generate(single, 21, [(adapters / "ar", 1.0)])
    assert torch.equal(prior.prior_token_ids, expected.prior_token_ids)
