"""The Glyph Encoder: ByT5 over the text a prompt quotes, for the DiT's text stream.

The quoted spans are found exactly as the reference does, in this order: 'single', “curly
double”, "double", 「corner brackets」 (each pattern over the whole prompt, results
concatenated); a prompt with none encodes "". Each span is byte-tokenized (with EOS); when the number of
spans is even every span gets one pad in front (the reference's rule, kept as it is); spans are
padded to the same length, encoded together, and the
real tokens of all spans are concatenated into one sequence per prompt. Prompts of a batch are
then left-padded with zeros, as the reference pipeline does; ``return_lengths`` gives each
prompt's real length, so a caller can hide the padding (the reference does not).

transformers' ``T5EncoderModel`` is used as it is: it is small and runs once per prompt.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import CheckpointConfig
from ..weights import load_model

__all__ = ["GlyphEncoder", "glyph_texts"]

_PATTERNS = (
    re.compile(r"'([^']*)'"),
    re.compile(r"\u201c([^\u201c\u201d]*)\u201d"),
    re.compile(r'"([^"]*)"'),
    re.compile(r"「([^「」]*)」"),
)


def glyph_texts(prompt: str) -> list[str]:
    """The quoted spans of ``prompt`` that the image should render, in the reference's order."""
    return [span for pattern in _PATTERNS for span in pattern.findall(prompt)]


class GlyphEncoder:
    def __init__(self, encoder, tokenizer, max_length: int = 2048) -> None:
        self.encoder = encoder.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls, root: str | Path, config: CheckpointConfig, *, device: torch.device, dtype: torch.dtype | None
    ) -> GlyphEncoder:
        from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

        root = Path(root)
        t5_config = T5Config.from_pretrained(root / "text_encoder")
        encoder = load_model(
            lambda: T5EncoderModel(t5_config), root / "text_encoder", device=device, dtype=dtype
        )
        return cls(encoder, ByT5Tokenizer.from_pretrained(root / "tokenizer"))

    @torch.inference_mode()
    def encode(
        self, prompts: list[str], *, return_lengths: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[int]]:
        """(B, T, d_model) glyph embeddings, left-padded with zeros to the longest prompt
        (and, with ``return_lengths``, the number of real tokens of each prompt)."""
        device = next(self.encoder.parameters()).device
        pad = self.tokenizer.pad_token_id
        embeds = []
        for prompt in prompts:
            spans = glyph_texts(prompt) or [""]
            ids = self.tokenizer(spans, max_length=self.max_length, truncation=True).input_ids
            ids = [[pad] * ((len(ids) + 1) % 2) + x for x in ids]
            longest = max(len(x) for x in ids)
            mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids], device=device)
            batch = torch.tensor([x + [pad] * (longest - len(x)) for x in ids], device=device)
            hidden = self.encoder(batch, attention_mask=mask).last_hidden_state
            embeds.append(hidden[mask.bool()])  # (tokens, d_model)
        longest = max(e.shape[0] for e in embeds)
        out = embeds[0].new_zeros((len(embeds), longest, embeds[0].shape[-1]))
        for i, e in enumerate(embeds):
            out[i, longest - e.shape[0] :] = e
        return (out, [e.shape[0] for e in embeds]) if return_lengths else out
