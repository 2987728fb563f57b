"""glm-image-random (weights drawn from a seed, nothing stored) and the `full` stage of gpu_run.sh."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from glm_image.bench.full import ENGINE_FIELDS
from glm_image.synthetic.random import (
    DRAWN_WEIGHTS,
    cached_random_checkpoint,
    draw_tensor,
    drawn_index,
    make_random_checkpoint,
    reference_module,
)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("drawn") / "m", "tiny", seed=5, layers=1)


def _draw_all(root: Path, component: str) -> dict[str, torch.Tensor]:
    return {name: draw_tensor(info) for name, info in drawn_index(root / component).items()}


def test_no_weights_are_written(drawn: Path) -> None:
    assert not list(drawn.rglob("*.safetensors*"))
    assert (drawn / "transformer" / DRAWN_WEIGHTS).is_file()
    assert json.loads((drawn / "transformer" / "config.json").read_text())["num_layers"] == 1


def test_draw_is_deterministic_per_seed(drawn: Path, tmp_path: Path) -> None:
    again = make_random_checkpoint(tmp_path / "again", "tiny", seed=5, layers=1)
    other = make_random_checkpoint(tmp_path / "other", "tiny", seed=6, layers=1)
    for component in ("vision_language_encoder", "transformer", "text_encoder", "vae"):
        first, second, third = (_draw_all(r, component) for r in (drawn, again, other))
        assert first.keys() == second.keys() == third.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), component
        matrices = [k for k in first if first[k].ndim >= 2]
        assert not any(torch.equal(first[k], third[k]) for k in matrices), component


def test_draw_scales_keep_norms_at_one(drawn: Path) -> None:
    tensors = _draw_all(drawn, "vision_language_encoder")
    norm = tensors["model.language_model.layers.0.input_layernorm.weight"]
    assert torch.equal(norm, torch.ones_like(norm))
    mlp = tensors["model.language_model.layers.0.mlp.down_proj.weight"].float()
    assert mlp.std().item() == pytest.approx(mlp.shape[1] ** -0.5, rel=0.05)
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())


def test_ours_and_the_reference_hold_the_same_tensors(drawn: Path) -> None:
    from glm_image.engine import ArEngine, DitEngine

    ar = ArEngine.from_pretrained(drawn, dtype=torch.float32)
    reference = reference_module(drawn, "vision_language_encoder", dtype=torch.float32).state_dict()
    ours = ar.model.state_dict()
    assert torch.equal(ours["lm_head.weight"], reference["lm_head.weight"])
    assert torch.equal(ours["embed_tokens.weight"], reference["model.language_model.embed_tokens.weight"])
    assert torch.equal(ours["norm.weight"], reference["model.language_model.norm.weight"])
    dit = DitEngine.from_pretrained(drawn, dtype=torch.float32)
    reference = reference_module(drawn, "transformer", dtype=torch.float32).state_dict()
    shared = set(dit.model.state_dict()) & set(reference)
    assert len(shared) > 5
    assert all(torch.equal(dit.model.state_dict()[k], reference[k]) for k in shared)
    t5 = reference_module(drawn, "text_encoder", dtype=torch.float32)
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # the tied alias stays one tensor


def test_released_widths_declare_the_released_tensors(tmp_path: Path) -> None:
    """Shapes only (meta): the folder of glm-image-random at one layer has the release's widths."""
    root = cached_random_checkpoint(tmp_path, layers=1)
    index = drawn_index(root / "vision_language_encoder")
    assert index["model.language_model.embed_tokens.weight"].shape == (168064, 4096)
    assert index["lm_head.weight"].shape == (16512, 4096)
    assert "model.language_model.layers.1.mlp.down_proj.weight" not in index
    dit = drawn_index(root / "transformer")
    assert dit["transformer_blocks.0.attn1.to_q.weight"].shape == (4096, 4096)
    from transformers import GlmImageProcessor

    tokenizer = GlmImageProcessor.from_pretrained(root / "processor").tokenizer
    # the released id space: image codes first, the GLM specials at their released ids
    assert tokenizer.convert_tokens_to_ids("<sop>") == 167845
    assert max(tokenizer.get_vocab().values()) < 168064


def test_the_model_name_resolves(monkeypatch, tmp_path: Path) -> None:
    from glm_image.hub import SYNTHETIC_MODELS, resolve_checkpoint

    assert "glm-image-random" in SYNTHETIC_MODELS
    monkeypatch.setenv("GLM_IMAGE_CACHE", str(tmp_path))
    monkeypatch.setenv("GLM_IMAGE_RANDOM_LAYERS", "1")
    root = resolve_checkpoint("glm-image-random")
    assert root.name.startswith("glm-image-random-glm-image-seed0-layers1")
    monkeypatch.setenv("GLM_IMAGE_RANDOM_LAYERS", "zero")
    with pytest.raises(Exception, match="GLM_IMAGE_RANDOM_LAYERS='zero'"):
        resolve_checkpoint("glm-image-random")


def _dry_run(gpu_run, out: Path, *, size: str, steps: str, parts: str) -> subprocess.CompletedProcess:
    """``gpu_run.sh OUT full`` on the CPU at tiny widths, one layer per stack; it must exit 0."""
    done = gpu_run(
        out,
        "full",
        GPU_RUN_PRESET="tiny",
        GPU_RUN_LAYERS="1",
        GPU_RUN_SIZE=size,
        GPU_RUN_STEPS=steps,
        GPU_RUN_FULL_PARTS=parts,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_cpu_dry_run_writes_full_json(tmp_path: Path, gpu_run) -> None:
    """The stage as gpu_run.sh runs it, at tiny widths so it fits the CI's CPUs; the issue's own
    command (released widths, 2 layers) takes the same path with bigger tensors."""
    out = tmp_path / "out"
    _dry_run(gpu_run, out, size="256x256", steps="2", parts="exact")
    report = json.loads((out / "full.json").read_text())
    for engine in ("ours", "reference"):
        missing = [f for f in ENGINE_FIELDS if f not in report[engine]]
        assert not missing, (engine, missing)
        assert report[engine]["s_per_image"] > 0 and report[engine]["dit_s_per_step"] > 0
        assert report[engine]["peak_gib"] > 0 and report[engine]["ar_tok_s"] > 0
        assert report[engine]["projected"]["steps"] == 50  # 2 steps timed, 50 projected
    # like for like: the same grid (preview 16x16 + target 8x8 at 256x256), no EOS step
    assert report["ours"]["ar_tokens"] == report["reference"]["ar_tokens"] == 16 * 16 + 8 * 8
    assert report["reference"]["dit_forwards"] == 2 * 2  # two CFG branches x two steps
    assert report["missing"] == ["fast", "batch", "large", "memory"]
    assert any("projected, not measured" in note for note in report["notes"])


@pytest.mark.slow
def test_cpu_dry_run_runs_every_other_part(tmp_path: Path, gpu_run) -> None:
    """fast, batch, large and memory as gpu_run.sh runs them (tiny widths, 64x64, one step), so
    a typo in any part fails here rather than on a lent GPU; each writes its part of full.json."""
    out = tmp_path / "out"
    done = _dry_run(gpu_run, out, size="64x64", steps="1", parts="fast,batch,large,memory")
    assert "rc=124" not in done.stdout and "skipped" not in done.stdout, done.stdout[-3000:]
    for part in ("fast", "batch", "large", "memory"):
        assert (out / "full" / f"{part}.json").is_file(), (part, done.stdout[-3000:])
    report = json.loads((out / "full.json").read_text())
    assert report["missing"] == ["exact"]
