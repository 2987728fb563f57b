"""What a checkpoint holds: components, sizes, dtypes, files. Read from headers, no weights loaded.

``memory_report`` is ``glm-image info --json``: each component's parameters and bytes as the
loader would build them under a quantization scheme, and the memory planner's choice for a size
(``glm_image.residency``) on the device and dtype ``generate`` would use; everything is counted on
the ``meta`` device, so the released preset's figures need no weights and no memory. The text
output's plan is ``format_memory_report`` of the same object: one plan, two renderings.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .config import PIPELINE_COMPONENTS, CheckpointConfig
from .errors import CheckpointError
from .synthetic.reference import REFERENCE_FACTORIES, build_reference, count_parameters
from .weights import WeightIndex

__all__ = [
    "ComponentInfo",
    "describe_checkpoint",
    "format_checkpoint",
    "format_memory_report",
    "memory_report",
]

# Named parts of the vision-language encoder, by key prefix (the AR text model is the hot path).
_VLE_PARTS = {
    "AR text decoder": ("model.language_model.", "lm_head."),
    "ViT (image inputs)": ("model.visual.",),
    "VQ quantizer": ("model.vqmodel.",),
}


@dataclass(frozen=True)
class ComponentInfo:
    name: str
    library: str
    class_name: str
    num_params: int | None  # None when the folder has no weights (a config preset)
    dtypes: tuple[str, ...]
    files: tuple[str, ...]
    parts: tuple[tuple[str, int], ...] = ()


def describe_checkpoint(
    root: str | Path, *, count_on_meta: bool = False
) -> tuple[CheckpointConfig, list[ComponentInfo]]:
    """Validate the configs and read every weights header of a checkpoint folder.

    A component folder without weights (a config preset) reports no parameter count, or with
    ``count_on_meta`` the count of its reference class built on the ``meta`` device.
    """
    config = CheckpointConfig.from_dir(root)
    infos = []
    for name, (library, class_name) in PIPELINE_COMPONENTS.items():
        folder = config.root / name
        try:
            index = WeightIndex.from_folder(folder)
        except CheckpointError:
            if any(folder.glob("*.safetensors*")):
                raise  # weights are there but broken: say so, do not report "no weights"
            infos.append(_without_weights(config.root, name, library, class_name, count_on_meta))
            continue
        dtypes = Counter()
        for t in index.tensors.values():
            dtypes[t.dtype] += t.numel
        parts = ()
        if name == "vision_language_encoder":
            parts = tuple(
                (label, sum(t.numel for n, t in index.tensors.items() if n.startswith(prefixes)))
                for label, prefixes in _VLE_PARTS.items()
            )
        files = tuple(p.name for p in index.files) + ((index.index_file.name,) if index.index_file else ())
        infos.append(
            ComponentInfo(
                name,
                library,
                class_name,
                index.num_params,
                tuple(d for d, _ in dtypes.most_common()),
                files,
                parts,
            )
        )
    return config, infos


def _without_weights(
    root: Path, name: str, library: str, class_name: str, count_on_meta: bool
) -> ComponentInfo:
    folder = root / name
    files = tuple(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else ()
    if not count_on_meta or name not in REFERENCE_FACTORIES:
        return ComponentInfo(name, library, class_name, None, (), files)
    module = build_reference(root, name, meta=True)
    parts = ()
    if name == "vision_language_encoder":
        parts = tuple(
            (label, sum(count_parameters(module, p) for p in prefixes))
            for label, prefixes in _VLE_PARTS.items()
        )
    return ComponentInfo(name, library, class_name, count_parameters(module), ("meta",), files, parts)


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_checkpoint(config: CheckpointConfig, infos: list[ComponentInfo]) -> str:
    """A human-readable report of ``describe_checkpoint``."""
    text, ar, dit = config.ar.text, config.ar, config.dit
    lines = [f"checkpoint: {config.root}", ""]
    lines.append(f"{'component':<25} {'class':<46} {'params':>9}  {'dtype':<10} files")
    for info in infos:
        params = _human(info.num_params) if info.num_params is not None else "-"
        if any(f.endswith(".index.json") for f in info.files):
            files = f"{len(info.files) - 1} shards + index"
        else:
            files = ", ".join(info.files) if len(info.files) <= 3 else f"{len(info.files)} files"
        lines.append(
            f"{info.name:<25} {info.library + '.' + info.class_name:<46} {params:>9}  "
            f"{'/'.join(info.dtypes) or '-':<10} {files}"
        )
        lines.extend(f"{'':<27}{label}: {_human(n)}" for label, n in info.parts)
    lines += [
        "",
        f"AR text decoder  {text.num_hidden_layers} layers, hidden {text.hidden_size}, FFN {text.intermediate_size}, "
        f"heads {text.num_attention_heads} (KV {text.num_key_value_heads}) x {text.head_dim}, "
        f"M-RoPE {list(text.mrope_section)} over {text.rotary_dim} of {text.head_dim} dims",
        f"                 vocab {text.vocab_size}, image vocab {text.vision_vocab_size} "
        f"(image start {ar.image_start_token_id}, end/EOS {ar.image_end_token_id})",
        f"DiT decoder      {dit.num_layers} blocks, hidden {dit.hidden_size} ({dit.num_attention_heads} x "
        f"{dit.attention_head_dim}), patch {dit.patch_size}, {dit.in_channels} latent channels",
        f"Glyph encoder    ByT5 {config.glyph.num_layers} layers, d_model {config.glyph.d_model}",
        f"VAE              x{config.vae.scale_factor} downsampling, {config.vae.latent_channels} latent channels",
        f"Sampling         AR temperature {config.generation.temperature}, top_p {config.generation.top_p}; "
        f"DiT flow-match, {config.scheduler.num_train_timesteps} train steps, dynamic shift "
        f"{config.scheduler.use_dynamic_shifting}",
    ]
    unknown = config.unknown_keys()
    if unknown:
        lines += [
            "",
            "Config keys this engine does not know (not read; a newer checkpoint may need a newer engine):",
        ]
        lines += [f"  {source}: {key}" for source, key in unknown]
    return "\n".join(lines)


def memory_report(
    root: str | Path,
    quantize: str | None = None,
    *,
    dtype=None,
    device=None,
    detected: bool = False,
    max_memory: str | int | None = None,
    height: int = 1024,
    width: int = 1024,
    batch: int = 1,
    residency: str | None = None,
    parallel=None,
) -> dict:
    """The JSON object of ``glm-image info --json`` (the text output renders it with
    ``format_memory_report``, so the two cannot disagree)::

        {"model", "device", "dtype", "plan_for", "quantize",
         "components": {name: {"params": int, "bytes": int}},   # as loaded under the scheme
         "plan": {"device", "residency", "quantize", "fits", "budget_bytes", "peak_bytes", "reason",
                  "runs_on_device", "device_error", "estimate", ...}}

    Components: ar_text_decoder, ar_vision (ViT + VQ tokenizer, loaded for image-to-image only),
    dit, glyph_encoder, vae. The plan is for ``height`` x ``width`` at ``batch`` on ``device`` (a
    resolved device: its free memory is the budget, capped by ``max_memory``; ``detected``: it was
    detected, not named) in ``dtype`` (default: the device's, as ``generate`` would load). With no
    ``device`` the plan is for ``meta``: an accelerator with no free memory known (bfloat16),
    whose budget is ``max_memory`` alone. ``plan_for`` says which in words. With
    ``quantize="auto"`` the plan picks the scheme and the components follow it. A scheme the
    device cannot run is planned all the same: ``plan.runs_on_device`` is false and
    ``plan.device_error`` is the error ``generate`` would give. ``residency``: force one (a key of
    ``plan.estimate.peak_bytes``); None: the planner chooses. ``parallel``: a
    ``parallel.ParallelConfig`` over several devices: the plan is then one device's (the
    busiest), ``plan.parallel`` says the layout and ``plan.estimate.ranks`` the ranks.
    """
    import torch

    from .device import default_dtype
    from .residency import plan_memory, weight_bytes

    where = torch.device(device if device is not None else "meta")
    chosen = dtype or default_dtype(where)
    plan = plan_memory(
        root,
        where,
        chosen,
        quantize=quantize,
        height=height,
        width=width,
        batch=batch,
        max_memory=max_memory,
        residency=residency,
        parallel=parallel,
    )
    dtype_name = str(chosen).removeprefix("torch.")
    if where.type == "meta":
        device_words = "no device (meta): an accelerator whose free memory is not known"
    else:
        device_words = f"{where} ({'detected: no --device given' if detected else 'as given'})"
    dtype_words = f"{dtype_name} ({'as given' if dtype else 'the default on ' + where.type})"
    return {
        "model": str(root),
        "device": str(where),
        "dtype": dtype_name,
        "plan_for": f"{device_words}, {dtype_words}",
        "quantize": str(plan.scheme),
        "components": weight_bytes(root, plan.scheme, chosen),  # whole: a rank's are in the plan
        "plan": plan.to_json(),
    }


def format_memory_report(report: dict) -> str:
    """``memory_report``'s plan as text: the same device, dtype and numbers as the JSON, in GB."""

    def gb(n: int) -> str:
        return f"{n / 1e9:.2f} GB"

    plan, estimate = report["plan"], report["plan"]["estimate"]
    weights = estimate["weights_bytes"]
    ar = weights["ar_text_decoder"] + weights.get("ar_vision", 0)
    rest = weights["dit"] + weights["glyph_encoder"] + weights["vae"]
    budget = gb(plan["budget_bytes"]) if plan["budget_bytes"] is not None else "no known budget"
    peaks = ", ".join(f"{r} {gb(n)}" for r, n in estimate["peak_bytes"].items())
    pad = " " * 17
    lines = [
        f"Memory plan      for {report['plan_for']}; {plan['size']}, batch {plan['batch']}",
        f"{pad}quantize {plan['quantize']}, {plan['residency']}: estimated peak {gb(plan['peak_bytes'])} "
        f"of {budget}: {plan['reason']}",
        f"{pad}weights AR {gb(ar)} + DiT/glyph/VAE {gb(rest)}; peak by residency: {peaks}",
    ]
    if plan.get("parallel"):
        lines.append(
            f"{pad}one device's share (the busiest) of {plan['parallel']}"
            + ("; a CPU's ranks share its memory" if plan["device"] == "cpu" else "")
        )
    if plan["device_error"]:
        lines.append(f"{pad}CANNOT RUN on {plan['device']}: {plan['device_error']}")
    return "\n".join(lines)
