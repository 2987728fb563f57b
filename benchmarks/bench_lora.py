"""LoRA: what an unmerged adapter costs per AR token and per DiT step, at rank 16 and 64.

    python benchmarks/bench_lora.py                              # tiny and mid widths, CPU
    python benchmarks/bench_lora.py --preset mid,released1 --device cuda --dtype bfloat16 --out results/lora.json

For each preset, one AR decode step (one row, one token, a KV cache of ``--context`` tokens) and
one DiT forward (a CFG pair, ``--latent`` x ``--latent`` latents) are timed for: the base model,
the base with an unmerged adapter on every attention and MLP / feed-forward linear at each rank
(``glm_image.lora.LoraSet``; the forward hooks' Python included), and the same adapter merged
(``lora.merge``: the base's cost, a check). Adapters are random (their values do not change the
time); the models are built from the preset's config with random weights, no checkpoint read:
``tiny`` is the test preset (widths 64..), ``mid`` has real head widths (AR hidden 1024, 8 heads
of 128, 2 KV heads, FFN 2752; DiT 8 heads of 128) and 2 layers each, so the adapter's share of a
step is near what it is at the released widths per layer; ``released1`` has the released widths
and one layer per stack (for a GPU: its AR embedding alone is 0.7 billion parameters). Rounds alternate the configurations
so a drifting machine favours none; the median of ``--repeats`` rounds of ``--iters`` calls is
reported, with the overhead as a ratio to the base in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import build_report, markdown_table, median, save_report, timed

from glm_image.config import CheckpointConfig
from glm_image.lora import Adapter, LoraSet, ModuleLora, fit, merge
from glm_image.models.ar import ArModel, KVCache, rotary_tables
from glm_image.models.dit import DitModel
from glm_image.synthetic import preset_dir


def configs(preset: str):
    if preset == "released1":  # the released widths, one layer per stack (a GPU's run)
        config = CheckpointConfig.from_dir(preset_dir("glm-image"))
        ar, dit = config.ar.text, config.dit
        return dataclasses.replace(ar, num_hidden_layers=1), dataclasses.replace(dit, num_layers=1)
    config = CheckpointConfig.from_dir(preset_dir("tiny"))
    ar, dit = config.ar.text, config.dit
    if preset == "mid":
        ar = dataclasses.replace(
            ar,
            hidden_size=1024,
            intermediate_size=2752,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            mrope_section=(8, 12, 12),  # the released split of a 128-wide head's rotated half
        )
        dit = dataclasses.replace(dit, num_layers=2, num_attention_heads=8, attention_head_dim=128)
    return ar, dit


def random_adapter(model: torch.nn.Module, stage: str, rank: int, seed: int = 0) -> Adapter:
    """A rank-``rank`` update on every linear the LoRA tests target, under the checkpoint's names."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, int]] = {}
    if stage == "ar":
        c, d = model.config, model.config.head_dim
        for i in range(c.num_hidden_layers):
            p = f"model.language_model.layers.{i}"
            h, kv = c.num_attention_heads * d, c.num_key_value_heads * d
            shapes |= {
                f"{p}.self_attn.q_proj": (h, c.hidden_size),
                f"{p}.self_attn.k_proj": (kv, c.hidden_size),
            }
            shapes |= {
                f"{p}.self_attn.v_proj": (kv, c.hidden_size),
                f"{p}.self_attn.o_proj": (c.hidden_size, h),
            }
            shapes |= {f"{p}.mlp.gate_up_proj": (2 * c.intermediate_size, c.hidden_size)}
            shapes |= {f"{p}.mlp.down_proj": (c.hidden_size, c.intermediate_size)}
    else:
        dim = model.config.hidden_size
        for i, block in enumerate(model.transformer_blocks):
            p, ff = f"transformer_blocks.{i}", block.ff.net[0].proj.out_features
            shapes |= {f"{p}.attn1.to_{x}": (dim, dim) for x in "qkv"}
            shapes |= {
                f"{p}.attn1.to_out.0": (dim, dim),
                f"{p}.ff.net.0.proj": (ff, dim),
                f"{p}.ff.net.2": (dim, ff),
            }
    modules = {
        name: ModuleLora(
            torch.randn(rank, n_in, generator=g) * 0.01, torch.randn(n_out, rank, generator=g) * 0.01
        )
        for name, (n_out, n_in) in shapes.items()
    }
    return Adapter(stage, f"random rank {rank}", modules)


