"""A synthetic checkpoint whose AR distributions are sharp, for measuring speculative decoding.

Random weights give nearly flat next-token distributions that depend entirely on the previous
token, so a draft is almost never accepted: nothing like a trained model. ``sharpen_ar`` makes
``codes`` image codes hold most of the probability mass (their lm_head rows scaled by ``scale``)
and adds one shared direction to every token embedding, so the next token depends only
moderately on the previous one. Drafts are then often accepted, and a wrong acceptance rule
still shows in the distribution. It is still not the released model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

__all__ = ["sharpen_ar"]


def sharpen_ar(source: str | Path, out: str | Path, *, codes: int = 16, scale: float = 6.0) -> Path:
    """A copy of the checkpoint ``source`` in ``out`` with a sharpened AR model (see above)."""
    from safetensors.torch import load_file, save_file

    root = Path(shutil.copytree(source, out, dirs_exist_ok=True))
    folder = root / "vision_language_encoder"
    shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    for shard in sorted(shards):
        tensors = load_file(folder / shard)
        if "lm_head.weight" in tensors:
            head = tensors["lm_head.weight"].clone()
            head[:codes] *= scale
            tensors["lm_head.weight"] = head
        key = "model.language_model.embed_tokens.weight"
        if key in tensors:
            table = tensors[key]
            shared = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0))
            tensors[key] = table + shared / shared.norm() * table[:16384].norm(dim=1).mean()
        save_file(tensors, folder / shard, metadata={"format": "pt"})
    return root
