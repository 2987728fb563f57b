"""Configs: the presets parse, the released values are the documented ones, bad values are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from glm_image.config import ArConfig, CheckpointConfig, ImageProcessorConfig, SchedulerConfig, VaeConfig
from glm_image.errors import CheckpointError, ConfigError
from glm_image.synthetic import preset_dir


def test_released_preset_has_the_documented_values():
    c = CheckpointConfig.from_dir(preset_dir("glm-image"))
    t = c.ar.text
    assert (t.num_hidden_layers, t.hidden_size, t.intermediate_size) == (40, 4096, 13696)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (32, 2, 128)
    assert t.mrope_section == (8, 12, 12) and t.partial_rotary_factor == 0.5 and t.rotary_dim == 64
    assert (t.vocab_size, t.vision_vocab_size, t.eos_token_id) == (168064, 16512, 16385)
    assert (c.ar.image_start_token_id, c.ar.image_end_token_id, c.ar.image_token_id) == (16384, 16385, 167855)
    assert (c.ar.vision.depth, c.ar.vision.hidden_size, c.ar.vision.patch_size) == (40, 1536, 16)
    assert c.ar.vq.num_embeddings == 16384
    assert (c.dit.num_layers, c.dit.hidden_size, c.dit.patch_size, c.dit.in_channels) == (30, 4096, 2, 16)
    assert c.glyph.d_model == c.dit.text_embed_dim == 1472
    assert c.vae.scale_factor == 8 and len(c.vae.latents_mean) == 16
    assert (c.generation.temperature, c.generation.top_p) == (0.9, 0.75)
    assert c.scheduler.use_dynamic_shifting and c.scheduler.time_shift_type == "linear"
    assert (c.scheduler.base_shift, c.scheduler.max_shift, c.scheduler.base_image_seq_len) == (
        0.25,
        0.75,
        256,
    )
    assert c.image_processor.patch_size == 16 and c.prompt_tokens.grid_bos_token == "<sop>"
    assert c.image_grid_factor == 32  # one AR token per 32x32 pixels


@pytest.mark.parametrize("name", ["tiny", "wide"])
def test_small_presets_keep_the_real_token_ids_and_vocabularies(name):
    released = CheckpointConfig.from_dir(preset_dir("glm-image"))
    c = CheckpointConfig.from_dir(preset_dir(name))
    for attr in ("vocab_size", "vision_vocab_size", "eos_token_id", "pad_token_id"):
        assert getattr(c.ar.text, attr) == getattr(released.ar.text, attr)
    for attr in ("image_token_id", "image_start_token_id", "image_end_token_id"):
        assert getattr(c.ar, attr) == getattr(released.ar, attr)
    assert c.ar.vq.num_embeddings == c.dit.prior_vq_quantizer_codebook_size == 16384
    assert c.scheduler == released.scheduler and c.generation == released.generation
    assert c.prompt_tokens == released.prompt_tokens


def test_wide_preset_has_released_widths_and_two_layers():
    released = CheckpointConfig.from_dir(preset_dir("glm-image"))
    wide = CheckpointConfig.from_dir(preset_dir("wide"))
    assert wide.ar.text.num_hidden_layers == wide.ar.vision.depth == wide.dit.num_layers == 2
    assert wide.glyph.num_layers == 2
    assert wide.ar.text.to_dict() | {"num_hidden_layers": 40} == released.ar.text.to_dict()
    assert wide.dit.to_dict() | {"num_layers": 30} == released.dit.to_dict()
    assert wide.vae == released.vae


def _text_config(**overrides) -> dict:
    data = json.loads((preset_dir("glm-image") / "vision_language_encoder" / "config.json").read_text())
    data["text_config"].update(overrides)
    return data


@pytest.mark.parametrize(
    ("overrides", "field", "allowed"),
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads", "must divide num_attention_heads"),
        ({"hidden_size": 4100}, "hidden_size", "multiple of num_attention_heads"),
        (
            {
                "rope_parameters": {
                    "rope_theta": 1e4,
                    "mrope_section": [8, 12, 10],
                    "partial_rotary_factor": 0.5,
                }
            },
            "mrope_section",
            "must sum to rotary_dim / 2 = 32",
        ),
        ({"vision_vocab_size": 200000}, "vision_vocab_size", "must be <= vocab_size"),
        ({"hidden_act": "gelu"}, "hidden_act", "allowed: 'silu'"),
        ({"num_hidden_layers": 0}, "num_hidden_layers", "must be > 0"),
        ({"num_hidden_layers": "40"}, "num_hidden_layers", "must be an integer"),
        ({"rms_norm_eps": True}, "rms_norm_eps", "must be a number"),
    ],
)
def test_bad_text_config_values_name_the_field(overrides, field, allowed):
    with pytest.raises(ConfigError) as err:
        ArConfig.from_dict(_text_config(**overrides), source="vle/config.json")
    assert (
        f"'{field}'" in str(err.value) and allowed in str(err.value) and "vle/config.json" in str(err.value)
    )


def test_missing_key_and_missing_section_are_named():
    data = _text_config()
    del data["text_config"]["hidden_size"]
    with pytest.raises(ConfigError, match="missing required key 'hidden_size'"):
        ArConfig.from_dict(data)
    data = _text_config()
    del data["vq_config"]
    with pytest.raises(ConfigError, match="missing required section 'vq_config'"):
        ArConfig.from_dict(data)


def test_unknown_keys_are_kept_but_not_fields():
    data = _text_config(some_future_flag=True)
    data["new_top_level"] = 3
    c = ArConfig.from_dict(data)
    assert c.text.unknown == {"some_future_flag": True}
    assert c.unknown == {"new_top_level": 3}
    assert not hasattr(c.text, "some_future_flag")
    with pytest.raises(TypeError):
        c.unknown["x"] = 1  # read-only view


def test_configs_are_frozen():
    c = CheckpointConfig.from_dir(preset_dir("tiny"))
    with pytest.raises(AttributeError):
        c.ar.text.hidden_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("cls", "path", "key", "value", "message"),
    [
        (VaeConfig, "vae/config.json", "latents_std", [1.0] * 15, "one value per latent channel (16)"),
        (VaeConfig, "vae/config.json", "block_out_channels", [128, 500], "multiples of norm_num_groups"),
        (SchedulerConfig, "scheduler/scheduler_config.json", "use_karras_sigmas", True, "allowed: false"),
        (
            SchedulerConfig,
            "scheduler/scheduler_config.json",
            "time_shift_type",
            "cosine",
            "allowed: 'linear'",
        ),
        (ImageProcessorConfig, "processor/preprocessor_config.json", "image_std", [0.5, 0.5], "three values"),
        (ImageProcessorConfig, "processor/preprocessor_config.json", "min_pixels", 10**9, "<= max_pixels"),
    ],
)
def test_component_validation(cls, path, key, value, message):
    data = json.loads((preset_dir("glm-image") / path).read_text())
    data[key] = value
    with pytest.raises(ConfigError) as err:
        cls.from_dict(data, source=path)
    assert f"'{key}'" in str(err.value) and message in str(err.value)


@pytest.fixture
def preset_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(preset_dir("glm-image"), tmp_path / "ckpt"))


def test_cross_component_mismatch_names_both_files(preset_copy):
    path = preset_copy / "transformer" / "config.json"
    data = json.loads(path.read_text())
    data["text_embed_dim"] = 1024
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        CheckpointConfig.from_dir(preset_copy)
    assert "text_embed_dim" in str(err.value) and "text_encoder/config.json 'd_model' = 1472" in str(
        err.value
    )


def test_broken_json_and_missing_files_name_the_file(preset_copy):
    (preset_copy / "vae" / "config.json").write_text('{"latent_channels": 16,,}')
    with pytest.raises(ConfigError, match=r"vae/config\.json: not valid JSON \(line 1"):
        CheckpointConfig.from_dir(preset_copy)
    (preset_copy / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing config file: .*vae/config\.json"):
        CheckpointConfig.from_dir(preset_copy)
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        CheckpointConfig.from_dir(preset_copy / "nope")


def test_model_index_must_be_a_glm_image_pipeline(preset_copy):
    path = preset_copy / "model_index.json"
    data = json.loads(path.read_text())
    data["_class_name"] = "FluxPipeline"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="allowed: 'GlmImagePipeline'"):
        CheckpointConfig.from_dir(preset_copy)


def test_processor_config_as_transformers_5_saves_it(preset_copy):
    """`save_pretrained` in transformers 5 nests the image settings and renames the pixel budget."""
    folder = preset_copy / "processor"
    flat = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").unlink()
    nested = {k: v for k, v in flat.items() if k not in ("min_pixels", "max_pixels")}
    nested["size"] = {"shortest_edge": flat["min_pixels"], "longest_edge": flat["max_pixels"]}
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": nested}))
    c = CheckpointConfig.from_dir(preset_copy)
    assert (c.image_processor.min_pixels, c.image_processor.max_pixels) == (
        flat["min_pixels"],
        flat["max_pixels"],
    )