def ar_step(model: ArModel, context: int, device, dtype):
    """One decode step at position ``context`` (the cache filled with zeros before it)."""
    cache = KVCache(model.config, 1, context + 1, device, dtype)
    positions = torch.full((3, 1, 1), context, device=device)
    rope = rotary_tables(positions, model.config, dtype)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    slots = torch.tensor([context], device=device)
    visible = torch.ones(1, context + 1, dtype=torch.bool, device=device)
    return lambda: model.logits(model(ids, rope, cache, slots, visible=visible, length=context + 1))


def dit_step(model: DitModel, latent: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    n = (latent // 2) ** 2
    x = {
        "latents": torch.randn(2, 16, latent, latent, generator=g),
        "glyph": torch.randn(2, 8, model.config.text_embed_dim, generator=g),
        "prior_ids": torch.randint(0, 16384, (2, n), generator=g),
        "prior_drop": torch.tensor([[False] * n, [True] * n]),
        "timestep": torch.tensor([500.0, 500.0]),
        "target_size": torch.tensor([[latent * 8.0] * 2] * 2),
        "crop_coords": torch.zeros(2, 2),
    }
    x = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in x.items()}
    return lambda: model(**x)


def measure(args, preset: str) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ar_config, dit_config = configs(preset)
    results = []
    for stage in ("ar", "dit"):
        torch.manual_seed(0)
        build = (lambda: ArModel(ar_config)) if stage == "ar" else (lambda: DitModel(dit_config))
        with torch.device(device):  # random init where the model runs (released widths: GBs)
            model, merged = build().to(dtype).eval(), build().to(dtype).eval()
        merged.load_state_dict(model.state_dict())
        loras = LoraSet(model)
        for rank in args.ranks:
            loras.add(f"r{rank}", random_adapter(model, stage, rank, seed=rank))
        merge(merged, fit(merged, random_adapter(merged, stage, args.ranks[0], seed=args.ranks[0])), 1.0)
        step = (ar_step if stage == "ar" else dit_step)(
            model, args.context if stage == "ar" else args.latent, device, dtype
        )
        merged_step = (ar_step if stage == "ar" else dit_step)(
            merged, args.context if stage == "ar" else args.latent, device, dtype
        )
        cases = {"base": ((), step), f"merged r{args.ranks[0]}": ((), merged_step)}
        cases |= {f"unmerged r{rank}": (((f"r{rank}", 1.0),), step) for rank in args.ranks}
        times: dict[str, list[float]] = {name: [] for name in cases}
        with torch.inference_mode():
            for _ in range(args.repeats):
                for name, (selection, fn) in cases.items():
                    with loras.selected(selection):
                        fn()  # warm
                        times[name].append(median([timed(fn, device) for _ in range(args.iters)]))
        base = median(times["base"])
        unit = "ms per AR token" if stage == "ar" else "ms per DiT step (CFG pair)"
        for name, values in times.items():
            results.append(
                {
                    "preset": preset,
                    "stage": stage,
                    "case": name,
                    "ms": round(median(values) * 1e3, 4),
                    "unit": unit,
                    "overhead": round(median(values) / base - 1, 4),
                }
            )
        loras.remove()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny,mid", help="tiny, mid, released1, comma-separated")
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--context", type=int, default=512, help="KV cache length of the AR step")
    parser.add_argument("--latent", type=int, default=32, help="latent side of the DiT step (x8 pixels)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="results/bench_lora.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.ranks = [int(r) for r in args.ranks.split(",")]
    results = [row for preset in args.preset.split(",") for row in measure(args, preset)]
    report = build_report(
        "lora",
        results,
        config={k: v for k, v in vars(args).items() if k != "out"},
        notes=["random weights and adapters: times do not depend on the values"],
        device=args.device,
    )
    save_report(report, args.out)
    columns = ["preset", "stage", "case", "ms", "overhead", "unit"]
    print(markdown_table(columns, [[row[c] for c in columns] for row in results]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
