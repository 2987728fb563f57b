"""Our DiT against diffusers' GlmImageTransformer2DModel on the same tiny weights."""

from __future__ import annotations

import pytest
import torch

from glm_image.config import CheckpointConfig
from glm_image.models.dit import (
    CacheMode,
    ConditionKVCache,
    DitModel,
    KeyGroup,
    attention_groups,
    key_groups,
)
from glm_image.weights import build_on_meta, load_weights


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    from diffusers import GlmImageTransformer2DModel

    config = CheckpointConfig.from_dir(tiny_checkpoint).dit
    ours = build_on_meta(lambda: DitModel(config))
    load_weights(ours, tiny_checkpoint / "transformer", key_map=ours.checkpoint_key_map())
    reference = GlmImageTransformer2DModel.from_pretrained(tiny_checkpoint / "transformer").eval()
    return ours.eval(), reference


def _inputs(config, batch=2, height=8, width=12, text=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = (height // 2) * (width // 2)
    drop = torch.zeros(batch, n, dtype=torch.bool)
    drop[batch // 2 :] = True  # second half: the unconditional branch
    return {
        "latents": torch.randn(batch, 16, height, width, generator=g),
        "glyph": torch.randn(batch, text, config.text_embed_dim, generator=g),
        "prior_ids": torch.randint(0, 16384, (batch, n), generator=g),
        "prior_drop": drop,
        "timestep": torch.linspace(999, 100, batch),
        "target_size": torch.tensor([[height * 8.0, width * 8.0]] * batch),
        "crop_coords": torch.zeros(batch, 2),
    }


def _reference(reference, x, **extra):
    with torch.no_grad():
        return reference(
            hidden_states=x["latents"],
            encoder_hidden_states=x["glyph"],
            prior_token_id=x["prior_ids"],
            prior_token_drop=x["prior_drop"],
            timestep=x["timestep"],
            target_size=x["target_size"],
            crop_coords=x["crop_coords"],
            return_dict=False,
            **extra,
        )[0]


@pytest.mark.parametrize(("height", "width"), [(8, 12), (16, 16), (4, 20)])
def test_forward_matches(models, height, width):
    ours, reference = models
    x = _inputs(ours.config, height=height, width=width)
    with torch.no_grad():
        torch.testing.assert_close(ours(**x), _reference(reference, x), rtol=0, atol=1e-5)


def test_left_padded_rows_equal_the_reference_on_their_own_glyphs(models):
    """Rows with glyph sequences of different lengths, left-padded together (the padding hidden),
    each equal the reference run on that row alone, unpadded."""
    ours, reference = models
    x = _inputs(ours.config, batch=3)
    lengths = [5, 2, 4]
    keep = torch.arange(5)[None, :] >= 5 - torch.tensor(lengths)[:, None]
    padded = {**x, "glyph": x["glyph"] * keep[..., None]}  # zeros where padded, as the engine pads
    with torch.no_grad():
        got = ours(**padded, text_keep=keep)
        assert not torch.allclose(got[1], ours(**padded)[1]), "the padding must be hidden"
    for row, length in enumerate(lengths):
        alone = {k: v[row : row + 1] for k, v in x.items()}
        alone["glyph"] = alone["glyph"][:, 5 - length :]
        torch.testing.assert_close(got[row : row + 1], _reference(reference, alone), rtol=0, atol=1e-5)


def test_key_groups_are_runs_of_rows_that_see_the_same_keys():
    assert key_groups([0, 0, 3, 3, 0], [None] * 5) == (
        KeyGroup(0, 2, 0),
        KeyGroup(2, 4, 3),
        KeyGroup(4, 5, 0),
    )
    # batched CFG, image-to-image: two prompts (two images each) read their samples; "" rows do not
    assert key_groups([1, 1, 0, 0, 4, 4, 4, 4], [0, 0, 1, 1, None, None, None, None]) == (
        KeyGroup(0, 2, 1, (0, 0)),
        KeyGroup(2, 4, 0, (1, 1)),
        KeyGroup(4, 8, 4),
    )
    assert key_groups([2, 2], [0, None]) == (KeyGroup(0, 1, 2, (0,)), KeyGroup(1, 2, 2))
    # samples that stored as many keys share a call; condition images of other sizes do not
    assert key_groups([0, 0], [0, 1], stored=[16, 16]) == (KeyGroup(0, 2, 0, (0, 1)),)
    assert key_groups([0, 0], [0, 1], stored=[16, 24]) == (KeyGroup(0, 1, 0, (0,)), KeyGroup(1, 2, 0, (1,)))


def test_attention_groups_from_masks():
    keep = torch.tensor([[True, True, True], [False, True, True], [False, True, True]])
    assert attention_groups(3, keep) == (KeyGroup(0, 1, 0), KeyGroup(1, 3, 1))
    assert attention_groups(2) == (KeyGroup(0, 2, 0),)
    cache = ConditionKVCache(1)
    cache.store(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    reads = attention_groups(3, keep, cache, CacheMode.READ, torch.tensor([True, True, False]))
    assert reads == (KeyGroup(0, 1, 0, (0,)), KeyGroup(1, 2, 1, (0,)), KeyGroup(2, 3, 1))
    assert attention_groups(3, keep, cache, CacheMode.SKIP) == attention_groups(3, keep)
    with pytest.raises(ValueError, match="text_keep row 0: its real glyph tokens must be a suffix"):
        attention_groups(1, torch.tensor([[True, False, True]]))


def test_forward_rejects_groups_that_do_not_fit(models):
    ours, _ = models
    x = _inputs(ours.config)
    with torch.no_grad(), pytest.raises(ValueError, match=r"groups must cover rows 0..2 in order"):
        ours(**x, groups=(KeyGroup(0, 1),))
    with torch.no_grad(), pytest.raises(ValueError, match="groups or text_keep/read_rows, not both"):
        ours(**x, groups=(KeyGroup(0, 2),), text_keep=torch.ones(2, 5, dtype=torch.bool))


def _write_condition(ours, reference, config, seed=1):
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 16, 8, 8, generator=g)
    prior = torch.randint(0, 16384, (1, 16), generator=g)
    common = {
        "prior_token_drop": torch.zeros(1, 16, dtype=torch.bool),
        "timestep": torch.zeros(1),
        "target_size": torch.tensor([[64.0, 64.0]]),
        "crop_coords": torch.zeros(1, 2),
    }
    empty_glyph = torch.zeros(1, 0, config.text_embed_dim)
    ref_cache = GlmImageKVCache(config.num_layers)
    ref_cache.set_mode("write")
    ours_cache = ConditionKVCache(config.num_layers)
    with torch.no_grad():
        reference(
            hidden_states=image,
            encoder_hidden_states=empty_glyph,
            prior_token_id=prior,
            kv_caches=ref_cache,
            **common,
        )
        ours(image, empty_glyph, prior, *common.values(), cache=ours_cache, mode=CacheMode.WRITE)
    return ref_cache, ours_cache


def test_condition_cache_write_read_skip_match(models):
    ours, reference = models
    config = ours.config
    ref_cache, ours_cache = _write_condition(ours, reference, config)
    for layer in range(config.num_layers):
        torch.testing.assert_close(
            ours_cache.keys[layer][0].transpose(1, 2), ref_cache[layer].k_caches[0], rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            ours_cache.values[layer][0].transpose(1, 2), ref_cache[layer].v_caches[0], rtol=0, atol=1e-6
        )

    x = _inputs(config)
    outputs = {}
    for mode in (CacheMode.READ, CacheMode.SKIP):
        ref_cache.set_mode(mode.value)
        expected = _reference(reference, x, kv_caches=ref_cache)
        with torch.no_grad():
            outputs[mode] = ours(**x, cache=ours_cache, mode=mode)
        torch.testing.assert_close(outputs[mode], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(outputs[CacheMode.READ], outputs[CacheMode.SKIP])

    # batched classifier-free guidance: the conditional row reads, the unconditional row skips
    with torch.no_grad():
        mixed = ours(**x, cache=ours_cache, mode=CacheMode.READ, read_rows=torch.tensor([True, False]))
    torch.testing.assert_close(mixed[0], outputs[CacheMode.READ][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], outputs[CacheMode.SKIP][1], rtol=0, atol=1e-5)


def test_cache_serves_rows_like_the_reference():
    cache = ConditionKVCache(1)
    a, b = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    cache.store(0, a, a)
    cache.next_sample()
    cache.store(0, b, b)
    samples = cache.samples(4)  # two rows per sample, each sample's rows together
    assert samples == [0, 0, 1, 1]
    keys, _ = cache.rows(0, samples)
    assert torch.equal(keys, torch.cat([a, a, b, b]))
    keys, _ = cache.rows(0, samples[2:])
    assert torch.equal(keys, torch.cat([b, b]))
    with pytest.raises(ValueError, match="holds 2 samples; cannot serve 3 rows"):
        cache.samples(3)


def test_meta_model_maps_one_to_one_onto_the_released_transformer():
    from glm_image.synthetic import preset_dir
    from glm_image.synthetic.reference import build_reference
    from glm_image.weights import Fuse

    root = preset_dir("glm-image")
    ours = build_on_meta(lambda: DitModel(CheckpointConfig.from_dir(root).dit))
    released = {
        n: tuple(t.shape) for n, t in build_reference(root, "transformer", meta=True).state_dict().items()
    }
    used = []
    for name, tensor in ours.state_dict().items():
        source = ours.checkpoint_key_map()[name]
        sources = source.sources if isinstance(source, Fuse) else (source,)
        shapes = [released[s] for s in sources]
        assert tuple(tensor.shape) == (sum(s[0] for s in shapes), *shapes[0][1:]), name
        used.extend(sources)
    assert sorted(used) == sorted(released)
    assert sum(t.numel() for t in ours.state_dict().values()) == 6_926_882_880
