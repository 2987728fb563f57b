"""The GLM-Image AR generation protocol, as pure functions.

A text-to-image prompt ends with ``<sop>H W<eop><sop>h w<eop><|dit_token_16384|>``: the target
grid (H x W tokens, one per 32x32 pixels), the preview grid (about 16 x 16, same aspect) and the
image-start token. The model then writes the preview grid, the target grid, and EOS.

Positions are 3D (t, h, w). Prompt tokens count up on all three axes; a condition image inside
the prompt and every generated grid take a block of positions starting at the running offset
``p``: t = p, h = p + row, w = p + col, after which the offset advances by max(rows, cols).
This is ``GlmImageModel.get_rope_index`` of transformers, written per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["GridSpec", "decode_positions", "prompt_positions", "upsample_grid"]


@dataclass(frozen=True)
class GridSpec:
    """The grids one text-to-image request generates, in generation order: preview, then target."""

    target: tuple[int, int]  # (rows, cols) of the image grid kept for the DiT
    preview: tuple[int, int] | None  # the ~16x16 preview (text-to-image only)

    @property
    def generated(self) -> list[tuple[int, int]]:
        return [g for g in (self.preview, self.target) if g is not None]

    @property
    def num_tokens(self) -> int:
        """Grid tokens the model writes before EOS."""
        return sum(r * c for r, c in self.generated)

    @property
    def target_offset(self) -> int:
        """Index of the first target-grid token among the generated tokens."""
        return self.preview[0] * self.preview[1] if self.preview else 0


def _grid_positions(offset: int, rows: int, cols: int) -> torch.Tensor:
    """(3, rows*cols) positions of a grid placed at ``offset``."""
    h = torch.arange(rows).repeat_interleave(cols)
    w = torch.arange(cols).repeat(rows)
    return torch.stack([torch.full_like(h, offset), offset + h, offset + w])


def prompt_positions(
    input_ids: torch.Tensor,
    image_grids: Sequence[tuple[int, int]] = (),
    *,
    image_start_id: int,
    image_end_id: int,
) -> tuple[torch.Tensor, int]:
    """Positions (3, L) of one unpadded prompt, and the offset where generation continues.

    ``image_grids`` are the (rows, cols) of the condition images in the prompt, in order; each
    sits between an image-start and an image-end token. A trailing image-start token with no end
    (the one that opens generation) is an ordinary text position.
    """
    ids = input_ids.tolist()
    starts = [i + 1 for i, t in enumerate(ids) if t == image_start_id]
    ends = [i for i, t in enumerate(ids) if t == image_end_id]
    if len(ends) != len(image_grids):
        raise ValueError(
            f"the prompt holds {len(ends)} complete images but {len(image_grids)} grids were given"
        )
    pieces, offset, prev_end = [], 0, 0
    # starts has one more entry than ends: the image-start token that opens generation
    for start, end, (rows, cols) in zip(starts, ends, image_grids, strict=False):
        text = start - prev_end
        pieces.append(torch.arange(offset, offset + text).expand(3, -1))
        offset += text
        if end - start != rows * cols:
            raise ValueError(f"image at tokens {start}..{end} holds {end - start} tokens, grid {rows}x{cols}")
        pieces.append(_grid_positions(offset, rows, cols))
        offset += max(rows, cols)
        prev_end = end
    text = len(ids) - prev_end
    pieces.append(torch.arange(offset, offset + text).expand(3, -1))
    return torch.cat(pieces, dim=1), offset + text


def decode_positions(offset: int, spec: GridSpec) -> torch.Tensor:
    """Positions (3, num_tokens + 1) of the generated grid tokens, then of the EOS step."""
    pieces = []
    for rows, cols in spec.generated:
        pieces.append(_grid_positions(offset, rows, cols))
        offset += max(rows, cols)
    pieces.append(torch.full((3, 1), offset))
    return torch.cat(pieces, dim=1)


def upsample_grid(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, rows*cols) codes -> (B, 2rows * 2cols): nearest x2, one code per DiT patch."""
    b = tokens.shape[0]
    return tokens.view(b, rows, 1, cols, 1).expand(b, rows, 2, cols, 2).reshape(b, 4 * rows * cols)
