"""How far a quantized engine is from the unquantized one: the measures of the tests and of
``benchmarks/bench_quant.py``.

AR logits are compared teacher-forced: both models read the same tokens (the unquantized model's
own), so a flipped near-tie does not send the two generations down different paths and every
later step differs for that reason alone. One prefill over prompt + tokens gives the logits of
every step at once (the same maths as the decode loop: causal attention, each token at its own
M-RoPE position).
"""

from __future__ import annotations

from dataclasses import replace

import torch

__all__ = ["dit_velocity", "logit_metrics", "relative_error", "teacher_forced_logits"]


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """||other - reference|| / ||reference||, in float32 (velocities, latents, images)."""
    reference, other = reference.float(), other.float()
    return float((other - reference).norm() / reference.norm().clamp_min(1e-30))


def logit_metrics(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Logits (..., V) of the same steps: the mean KL(reference || other) of their softmaxes, the
    fraction of steps whose argmax agrees, and the relative error of the logits."""
    ref, got = reference.float().log_softmax(-1), other.float().log_softmax(-1)
    kl = (ref.exp() * (ref - got)).sum(-1).mean()
    top1 = (reference.argmax(-1) == other.argmax(-1)).float().mean()
    return {"kl": float(kl), "top1": float(top1), "relative_error": relative_error(reference, other)}


@torch.inference_mode()
def teacher_forced_logits(engine, prompt: str, height: int, width: int, tokens: torch.Tensor) -> torch.Tensor:
    """The logits (steps, V) an ``ArEngine`` gives at every step when it is fed ``tokens`` (steps,)
    (e.g. another engine's ``generate(...).tokens[0]``) after ``prompt``, float32."""
    from ..models.ar import KVCache

    batch, _, _ = engine._plan([prompt], height, width)
    steps = tokens.shape[-1]
    fed = tokens.reshape(1, -1)[:, : steps - 1].to(engine.device)
    prompt_len = batch.input_ids.shape[1]
    batch = replace(
        batch,
        input_ids=torch.cat([batch.input_ids, fed], dim=1),
        valid=torch.cat([batch.valid, torch.ones_like(fed, dtype=torch.bool)], dim=1),
        positions=torch.cat([batch.positions, batch.decode_positions[:, :, : steps - 1]], dim=2),
    )
    text, kv = engine.config.ar.text, engine.model.shard.kv
    cache = KVCache(text, 1, prompt_len + steps - 1, engine.device, engine.dtype, kv_heads=kv)
    hidden = engine._prefill(batch, cache)  # (1, P + steps - 1, hidden)
    return engine.model.logits(hidden[0, prompt_len - 1 :])


@torch.inference_mode()
def dit_velocity(
    engine, prior: torch.Tensor, prompt: str, height: int, width: int, t: float = 500.0, seed: int = 0
) -> torch.Tensor:
    """The guided velocity (B, C, H/8, W/8), float32, a ``DitEngine`` gives at timestep ``t`` for
    the seed's initial noise, ``prior`` (B, (H/16)*(W/16)) tokens and ``prompt``, at guidance 1.5."""
    prior = prior.to(engine.device)
    plan = engine._plan(prior, [prompt], prior.shape[0], height, width, 1.5)
    latents = engine._noise(prior.shape[0], height, width, seed).float()
    return engine._velocity(plan, latents, t)
