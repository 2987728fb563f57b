"""LoRA adapters made by PEFT on the reference models, loaded into ours: same outputs.

Every adapter has random A and B (``lora_helpers``): an unapplied or misplaced update changes the
logits by far more than the tolerances, which ``test_*_adapter_changes_the_output`` checks."""

from __future__ import annotations

import json

import pytest
import torch
from ar_helpers import prompt_logits
from lora_helpers import peft_ar, peft_dit, set_scale
from safetensors.torch import load_file, save_file

from glm_image.config import CheckpointConfig
from glm_image.engine import ArEngine
from glm_image.lora import LoraError, LoraSet, fit, merge, read_adapters
from glm_image.models.dit import DitModel
from glm_image.weights import build_on_meta, load_weights

PROMPT = "A storefront sign that says 'OPEN'"
QV = r".*language_model.*\.(q_proj|v_proj)"  # a part of the fused qkv only


@pytest.fixture(scope="module")
def made(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {
        "root": root,
        "ar": peft_ar(tiny_checkpoint, root / "ar"),
        "ar_qv": peft_ar(
            tiny_checkpoint, root / "ar_qv", seed=3, r=2, lora_alpha=3, target_modules=QV, use_rslora=True
        ),
        "dit": peft_dit(tiny_checkpoint, root / "dit", lora_alpha=8),
    }


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return ArEngine.from_pretrained(tiny_checkpoint)


def _reference_logits(model, engine, prompt=PROMPT):
    with torch.no_grad():
        return model(**engine.processor_inputs(prompt, 512, 512)).logits


def _ours(engine, lora: LoraSet, selection, prompts=PROMPT):
    with lora.selected(selection):
        return prompt_logits(engine, prompts, 512, 512)[0]


@pytest.fixture(scope="module")
def ar_set(engine, made):
    lora = LoraSet(engine.model)
    lora.add("full", read_adapters(made["root"] / "ar")["ar"])
    lora.add("qv", read_adapters(made["root"] / "ar_qv")["ar"])
    yield lora
    lora.remove()


@pytest.mark.parametrize(("name", "scale"), [("ar", 1.0), ("ar_qv", 1.0), ("ar", 0.5)])
def test_ar_logits_equal_peft(engine, made, ar_set, name, scale):
    reference = made[name]
    set_scale(reference, scale)
    try:
        expected = _reference_logits(reference, engine)
    finally:
        set_scale(reference, 1.0)
    ours = _ours(engine, ar_set, (({"ar": "full", "ar_qv": "qv"}[name], scale),))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_ar_adapter_changes_the_output_and_scale_zero_is_the_base(engine, ar_set):
    base = prompt_logits(engine, PROMPT, 512, 512)[0]
    assert (_ours(engine, ar_set, (("full", 1.0),)) - base).abs().max() > 1e-2
    assert torch.equal(_ours(engine, ar_set, (("full", 0.0),)), base)
    assert torch.equal(_ours(engine, ar_set, ()), base)


def test_two_adapters_in_one_batch_equal_each_alone(engine, ar_set):
    prompts = [PROMPT, PROMPT, PROMPT]
    rows = [(("full", 1.0),), (("qv", 0.7),), ()]
    mixed = _ours(engine, ar_set, rows, prompts)
    for row, choice in enumerate(rows):
        alone = _ours(engine, ar_set, choice, prompts)[row]
        torch.testing.assert_close(mixed[row], alone, rtol=0, atol=1e-5)
    assert torch.equal(mixed[2], prompt_logits(engine, prompts, 512, 512)[0][2]), "no adapter: the base bits"


def test_the_graph_step_applies_each_rows_adapter(engine, ar_set, monkeypatch):
    """The decode step a device graph replays (``decode_step='static'``, run eagerly here: its
    static buffers, device-side counters and the hooks' row indices made at the prefill) writes
    the eager loop's tokens with a different adapter per row, in one batch that decodes together."""
    monkeypatch.setattr(engine, "batch_invariant", False)
    prompts = [PROMPT, "a cat", PROMPT]
    rows = [(("full", 1.0),), (("qv", 0.7),), ()]
    call = {"seeds": [1, 2, 3], "max_new_tokens": 24}
    with ar_set.selected(rows):
        eager = engine.generate(prompts, 64, 64, **call)
        monkeypatch.setattr(engine, "decode_step", "static")
        static = engine.generate(prompts, 64, 64, **call)
    assert (eager.decode_step, static.decode_step) == ("eager", "static")
    assert torch.equal(static.tokens, eager.tokens)
    monkeypatch.setattr(engine, "decode_step", "eager")
    assert not torch.equal(engine.generate(prompts, 64, 64, **call).tokens, eager.tokens), (
        "adapters change tokens"
    )


def test_merged_equals_unmerged_and_stacks(tiny_checkpoint, engine, made, ar_set):
    merged = ArEngine.from_pretrained(tiny_checkpoint)
    for name, scale in (("ar", 0.8), ("ar_qv", -0.5)):
        merge(merged.model, fit(merged.model, read_adapters(made["root"] / name)["ar"]), scale)
    expected = _ours(engine, ar_set, (("full", 0.8), ("qv", -0.5)))
    torch.testing.assert_close(prompt_logits(merged, PROMPT, 512, 512)[0], expected, rtol=0, atol=1e-5)


def test_unmerged_on_a_quantized_linear_adds_the_update_and_merge_refuses(tiny_checkpoint, made):
    quantized = ArEngine.from_pretrained(tiny_checkpoint, quantize="int8")
    adapter = read_adapters(made["root"] / "ar")["ar"]
    with pytest.raises(LoraError, match=r"quantized.*unmerged"):
        merge(quantized.model, fit(quantized.model, adapter), 1.0)
    lora = LoraSet(quantized.model)
    lora.add("a", adapter)
    linear = quantized.model.layers[0].mlp.gate_up_proj
    x = torch.randn(2, 3, linear.in_features)
    update = adapter.modules["model.language_model.layers.0.mlp.gate_up_proj"]
    with torch.no_grad():
        base = linear(x)
        with lora.selected((("a", 0.5),)):
            got = linear(x)
    torch.testing.assert_close(got, base + 0.5 * (x @ update.a.T) @ update.b.T, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- the DiT


@pytest.fixture(scope="module")
def dit(tiny_checkpoint):
    config = CheckpointConfig.from_dir(tiny_checkpoint).dit
    ours = build_on_meta(lambda: DitModel(config))
    load_weights(ours, tiny_checkpoint / "transformer", key_map=ours.checkpoint_key_map())
    return ours.eval()


def _dit_inputs(config, batch=2, height=8, width=12, text=5):
    g = torch.Generator().manual_seed(0)
    n = (height // 2) * (width // 2)
    return {
        "latents": torch.randn(batch, 16, height, width, generator=g),
        "glyph": torch.randn(batch, text, config.text_embed_dim, generator=g),
        "prior_ids": torch.randint(0, 16384, (batch, n), generator=g),
        "prior_drop": torch.zeros(batch, n, dtype=torch.bool),
        "timestep": torch.linspace(999, 100, batch),
        "target_size": torch.tensor([[height * 8.0, width * 8.0]] * batch),
        "crop_coords": torch.zeros(batch, 2),
    }


def _dit_reference(model, x):
    with torch.no_grad():
        return model(
            hidden_states=x["latents"],
            encoder_hidden_states=x["glyph"],
            prior_token_id=x["prior_ids"],
            prior_token_drop=x["prior_drop"],
            timestep=x["timestep"],
            target_size=x["target_size"],
            crop_coords=x["crop_coords"],
            return_dict=False,
        )[0]


def _diffusers_files(folder, tmp_path):
    """The PEFT save rewritten as diffusers' ``save_lora_weights`` names it, and in the older
    ``lora.down`` / ``lora.up`` naming with per-module ``alpha`` tensors."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    modules = {k.removeprefix("base_model.model.") for k in tensors}
    new = {f"transformer.{k}": tensors[f"base_model.model.{k}"] for k in modules}
    meta = {"lora_adapter_metadata": json.dumps({"r": config["r"], "lora_alpha": config["lora_alpha"]})}
    save_file(new, tmp_path / "diffusers.safetensors", metadata=meta)
    old = {}
    for key, value in tensors.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        old[
            key.removeprefix("base_model.model.")
            .replace(".lora_A.", ".lora.down.")
            .replace(".lora_B.", ".lora.up.")
        ] = value
        old[f"{module}.alpha"] = torch.tensor(float(config["lora_alpha"]))
    save_file(old, tmp_path / "old.safetensors")
    return tmp_path / "diffusers.safetensors", tmp_path / "old.safetensors"


def test_dit_velocity_equals_peft_in_every_format(dit, made, tmp_path):
    x = _dit_inputs(dit.config)
    expected = _dit_reference(made["dit"], x)
    lora = LoraSet(dit)
    try:
        for index, path in enumerate(
            (made["root"] / "dit", *_diffusers_files(made["root"] / "dit", tmp_path))
        ):
            lora.add(f"a{index}", read_adapters(path)["dit"])
            with torch.no_grad(), lora.selected(((f"a{index}", 1.0),)):
                torch.testing.assert_close(dit(**x), expected, rtol=0, atol=1e-5, msg=str(path))
        with torch.no_grad():
            base = dit(**x)
            assert (expected - base).abs().max() > 1e-2
            with lora.selected((("a0", 0.0),)):
                assert torch.equal(dit(**x), base)
            with lora.selected([(("a0", 1.0),), ()]):
                mixed = dit(**x)
        torch.testing.assert_close(mixed[0], expected[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(mixed[1], base[1], rtol=0, atol=1e-5)
    finally:
        lora.remove()


def test_dit_merged_equals_unmerged(tiny_checkpoint, dit, made):
    x = _dit_inputs(dit.config)
    merged = build_on_meta(lambda: DitModel(dit.config))
    load_weights(merged, tiny_checkpoint / "transformer", key_map=merged.checkpoint_key_map())
    merge(merged, fit(merged, read_adapters(made["root"] / "dit")["dit"]), 0.6)
    lora = LoraSet(dit)
    lora.add("a", read_adapters(made["root"] / "dit")["dit"])
    try:
        with torch.no_grad(), lora.selected((("a", 0.6),)):
            expected = dit(**x)
        with torch.no_grad():
            torch.testing.assert_close(merged.eval()(**x), expected, rtol=0, atol=1e-5)
    finally:
        lora.remove()


# ---------------------------------------------------------------- errors


def test_errors_name_the_problem(engine, dit, made, tmp_path):
    with pytest.raises(LoraError, match="lacks: transformer_blocks"):
        fit(
            engine.model,
            read_adapters(made["root"] / "dit")["dit"].__class__(
                **{**vars(read_adapters(made["root"] / "dit")["dit"]), "stage": "ar"}
            ),
        )
    with pytest.raises(LoraError, match=r"lacks: model\.language_model"):
        fit(dit, read_adapters(made["root"] / "ar")["ar"])
    # a rank that does not fit the module: B cut to the wrong width
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((made["root"] / "ar" / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(made["root"] / "ar" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key] = tensors[key][:, :2].contiguous()
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(LoraError, match=r"q_proj: A .* and B .* are not a rank-r pair"):
        read_adapters(broken)
    # another base model: wider in-features, and a class that is not GLM-Image's
    tensors = load_file(made["root"] / "ar" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("o_proj.lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(LoraError, match=r"o_proj: .* do not fit its weight .*another base model"):
        fit(engine.model, read_adapters(broken)["ar"])
    config["auto_mapping"] = {"base_model_class": "LlamaForCausalLM"}
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoraError, match="made for a LlamaForCausalLM"):
        read_adapters(broken)
    with pytest.raises(LoraError, match="no such file"):
        read_adapters(tmp_path / "absent")
    lora = LoraSet(engine.model)
    with (
        pytest.raises(LoraError, match="'nope' is not loaded; allowed: none loaded"),
        lora.selected((("nope", 1.0),)),
    ):
        pass


def test_tensor_parallel_shards_take_their_slice_of_the_update(tiny_checkpoint, made):
    """Each of 2 AR ranks, the adapter merged into its shard, holds exactly its rows / columns of
    the merged unsharded weights (q/k/v heads, o_proj columns, gate/up rows, down columns); its
    unmerged update equals its merged one."""
    from glm_image.models.ar import ArModel
    from glm_image.parallel.comm import Comm
    from glm_image.weights import load_model

    config = CheckpointConfig.from_dir(tiny_checkpoint).ar.text
    folder = tiny_checkpoint / "vision_language_encoder"
    adapter = read_adapters(made["root"] / "ar")["ar"]
    full = load_model(lambda: ArModel(config), folder)
    merge(full, fit(full, adapter), 0.9)
    d, heads, kv, inter = (
        config.head_dim,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
    )
    for rank in range(2):
        shard = load_model(lambda r=rank: ArModel(config, tp=Comm(size=2, rank=r, ranks=(0, 1))), folder)
        fitted = fit(shard, adapter)
        lora = LoraSet(shard)
        lora.add("a", adapter)
        x = torch.randn(1, 2, config.hidden_size)
        base_out = shard.layers[0].self_attn.qkv_proj(x)
        with torch.no_grad(), lora.selected((("a", 0.9),)):
            unmerged = shard.layers[0].self_attn.qkv_proj(x)
        lora.remove()
        merge(shard, fitted, 0.9)
        torch.testing.assert_close(
            unmerged, shard.layers[0].self_attn.qkv_proj(x).detach(), rtol=0, atol=1e-5
        )
        assert (unmerged - base_out).abs().max() > 1e-3
        (q0, q1), (k0, k1), (m0, m1) = shard.shard.q_heads, shard.shard.kv_heads, shard.shard.mlp
        for ours, theirs in zip(shard.layers, full.layers, strict=True):
            qkv = theirs.self_attn.qkv_proj.weight
            rows = torch.cat(
                [
                    qkv[q0 * d : q1 * d],
                    qkv[(heads + k0) * d : (heads + k1) * d],
                    qkv[(heads + kv + k0) * d : (heads + kv + k1) * d],
                ]
            )
            torch.testing.assert_close(ours.self_attn.qkv_proj.weight, rows, rtol=0, atol=1e-6)
            torch.testing.assert_close(
                ours.self_attn.o_proj.weight,
                theirs.self_attn.o_proj.weight[:, q0 * d : q1 * d],
                rtol=0,
                atol=1e-6,
            )
            gate_up = theirs.mlp.gate_up_proj.weight
            torch.testing.assert_close(
                ours.mlp.gate_up_proj.weight,
                torch.cat([gate_up[m0:m1], gate_up[inter + m0 : inter + m1]]),
                rtol=0,
                atol=1e-6,
            )
            torch.testing.assert_close(
                ours.mlp.down_proj.weight, theirs.mlp.down_proj.weight[:, m0:m1], rtol=0, atol=1e-6
            )


def test_lora_flags_parse_path_scale_and_name():
    from glm_image.lora import parse_lora, parse_named_lora

    assert parse_lora("a/b") == ("a/b", 1.0)
    assert parse_lora("a/b:0.5") == ("a/b", 0.5)
    assert parse_lora("odd:name") == ("odd:name", 1.0)  # only a trailing number is a scale
    assert parse_lora("a:-1") == ("a", -1.0)
    assert parse_named_lora("ink=dir/x.safetensors:2") == ("ink", "dir/x.safetensors", 2.0)
    with pytest.raises(LoraError, match="finite"):
        parse_lora("a:inf")
    with pytest.raises(LoraError, match="no path"):
        parse_lora(":0.5")
    with pytest.raises(LoraError, match="expected NAME=PATH"):
        parse_named_lora("bad name=x")
