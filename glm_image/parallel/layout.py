"""Which part of each AR weight a tensor-parallel rank holds: pure arithmetic on the config.

For ``size`` ranks (Megatron's split, as nano-vllm's parallel linears):

- attention: the query heads split evenly; the KV heads split evenly while there are at least as
  many as ranks, and above that each rank holds the one KV head its query heads read (the
  released model: 32 query / 2 KV heads, so from 4 ranks on the KV heads are replicated);
  ``qkv_proj`` is split by output rows (column parallel), ``o_proj`` by input columns (row
  parallel, one all-reduce);
- MLP: ``gate_up_proj`` keeps each rank's slice of the gate rows and the same slice of the up
  rows (so SwiGLU stays local), ``down_proj`` by input columns (one all-reduce);
- the head over the image vocabulary (16512 rows) by rows: each rank writes the logits of its
  slice of the vocabulary, and they are gathered.

``check_tp`` says which sizes a config allows, before any weights load.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GlmImageError

__all__ = ["ArShard", "check_sp", "check_tp", "tp_sizes"]


def tp_sizes(heads: int, kv_heads: int, intermediate: int, vocab: int, limit: int = 64) -> list[int]:
    """The tensor-parallel sizes (up to ``limit``) a decoder with these sizes splits into."""
    return [
        n
        for n in range(1, limit + 1)
        if heads % n == 0
        and (kv_heads % n == 0 or n % kv_heads == 0)
        and intermediate % n == 0
        and vocab % n == 0
    ]


def check_tp(size: int, text, field: str = "ar_tp") -> None:
    """Raise a ``GlmImageError`` naming ``field`` when ``size`` does not split the AR decoder
    ``text`` (an ``ArTextConfig``): its query heads, its KV heads (or their replication), its MLP
    and its image vocabulary."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise GlmImageError(f"{field} = {size!r}; allowed: an integer >= 1")
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    allowed = tp_sizes(heads, kv, text.intermediate_size, text.vision_vocab_size)
    if size not in allowed:
        raise GlmImageError(
            f"{field} = {size}: the AR decoder's {heads} query heads, {kv} KV heads (split, or "
            f"replicated above {kv} ranks), MLP of {text.intermediate_size} and head over "
            f"{text.vision_vocab_size} codes do not split {size} ways; allowed: "
            f"{', '.join(map(str, allowed))}"
        )


def check_sp(size: int, heads: int, field: str = "dit_sp") -> None:
    """Ulysses needs the DiT's heads to split over the sequence-parallel ranks."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise GlmImageError(f"{field} = {size!r}; allowed: an integer >= 1")
    if heads % size:
        allowed = [n for n in range(1, heads + 1) if heads % n == 0]
        raise GlmImageError(
            f"{field} = {size}: the DiT's {heads} attention heads do not split {size} ways "
            f"(Ulysses gives each rank whole heads); allowed: {', '.join(map(str, allowed))}"
        )


@dataclass(frozen=True)
class ArShard:
    """Rank ``rank`` of ``size``: the global index ranges it holds (start, stop)."""

    rank: int
    size: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    mlp: tuple[int, int]  # of the intermediate size (the same slice of gate and of up)
    vocab: tuple[int, int]

    @classmethod
    def of(cls, text, rank: int = 0, size: int = 1) -> ArShard:
        """The shard of ``text`` (an ``ArTextConfig``) that rank ``rank`` of ``size`` holds."""
        heads, kv = text.num_attention_heads, text.num_key_value_heads
        q = heads // size
        if size <= kv:
            per = kv // size
            kv_range = (rank * per, (rank + 1) * per)
        else:  # replicated: the KV head the rank's query heads read
            first = rank * q // (heads // kv)
            kv_range = (first, first + 1)
        mlp, vocab = text.intermediate_size // size, text.vision_vocab_size // size
        return cls(
            rank,
            size,
            (rank * q, (rank + 1) * q),
            kv_range,
            (rank * mlp, (rank + 1) * mlp),
            (rank * vocab, (rank + 1) * vocab),
        )

    @property
    def heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def kv(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def intermediate(self) -> int:
        return self.mlp[1] - self.mlp[0]

    @property
    def vocab_size(self) -> int:
        return self.vocab[1] - self.vocab[0]
