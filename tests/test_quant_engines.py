"""Quantized engines on the tiny checkpoint: what is quantized and what is kept, how it loads,
and how far logits, velocities and images move, within bounds that fail when a scale, a layout
or a kept layer is wrong (each mutation below is applied and must break its bound).

The bounds come from the tiny checkpoint's random weights (not the released model) with fixed
seeds, so they are deterministic; each holds with a margin (measured value in the comment).
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import nn

from glm_image.bench.metrics import psnr
from glm_image.engine import ArEngine, DitEngine
from glm_image.errors import GlmImageError, WeightsMismatchError
from glm_image.models.ar import ArModel
from glm_image.models.dit import DitModel
from glm_image.quant import QuantLinear, kept_linears, linear_quantizers, quantized_linears
from glm_image.quant.compare import dit_velocity, logit_metrics, relative_error, teacher_forced_logits
from glm_image.quant.formats import quantize
from glm_image.weights import load_model

PROMPTS = (("a cat holding a sign 'hello'", 512, 512), ("a red car", 768, 512))


def _load(engine_cls, root, kind: str):
    """An engine whose model is loaded in ``kind`` on the CPU, fp8 included (the engines refuse
    fp8 off a recent CUDA GPU; the formats and their CPU path are what is checked here)."""
    engine = engine_cls.from_pretrained(root)
    if kind != "none":
        if engine_cls is ArEngine:
            factory, folder = (
                (lambda: ArModel(engine.config.ar.text, engine.model.ops)),
                "vision_language_encoder",
            )
        else:
            factory, folder = (lambda: DitModel(engine.config.dit, engine.model.ops)), "transformer"
        engine.model = load_model(factory, root / folder, quantize=linear_quantizers(kind)).eval()
    return engine


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """``loaded(engine_cls, kind)``: an engine loaded once per module; each call gets its own
    copy of the model, so a test may mutate it."""
    cache = {}

    def get(engine_cls, kind: str):
        if (engine_cls, kind) not in cache:
            cache[engine_cls, kind] = _load(engine_cls, tiny_checkpoint, kind)
        engine = copy.copy(cache[engine_cls, kind])
        shared = (engine.model.ops, engine.model.config)  # not copied: read-only
        engine.model = copy.deepcopy(engine.model, {id(x): x for x in shared})
        return engine

    return get


def _quant_linears(model: nn.Module) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


# ---------------------------------------------------------------------- what is quantized


@pytest.mark.parametrize(
    ("engine_cls", "kind"), [(ArEngine, "int8"), (ArEngine, "ar=int4"), (DitEngine, "int8")]
)
def test_the_kept_layers_load_as_stored_and_the_rest_from_the_same_weights(tiny_checkpoint, engine_cls, kind):
    plain = engine_cls.from_pretrained(tiny_checkpoint)
    quant = engine_cls.from_pretrained(tiny_checkpoint, quantize=kind)
    names = quantized_linears(quant.model)
    assert names and {n for n, m in quant.model.named_modules() if isinstance(m, QuantLinear)} == set(names)
    for name in kept_linears(plain.model):  # the kept linears: plain nn.Linear, bit for bit
        module = quant.model.get_submodule(name)
        assert type(module) is nn.Linear and torch.equal(
            module.weight, plain.model.get_submodule(name).weight
        )
    for name, tensor in plain.model.state_dict().items():  # embeddings, norms, biases: the same
        if name.rpartition(".")[0] not in names or name.endswith(".bias"):
            assert torch.equal(quant.model.state_dict()[name], tensor), name
    for name in names:  # quantized from the stored weight, the bias kept
        module, linear = quant.model.get_submodule(name), plain.model.get_submodule(name)
        expected = quantize(linear.weight.contiguous(), module.kind)
        assert torch.equal(module.q, expected.data) and torch.equal(module.scale, expected.scale)
        assert (module.bias is None) == (linear.bias is None)
        assert module.bias is None or torch.equal(module.bias, linear.bias)
    kinds = {m.kind for m in _quant_linears(quant.model)}
    assert kinds == {"int4" if "int4" in kind else "int8"}
    if engine_cls is DitEngine:  # ByT5 and the VAE are never quantized
        assert not _quant_linears(quant.glyph.encoder) and not _quant_linears(quant.vae)
        assert "transformer_blocks.0.norm1.linear" in kept_linears(quant.model)


def test_loading_converts_one_full_precision_weight_at_a_time(tiny_checkpoint):
    """The loader reads a linear's weight, converts it and drops it before reading the next: at
    each conversion no earlier full-precision weight is alive."""
    seen: list[weakref.ref] = []
    alive_at_conversion: list[int] = []
    plan = linear_quantizers("int8")

    def watching(model):
        converters = plan(model)
        inner = next(iter(converters.values()))  # one converter serves every linear

        def convert(linear, weight):
            alive_at_conversion.append(sum(ref() is not None for ref in seen))
            seen.append(weakref.ref(weight))
            return inner(linear, weight)

        return dict.fromkeys(converters, convert)

    config = ArEngine.from_pretrained(tiny_checkpoint).config
    model = load_model(
        lambda: ArModel(config.ar.text), tiny_checkpoint / "vision_language_encoder", quantize=watching
    )
    assert len(seen) == len(quantized_linears(model)) and set(alive_at_conversion) == {0}
    assert all(ref() is None for ref in seen)


def test_quantized_loading_stays_strict(tiny_copy):
    import json

    from safetensors.torch import load_file, save_file

    folder = tiny_copy / "transformer"
    (index,) = folder.glob("*.index.json")
    where = json.loads(index.read_text())["weight_map"]

    def edit(name: str, change) -> None:
        shard = folder / where[name]
        tensors = load_file(shard)
        change(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})

    edit("transformer_blocks.0.ff.net.2.weight", lambda t: t.pop("transformer_blocks.0.ff.net.2.weight"))
    q = "transformer_blocks.0.attn1.to_q.weight"
    edit(q, lambda t: t.update({q: t[q][:, :-1].contiguous()}))
    index.write_text(
        json.dumps(
            {"weight_map": {k: v for k, v in where.items() if k != "transformer_blocks.0.ff.net.2.weight"}}
        )
    )
    with pytest.raises(WeightsMismatchError) as e:
        DitEngine.from_pretrained(tiny_copy, quantize="int8")
    assert "missing 1 tensor(s): 'transformer_blocks.0.ff.net.2.weight'" in str(e.value)
    assert "wrong shape (1): 'transformer_blocks.0.attn1.qkv.weight'" in str(e.value)


def test_formats_a_stage_cannot_take_fail_before_any_weight_loads(tiny_checkpoint, monkeypatch):
    import glm_image.engine.ar_engine as ar_engine
    import glm_image.engine.dit_engine as dit_engine

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(ar_engine, "load_model", no_loading)
    monkeypatch.setattr(dit_engine, "load_model", no_loading)
    with pytest.raises(GlmImageError, match=r"fp8 needs a CUDA GPU with FP8 tensor cores .* not cpu"):
        ArEngine.from_pretrained(tiny_checkpoint, quantize="fp8")
    with pytest.raises(GlmImageError, match="fp8 needs a CUDA GPU"):
        DitEngine.from_pretrained(tiny_checkpoint, quantize="ar=int8,dit=fp8")
    with pytest.raises(GlmImageError, match="int4 is built for the AR only"):
        DitEngine.from_pretrained(tiny_checkpoint, quantize="int4")
    with pytest.raises(GlmImageError, match="dit='int4' is not built; allowed for dit: none, int8, fp8"):
        DitEngine.from_pretrained(tiny_checkpoint, quantize="ar=int4,dit=int4")
    with pytest.raises(GlmImageError, match=r"'auto' is resolved by GlmImage\.from_pretrained"):
        ArEngine.from_pretrained(tiny_checkpoint, quantize="auto")


# ---------------------------------------------------------------------- how far it moves


def _scale(model: nn.Module, kind: str) -> None:  # every scale halved (e.g. max / 255, not / 127)
    for m in _quant_linears(model):
        m.scale.data = m.scale.data * 0.5


def _layout(model: nn.Module, kind: str) -> None:  # every weight read as if stored transposed
    for m in _quant_linears(model):
        m.q.data = m.q.data.t().contiguous().view(m.q.shape)


def _zero(model: nn.Module, kind: str) -> None:  # int4's zero point taken as the group's minimum
    for m in _quant_linears(model):
        m.zero.data = (m.zero.float() - 8 * m.scale.float()).to(m.zero.dtype)


def _kept_ar(model: nn.Module, kind: str) -> None:  # the lm_head quantized too (to 4 bits)
    model.lm_head.weight.data = quantize(model.lm_head.weight.data.contiguous(), "int4").dequantize()


def _kept_dit(model: nn.Module, kind: str) -> None:  # every kept linear quantized in the scheme's format
    for name in kept_linears(model):
        linear = model.get_submodule(name)
        parent, _, attr = name.rpartition(".")
        setattr(
            model.get_submodule(parent),
            attr,
            QuantLinear(quantize(linear.weight.data, kind), linear.bias, model.ops),
        )


@pytest.fixture(scope="module")
def ar_reference(tiny_checkpoint):
    engine = ArEngine.from_pretrained(tiny_checkpoint)
    paths = []
    for prompt, height, width in PROMPTS:
        tokens = engine.generate(prompt, height, width, seeds=[0], max_new_tokens=24).tokens[0]
        paths.append(
            (prompt, height, width, tokens, teacher_forced_logits(engine, prompt, height, width, tokens))
        )
    return paths


def _ar_kl(engine, paths) -> float:
    ref = torch.cat([p[4] for p in paths])
    got = torch.cat([teacher_forced_logits(engine, *p[:4]) for p in paths])
    return logit_metrics(ref, got)["kl"]


# KL(unquantized || quantized) of teacher-forced logits (48 steps); measured on tiny in comments
AR_BOUNDS = {"int8": 1e-3, "fp8": 7.5e-3, "int4": 7e-2}  # 2.0e-4, 5.1e-3, 4.6e-2
AR_MUTATIONS = [  # measured KL: int8 / fp8 / int4
    ("int8", _scale), ("int8", _layout), ("int8", _kept_ar),  # 0.21, 1.01, 5.1e-3
    ("fp8", _scale), ("fp8", _layout), ("fp8", _kept_ar),  # 0.21, 1.01, 1.0e-2
    ("int4", _scale), ("int4", _layout), ("int4", _zero),  # 0.90, 1.00, 0.96
]  # fmt: skip


def test_teacher_forcing_gives_the_decode_loops_logits(tiny_checkpoint, ar_reference):
    engine = ArEngine.from_pretrained(tiny_checkpoint)
    prompt, height, width, tokens, forced = ar_reference[0]
    decoded = engine.generate(prompt, height, width, seeds=[0], max_new_tokens=24, return_logits=True)
    assert torch.equal(decoded.tokens[0], tokens)
    torch.testing.assert_close(torch.cat(decoded.logits), forced, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(AR_BOUNDS))
def test_quantized_ar_logits_stay_within_their_bound(loaded, ar_reference, kind):
    assert _ar_kl(loaded(ArEngine, kind), ar_reference) <= AR_BOUNDS[kind]


@pytest.mark.parametrize(
    ("kind", "mutation"), AR_MUTATIONS, ids=[f"{k}-{m.__name__[1:]}" for k, m in AR_MUTATIONS]
)
def test_a_wrong_scale_layout_or_kept_layer_breaks_the_ar_bound(loaded, ar_reference, kind, mutation):
    engine = loaded(ArEngine, kind)
    mutation(engine.model, kind)
    assert _ar_kl(engine, ar_reference) > AR_BOUNDS[kind]


@pytest.fixture(scope="module")
def dit_reference(tiny_checkpoint):
    engine = DitEngine.from_pretrained(tiny_checkpoint)
    prior = torch.randint(0, 16384, (1, 32 * 32), generator=torch.Generator().manual_seed(1))
    return prior, _dit_outputs(engine, prior)


def _dit_outputs(engine, prior):
    velocity = dit_velocity(engine, prior, "a sign 'hello'", 512, 512)
    latents = engine.denoise(prior, "a sign 'hello'", 512, 512, num_inference_steps=2, seeds=0)
    return velocity, engine.decode(latents)[0]


# velocity relative error and image PSNR (dB) against the unquantized engine, 2 steps at 512x512
DIT_BOUNDS = {"int8": (5e-3, 55.0), "fp8": (3e-2, 47.0)}  # measured: 2.3e-3, 59.4 dB; 1.5e-2, 50.7 dB
DIT_MUTATIONS = [  # measured: velocity error, PSNR
    ("int8", _scale), ("int8", _layout), ("int8", _kept_dit),  # 0.17, 31 dB; 0.31, 25 dB; 9.6e-3, 51.7 dB
    ("fp8", _scale), ("fp8", _layout), ("fp8", _kept_dit),  # 0.17, 31 dB; 0.31, 25 dB; 6.5e-2, 38.2 dB
]  # fmt: skip


@pytest.mark.parametrize("kind", list(DIT_BOUNDS))
def test_quantized_dit_velocity_and_image_stay_within_their_bounds(loaded, dit_reference, kind):
    prior, (velocity, image) = dit_reference
    got_velocity, got_image = _dit_outputs(loaded(DitEngine, kind), prior)
    assert relative_error(velocity, got_velocity) <= DIT_BOUNDS[kind][0]
    assert psnr(got_image, image) >= DIT_BOUNDS[kind][1]


@pytest.mark.parametrize(
    ("kind", "mutation"), DIT_MUTATIONS, ids=[f"{k}-{m.__name__[1:]}" for k, m in DIT_MUTATIONS]
)
def test_a_wrong_scale_layout_or_kept_layer_breaks_the_dit_bounds(loaded, dit_reference, kind, mutation):
    prior, (velocity, image) = dit_reference
    engine = loaded(DitEngine, kind)
    mutation(engine.model, kind)
    got_velocity, got_image = _dit_outputs(engine, prior)
    assert relative_error(velocity, got_velocity) > DIT_BOUNDS[kind][0]
    assert psnr(got_image, image) < DIT_BOUNDS[kind][1]


def test_a_stage_loaded_in_host_memory_is_checked_for_the_device_it_runs_on(tiny_checkpoint, monkeypatch):
    """``GlmImage`` loads a stage in host memory when the stages take turns on a GPU: fp8 is
    allowed by the GPU the backend serves, not refused for the CPU it is loaded on."""
    from glm_image.engine.loading import prepare_stage
    from glm_image.ops import TorchOps

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    setup = prepare_stage(tiny_checkpoint, "cpu", TorchOps("cuda"), "DiT", "ar=int8,dit=fp8")
    assert (setup.device.type, setup.ops.device.type, setup.quant) == ("cpu", "cuda", "fp8")
    with pytest.raises(GlmImageError, match="fp8 needs a CUDA GPU"):
        prepare_stage(tiny_checkpoint, "cpu", TorchOps("cpu"), "DiT", "fp8")
