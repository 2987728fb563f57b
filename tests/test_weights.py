"""Our loader reads what the reference libraries wrote, tensor for tensor, strictly."""

from __future__ import annotations

import pytest
import torch

from glm_image.errors import WeightsMismatchError
from glm_image.synthetic.reference import REFERENCE_FACTORIES, build_reference
from glm_image.weights import Fuse, WeightIndex, build_on_meta, load_weights


def _from_pretrained(root, component):
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel
    from transformers import GlmImageForConditionalGeneration, T5EncoderModel

    cls = {
        "vision_language_encoder": GlmImageForConditionalGeneration,
        "transformer": GlmImageTransformer2DModel,
        "text_encoder": T5EncoderModel,
        "vae": AutoencoderKL,
    }[component]
    return cls.from_pretrained(root / component)


@pytest.mark.parametrize("component", list(REFERENCE_FACTORIES))
def test_loaded_tensors_equal_the_reference_loaders(tiny_checkpoint, component):
    reference = _from_pretrained(tiny_checkpoint, component).state_dict()
    ours = build_reference(tiny_checkpoint, component, meta=True)
    report = load_weights(ours, tiny_checkpoint / component)
    state = ours.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert state[name].device.type == "cpu" and state[name].dtype == tensor.dtype, name
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    assert report.num_tensors == len(WeightIndex.from_folder(tiny_checkpoint / component).tensors)
    assert not any(p.is_meta for p in ours.parameters())


def test_dtype_cast_and_non_persistent_buffers(tiny_checkpoint):
    folder = tiny_checkpoint / "vision_language_encoder"
    module = build_reference(tiny_checkpoint, "vision_language_encoder", meta=True)
    report = load_weights(module, folder, dtype=torch.bfloat16)
    reference = _from_pretrained(tiny_checkpoint, "vision_language_encoder").to(torch.bfloat16).state_dict()
    for name, tensor in module.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)
    # rotary tables are computed, not stored: the report names them for the model to fill in
    assert any("rotary_emb.inv_freq" in n for n in report.meta_buffers)
    assert report.num_bytes == sum(t.numel() * 2 for t in module.state_dict().values())


def test_tied_weights_load_once_and_stay_tied(tiny_checkpoint):
    module = build_reference(tiny_checkpoint, "text_encoder", meta=True)
    index = WeightIndex.from_folder(tiny_checkpoint / "text_encoder")
    load_weights(module, tiny_checkpoint / "text_encoder")
    assert module.shared.weight is module.encoder.embed_tokens.weight
    stored = "shared.weight" if "shared.weight" in index.tensors else "encoder.embed_tokens.weight"
    assert module.shared.weight.data_ptr() != 0 and stored in index.tensors


class _FusedAttention(torch.nn.Module):
    """A module whose q/k/v live in one matrix, as our fused models keep them."""

    def __init__(self, hidden: int, q_out: int, kv_out: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(hidden, q_out + 2 * kv_out)
        self.o = torch.nn.Linear(q_out, hidden, bias=False)


def _attention_key_map(layer: int) -> dict[str, Fuse | str]:
    prefix = f"model.language_model.layers.{layer}.self_attn."
    return {
        "qkv.weight": Fuse(tuple(f"{prefix}{p}_proj.weight" for p in "qkv")),
        "qkv.bias": Fuse(tuple(f"{prefix}{p}_proj.bias" for p in "qkv")),
        "o.weight": f"{prefix}o_proj.weight",
    }


def _other_tensors(folder, layer: int) -> tuple[str, ...]:
    keep = f"model.language_model.layers.{layer}.self_attn."
    return tuple(sorted({n for n in WeightIndex.from_folder(folder).tensors if not n.startswith(keep)}))


def test_fused_remap_concatenates_and_ignored_prefixes_are_reported(tiny_checkpoint):
    folder = tiny_checkpoint / "vision_language_encoder"
    reference = _from_pretrained(tiny_checkpoint, "vision_language_encoder")
    attn = reference.model.language_model.layers[1].self_attn
    hidden, q_out, kv_out = attn.q_proj.in_features, attn.q_proj.out_features, attn.k_proj.out_features

    module = build_on_meta(lambda: _FusedAttention(hidden, q_out, kv_out))
    report = load_weights(
        module, folder, key_map=_attention_key_map(1), ignore_prefixes=_other_tensors(folder, 1)
    )
    expected_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    expected_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    torch.testing.assert_close(module.qkv.weight, expected_w, rtol=0, atol=0)
    torch.testing.assert_close(module.qkv.bias, expected_b, rtol=0, atol=0)
    torch.testing.assert_close(module.o.weight, attn.o_proj.weight, rtol=0, atol=0)
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in report.ignored


def test_missing_unexpected_and_wrong_shape_are_all_listed(tiny_checkpoint):
    folder = tiny_checkpoint / "vision_language_encoder"
    reference = build_reference(tiny_checkpoint, "vision_language_encoder", meta=True)
    attn = reference.model.language_model.layers[1].self_attn
    hidden, q_out, kv_out = attn.q_proj.in_features, attn.q_proj.out_features, attn.k_proj.out_features

    # a wrong fused width, an unmapped name, and one attention tensor left unused
    module = build_on_meta(lambda: _FusedAttention(hidden, q_out, kv_out + 1))
    module.extra = torch.nn.Linear(2, 2, bias=False)
    key_map = _attention_key_map(1)
    ignore = tuple(n for n in _other_tensors(folder, 1))
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(
            module,
            folder,
            key_map=key_map,
            ignore_prefixes=(*ignore, "model.language_model.layers.1.self_attn.o"),
        )
    message = str(err.value)
    assert "missing 1 tensor(s): 'extra.weight'" in message
    assert (
        "wrong shape (2)" in message
        and f"'qkv.weight': checkpoint [{q_out + 2 * kv_out}, {hidden}]" in message
    )
    assert str(folder) in message

    module = build_on_meta(lambda: _FusedAttention(hidden, q_out, kv_out))
    del key_map["o.weight"]
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(module, folder, key_map=key_map, ignore_prefixes=ignore)
    assert "missing 1 tensor(s): 'o.weight'" in str(err.value)
    assert "unexpected 1 tensor(s): 'model.language_model.layers.1.self_attn.o_proj.weight'" in str(err.value)


def test_long_name_lists_are_truncated_with_a_count(tiny_checkpoint):
    module = build_on_meta(lambda: torch.nn.Linear(2, 2))
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(module, tiny_checkpoint / "transformer")
    assert "unexpected" in str(err.value) and "more" in str(err.value)
