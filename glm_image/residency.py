"""The memory planner: where the stages live and, with ``quantize="auto"``, their weight format.

Given the device's free memory (or ``max_memory``), the image size and the batch, ``plan_memory``
picks the residency, in this order of preference:

- ``resident``: both stages on the device (no transfers);
- ``swap``: one stage at a time, the idle one waiting in pinned host memory (two transfers of a
  stage's weights per image: ~0.4 s each way for an int8 AR over PCIe 4.0 x16);
- ``dit_offload``: the stages take turns and the DiT's blocks stay in (pinned) host memory,
  streamed to the device a block ahead of use on a side stream (``engine.offload``); the AR stage
  runs whole, so AR decoding keeps its speed;
- ``offload``: as ``dit_offload``, and the AR's layers stream too, the last resort (every AR
  token streams the decoder's weights).

These are the residencies the engine implements (``GlmImage`` applies each; a test runs every
one); ``residency=`` (``--residency``) forces one. With ``auto`` the format is chosen too, trying
(none, resident), (int8, resident), (int8, swap), (ar=int4 + dit=int8, swap), (int8,
dit_offload), (ar=int4 + dit=int8, dit_offload), (ar=int4 + dit=int8, offload): int8 before
swapping, since it costs little quality and makes AR decoding faster (half the bytes per token),
while swapping costs transfers on every image. One log line says what was chosen and why
(``MemoryPlan.describe``).

The estimate (``estimate_memory``): the weights of every component as the loader builds them
(our models and the reference's ByT5 and VAE built on the ``meta`` device: exact, and no weights
needed), plus the largest activations of each stage: the AR's static KV cache and prefill, the
DiT's per-block tensors at the size (``DIT_ACTIVATION``, measured: 11-18x rows x tokens x hidden
x bytes on a CPU, see ``benchmarks/bench_quant.py``), the VAE decode (``VAE_ACTIVATION``,
measured: ~2000x pixels x bytes, untiled), and ``RESERVE`` for the allocator and library
workspaces. Image-to-image adds the ViT's weights and activations, the condition images' tokens
in the AR prompt, the VAE encode of each condition image and the DiT's condition K/V cache
(2 x layers x tokens x hidden per condition image: 2.0e9 bytes at 1024x1024 in bfloat16); the
DiT step cache adds its per-row residual buffers; Jacobi decoding its window's logits. Block
offload keeps ``AHEAD + 1`` streamed units (``engine.offload``) of a stage on the device.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .budget import MAX_MEMORY, device_budget, parse_memory
from .errors import GlmImageError
from .quant import QuantScheme, check_device, parse_quantize

__all__ = [
    "MAX_MEMORY",
    "RESIDENCIES",
    "STREAMED",
    "MemoryEstimate",
    "MemoryPlan",
    "check_residency",
    "device_budget",
    "estimate_memory",
    "parse_memory",
    "plan_memory",
    "weight_bytes",
]

log = logging.getLogger(__name__)

RESIDENCIES = ("resident", "swap", "dit_offload", "offload")
# the stages whose blocks stream under each residency (the others run whole)
STREAMED = {"resident": (), "swap": (), "dit_offload": ("dit",), "offload": ("ar", "dit")}
STREAM_AHEAD = 1  # as engine.offload.AHEAD: units copied ahead of the running one
DIT_ACTIVATION = 20  # x rows * tokens * hidden * bytes: a block's live tensors at its peak
VAE_ACTIVATION = 4  # x the decoder's largest feature map (+ 2 x the next): an untiled decode's peak
PROMPT_TOKENS = 1024  # the AR prompt the plan allows for (a 1000-character prompt and template)
GLYPH_TOKENS = 512  # the glyph tokens the plan allows for
RESERVE = 512 * 2**20  # allocator fragmentation, cuBLAS / attention workspaces
_AUTO = (
    (QuantScheme("none", "none"), "resident"),
    (QuantScheme("int8", "int8"), "resident"),
    (QuantScheme("int8", "int8"), "swap"),
    (QuantScheme("int4", "int8"), "swap"),
    (QuantScheme("int8", "int8"), "dit_offload"),
    (QuantScheme("int4", "int8"), "dit_offload"),
    (QuantScheme("int4", "int8"), "offload"),
)
# ---------------------------------------------------------------------- weights


def _format_bytes(out_features: int, in_features: int, kind: str) -> int:
    """Bytes of one quantized (out, in) weight (``glm_image.quant.formats``)."""
    from .quant.formats import default_group

    if kind == "int4":
        return out_features * in_features // 2 + 2 * 2 * out_features * (
            in_features // default_group(in_features)
        )
    return out_features * in_features + 4 * out_features  # int8 / fp8 + float32 scales


def _module_bytes(
    module: torch.nn.Module, dtype: torch.dtype | None, quantized: dict[str, str]
) -> tuple[int, int]:
    """(parameters, bytes) of a module built on meta, loaded in ``dtype`` (None: as built), with
    the linears named in ``quantized`` (name -> format) stored in their format."""
    params = total = 0
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        params += tensor.numel()
        owner = name.rpartition(".")[0]
        if name.endswith(".weight") and owner in quantized:
            total += _format_bytes(*tensor.shape, quantized[owner])
        else:
            cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            total += (
                tensor.numel()
                * (torch.finfo(cast).bits if cast.is_floating_point else torch.iinfo(cast).bits)
                // 8
            )
    return params, total


def weight_bytes(
    root: str | Path,
    scheme: QuantScheme | str | None,
    dtype: torch.dtype,
    *,
    vision: bool = True,
    ar_tp: int = 1,
) -> dict[str, dict[str, int]]:
    """Every component as loaded under ``scheme`` in ``dtype``: ``{name: {"params", "bytes"}}``,
    for ar_text_decoder, ar_vision (the ViT + VQ tokenizer of image-to-image, if ``vision``), dit,
    glyph_encoder and vae; the AR decoder and the DiT also give ``units`` and ``unit_bytes``, what
    block offload streams. Built on ``meta`` from the configs: no weights are read (the result
    is remembered per checkpoint folder, scheme, dtype: a server plans many sizes). ``ar_tp``:
    the AR decoder is one tensor-parallel rank's shard of ``ar_tp`` (``parallel.layout.ArShard``:
    its heads, its MLP slice, its slice of the lm_head; the embedding whole)."""
    counted = _weight_bytes(str(Path(root).resolve()), str(parse_quantize(scheme)), dtype, vision, ar_tp)
    return {name: dict(c) for name, c in counted.items()}


@functools.lru_cache(maxsize=32)
def _weight_bytes(
    root: str, scheme: str, dtype: torch.dtype, vision: bool, ar_tp: int
) -> dict[str, dict[str, int]]:
    from .config import CheckpointConfig
    from .engine.offload import ar_units, dit_units
    from .models.ar import ArModel
    from .models.dit import DitModel
    from .models.vision import VisionEncoder
    from .parallel.comm import Comm
    from .quant import quantized_linears
    from .synthetic.reference import build_reference
    from .weights import build_on_meta

    scheme = parse_quantize(scheme)
    if scheme.auto:
        raise GlmImageError("weight_bytes: give a concrete scheme; 'auto' is resolved by plan_memory")
    config = CheckpointConfig.from_dir(root)
    out: dict[str, dict[str, int]] = {}

    def add(
        name: str, module: torch.nn.Module, load_dtype: torch.dtype | None, kind: str = "none", units=None
    ) -> None:
        quantized = dict.fromkeys(quantized_linears(module), kind) if kind != "none" else {}
        params, nbytes = _module_bytes(module, load_dtype, quantized)
        out[name] = {"params": params, "bytes": nbytes}
        if units is not None:  # the units block offload streams (engine.offload): all alike
            streamed = units(module)
            out[name]["units"] = len(streamed)
            out[name]["unit_bytes"] = sum(
                _module_bytes(part, load_dtype, _within(module, part, quantized))[1] for part in streamed[0]
            )

    ar_model = build_on_meta(lambda: ArModel(config.ar.text, tp=Comm(size=ar_tp, ranks=range(ar_tp))))
    add("ar_text_decoder", ar_model, dtype, scheme.ar, ar_units)
    if vision:
        add("ar_vision", build_on_meta(lambda: VisionEncoder(config.ar.vision, config.ar.vq)), dtype)
    add("dit", build_on_meta(lambda: DitModel(config.dit)), dtype, scheme.dit, dit_units)
    add("glyph_encoder", build_reference(config.root, "text_encoder", meta=True), dtype)
    add("vae", build_reference(config.root, "vae", meta=True), _vae_dtype(config, dtype))
    return out


def _within(model: torch.nn.Module, part: torch.nn.Module, quantized: dict[str, str]) -> dict[str, str]:
    """``quantized`` (names in ``model``) for the submodule ``part``: names relative to it."""
    (prefix,) = [name for name, module in model.named_modules() if module is part]
    return {
        name[len(prefix) + 1 :]: kind for name, kind in quantized.items() if name.startswith(prefix + ".")
    }


def _vae_dtype(config, dtype: torch.dtype) -> torch.dtype:
    # as DitEngine.from_pretrained: fp16 overflows in this VAE, which then decodes in float32
    return torch.float32 if dtype == torch.float16 and config.vae.force_upcast else dtype


# ---------------------------------------------------------------------- activations


def _vae_decode_elements(vae, pixels: int) -> int:
    """Elements live at an untiled decode's peak for an image of ``pixels``: ``VAE_ACTIVATION`` x
    the decoder's largest feature map + 2 x the next largest. Each up block runs at its resolution
    with its channels, then (all but the last) upsamples its output x2."""
    channels = list(reversed(vae.block_out_channels))
    levels = len(channels)
    maps = []
    for j, c in enumerate(channels):
        at = pixels // 4 ** (levels - 1 - j)  # this block's resolution
        maps.append(c * at)
        if j < levels - 1:
            maps.append(c * 4 * at)  # its upsampled output
    first, second = sorted(maps, reverse=True)[:2]
    return VAE_ACTIVATION * first + 2 * second


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the device: each component's weights and each stage's largest activations.

    ``ar_activations`` / ``dit_activations`` include what the stage holds through its run (the
    AR's KV cache and Jacobi buffers; the DiT's condition K/V and step-cache buffers);
    ``units`` per streamed stage: (the number of units block offload streams, bytes of one)."""

    weights: dict[str, int]
    ar_activations: int
    dit_activations: int
    vae_activations: int
    units: dict[str, tuple[int, int]] = field(default_factory=dict)  # "ar" / "dit" -> (count, bytes)
    parts: dict[str, int] = field(default_factory=dict)  # the activation terms, for the JSON
    # several devices: {"ar_tp", "dit_cfg", "dit_sp", "placement"}, and every number above is one
    # rank's (the busiest: the first, which decides the tokens and decodes the VAE); {}: one device
    ranks: dict = field(default_factory=dict)
    # what the AR keeps on its device between calls while it stays there (resident, or its own
    # devices): its device-graph buckets (``engine.graphs``: KV cache and noise each)
    kept: int = 0

    @property
    def residencies(self) -> tuple[str, ...]:
        """The residencies this estimate prices: all of them on one device; on several, the
        stages stay on their devices (the engine swaps and streams on one device only)."""
        return ("resident",) if self.ranks else RESIDENCIES

    @property
    def ar_stage(self) -> int:
        return self.weights["ar_text_decoder"] + self.weights.get("ar_vision", 0)

    @property
    def dit_stage(self) -> int:
        return self.weights["dit"] + self.weights["glyph_encoder"] + self.weights["vae"]

    def _streamed(self, stage: str) -> int:
        """Bytes of ``stage``'s weights that block offload leaves in host memory."""
        count, nbytes = self.units[stage]
        return count * nbytes - min(count, STREAM_AHEAD + 1) * nbytes

    def stage_peaks(self, residency: str) -> tuple[int, int]:
        """(the AR stage's run, the DiT stage's run) on the device under a residency that swaps."""
        streamed = STREAMED[residency]
        ar = self.ar_stage + self.ar_activations - (self._streamed("ar") if "ar" in streamed else 0)
        dit = self.dit_stage + max(self.dit_activations, self.vae_activations)
        dit -= self._streamed("dit") if "dit" in streamed else 0
        return ar, dit

    def peak(self, residency: str) -> int:
        """The estimated peak on the device under ``residency``."""
        check_residency(residency)
        if residency not in self.residencies:
            raise GlmImageError(
                f"residency = {residency!r}: the stages run on several devices ({self.ranks}); allowed: "
                + ", ".join(self.residencies)
            )
        if self.ranks.get("placement") == "separate":  # the AR's ranks, then the DiT's, apart
            ar = self.ar_stage + self.kept + self.ar_activations
            dit = self.dit_stage + max(self.dit_activations, self.vae_activations)
            return max(ar, dit) + RESERVE
        if residency == "resident":  # several ranks: the first device holds a rank of each stage
            run = max(self.ar_activations, self.dit_activations, self.vae_activations)
            return self.ar_stage + self.dit_stage + self.kept + run + RESERVE
        return max(self.stage_peaks(residency)) + RESERVE

    def to_json(self) -> dict:
        return {
            "weights_bytes": dict(self.weights),
            "ar_activation_bytes": self.ar_activations,
            "dit_activation_bytes": self.dit_activations,
            "vae_activation_bytes": self.vae_activations,
            "activation_parts_bytes": dict(self.parts),
            "streamed_units": {stage: {"count": c, "bytes": b} for stage, (c, b) in self.units.items()},
            "reserve_bytes": RESERVE,
            "kept_bytes": self.kept,
            "peak_bytes": {r: self.peak(r) for r in self.residencies},
            **({"ranks": dict(self.ranks)} if self.ranks else {}),
        }


def check_residency(residency: str | None, field: str = "residency") -> str | None:
    """``residency`` if it is one the engine implements (or None: the planner picks), else a
    ``GlmImageError`` starting with ``field`` and listing the allowed names."""
    if residency is not None and residency not in RESIDENCIES:
        raise GlmImageError(
            f"{field} = {residency!r}; allowed: {', '.join(RESIDENCIES)} (the keys of "
            "plan.estimate.peak_bytes in `glm-image info --json`), or none to let the planner choose"
        )
    return residency


def estimate_memory(
    root: str | Path,
    scheme: QuantScheme | str | None,
    dtype: torch.dtype,
    *,
    height: int = 1024,
    width: int = 1024,
    batch: int = 1,
    images: bool = False,
    conditions: int = 0,
    step_cache: bool = False,
    jacobi_window: int = 0,
    parallel=None,
    graph_buckets: int = 0,
) -> MemoryEstimate:
    """The estimate for one generation call of ``batch`` images at ``height`` x ``width`` (see
    the module docstring). ``images``: the ViT is loaded (image-to-image served);
    ``conditions``: condition images per prompt (each counted at ``height`` x ``width``, the
    largest a request may give; implies ``images``; the DiT's K/V counted for every image of the
    batch, exact at one image per prompt); ``step_cache``: the DiT step cache is on;
    ``jacobi_window``: Jacobi decoding's window (0: sequential); ``parallel``: a
    ``parallel.ParallelConfig`` whose stages run on several devices (None: one device), which
    makes the estimate one device's: the AR's first tensor-parallel rank (its heads, KV heads,
    MLP and lm_head slices; the sampling noise and the gathered logits whole, since it decides
    the tokens) and the DiT's first rank (one CFG branch's rows with ``dit_cfg_parallel``, 1 /
    ``dit_sp`` of the tokens under Ulysses; the weights, the glyph encoder and the VAE whole);
    ``graph_buckets``: the device-graph buckets the AR keeps between calls (``engine.graphs``;
    0 where the device has no graphs), each counted at this call's KV cache and noise (an
    upper bound: a bucket is one call's shape), held while the AR stays on its device."""
    from .config import CheckpointConfig
    from .parallel.layout import ArShard

    scheme = parse_quantize(scheme)
    config = CheckpointConfig.from_dir(root)
    images = images or conditions > 0
    spread = parallel is not None and parallel.spread
    tp, cfg, sp = (parallel.ar_tp, parallel.dit_cfg, parallel.dit_sp) if spread else (1, 1, 1)
    components = weight_bytes(root, scheme, dtype, vision=images, ar_tp=tp)
    weights = {name: c["bytes"] for name, c in components.items()}
    act = torch.finfo(dtype).bits // 8
    text, dit = config.ar.text, config.dit
    patch = config.vae.scale_factor * dit.patch_size
    image_tokens = (height // patch) * (width // patch)  # DiT tokens of one image
    parts: dict[str, int] = {}

    # AR: the static cache (prompt + condition tokens + preview + target grid + EOS), the
    # prefill's widest tensors (the MLP's gate/up and its product, q/k/v, float32 attention
    # scores where SDPA takes the masked math path), the sampling noise, and a layer's weight
    # dequantized for a prefill GEMM. Condition tokens: counted at the DiT's grid (an upper bound).
    prompt = PROMPT_TOKENS + conditions * image_tokens
    tokens = (height // 32) * (width // 32) + 256 + 1
    capacity = prompt + tokens
    shard = ArShard.of(text, 0, tp)  # one device's heads and MLP slice (all of them at tp 1)
    kv_heads, heads = shard.kv_heads[1] - shard.kv_heads[0], shard.q_heads[1] - shard.q_heads[0]
    mlp = shard.mlp[1] - shard.mlp[0]
    parts["ar_kv_cache"] = 2 * text.num_hidden_layers * batch * kv_heads * capacity * text.head_dim * act
    parts["ar_prefill"] = batch * prompt * (3 * mlp + 3 * text.hidden_size) * act
    parts["ar_scores"] = batch * heads * prompt**2 * 4
    parts["ar_noise"] = batch * 256 * text.vision_vocab_size * 4
    parts["ar_dequantized"] = 2 * mlp * text.hidden_size * act if scheme.ar != "none" else 0
    # Jacobi: each forward carries the window per row; its logits, draft probabilities and noise
    parts["ar_jacobi"] = 4 * batch * (jacobi_window + 1) * text.vision_vocab_size * 4 if jacobi_window else 0
    ar_activations = sum(v for k, v in parts.items() if k.startswith("ar_"))
    if images:  # the ViT over one condition image (its patches at 16 px), before the AR prefill
        vision = config.ar.vision
        patches = (height // vision.patch_size) * (width // vision.patch_size)
        parts["ar_vit"] = (
            DIT_ACTIVATION * patches * vision.hidden_size * act + vision.num_heads * patches**2 * 4
        )
        ar_activations = max(ar_activations, parts["ar_vit"] + parts["ar_kv_cache"])

    # DiT: both CFG branches of every image through a block, and the dequantized widest weight
    # (a DiT rank: one CFG branch's rows under CFG parallel, 1 / sp of the tokens under Ulysses)
    rows = 2 * batch // cfg
    seq = -(-(image_tokens + GLYPH_TOKENS) // sp)
    rank_tokens = -(-image_tokens // sp)
    parts["dit_block"] = DIT_ACTIVATION * rows * seq * dit.hidden_size * act
    parts["dit_dequantized"] = 4 * dit.hidden_size * dit.hidden_size * act if scheme.dit != "none" else 0
    # condition K/V: every layer's K and V over each condition image's tokens, held all the call
    parts["dit_condition_kv"] = 2 * dit.num_layers * batch * conditions * rank_tokens * dit.hidden_size * act
    # the step cache: per row the probe, the last probe and the residual (+ the residual's
    # previous value for the Taylor extrapolation): 4 image streams per row
    parts["dit_step_cache"] = 4 * rows * rank_tokens * dit.hidden_size * act if step_cache else 0
    dit_activations = sum(v for k, v in parts.items() if k.startswith("dit_"))

    vae_act = torch.finfo(_vae_dtype(config, dtype)).bits // 8
    pixels = min(height * width, 1024 * 1024)  # above 1024x1024 the decode is tiled
    parts["vae_decode"] = batch * _vae_decode_elements(config.vae, pixels) * vae_act
    # a condition image's encode runs before the steps, with the condition K/V still being written
    parts["vae_encode"] = _vae_decode_elements(config.vae, pixels) * vae_act if conditions else 0
    vae_activations = max(parts["vae_decode"], parts["vae_encode"] + parts["dit_condition_kv"])

    units = {
        stage: (components[name]["units"], components[name]["unit_bytes"])
        for stage, name in (("ar", "ar_text_decoder"), ("dit", "dit"))
    }
    ranks = {"ar_tp": tp, "dit_cfg": cfg, "dit_sp": sp, "placement": parallel.placement} if spread else {}
    kept = graph_buckets * (parts["ar_kv_cache"] + parts["ar_noise"])
    return MemoryEstimate(
        weights, ar_activations, dit_activations, vae_activations, units, parts, ranks, kept
    )


# ---------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class MemoryPlan:
    residency: str  # one of RESIDENCIES
    scheme: QuantScheme
    budget: int | None  # bytes the device offers (None: unknown)
    peak_bytes: int  # the estimated peak under this residency
    estimate: MemoryEstimate
    fits: bool
    reason: str
    device: str
    size: tuple[int, int]  # (height, width)
    batch: int
    # Why the device cannot run the scheme: the error loading would raise (quant.check_device),
    # None when it can or when no device is named (meta)
    device_error: str | None = None
    parallel: object = None  # a parallel.ParallelConfig over several devices (None: one device)
    graph_buckets: int = 0  # the AR's device-graph buckets the estimate counts (engine.graphs)

    @property
    def offload(self) -> bool:
        """True when the stages must not both stay on the device (``GlmImage(offload=...)``)."""
        return self.residency != "resident"

    @property
    def streamed(self) -> tuple[str, ...]:
        """The stages whose blocks stream from host memory (``engine.offload``): "ar", "dit"."""
        return STREAMED[self.residency]

    def describe(self) -> str:
        """The one log line: the choice and why."""
        gb = 1e9
        budget = f"{self.budget / gb:.1f} GB" if self.budget is not None else "unknown"
        height, width = self.size
        return (
            f"memory plan on {self.device}: quantize {self.scheme}, {self.residency}; estimated peak "
            f"{self.peak_bytes / gb:.1f} GB of {budget} for {width}x{height} batch {self.batch} "
            f"{' on the busiest device' if self.parallel is not None else ''} (weights AR "
            f"{'rank ' if self.parallel is not None else ''}{self.estimate.ar_stage / gb:.1f} GB + "
            f"DiT/glyph/VAE {self.estimate.dit_stage / gb:.1f} GB): "
            f"{self.reason}" + (f"; CANNOT RUN here: {self.device_error}" if self.device_error else "")
        )

    def to_json(self) -> dict:
        return {
            "device": self.device,
            "quantize": str(self.scheme),
            "residency": self.residency,
            "fits": self.fits,
            "budget_bytes": self.budget,
            "peak_bytes": self.peak_bytes,
            "size": f"{self.size[1]}x{self.size[0]}",
            "batch": self.batch,
            "reason": self.reason,
            "runs_on_device": None if self.device == "meta" else self.device_error is None,
            "device_error": self.device_error,
            "parallel": self.parallel.describe() if self.parallel is not None else None,
            "estimate": self.estimate.to_json(),
        }


def plan_memory(
    root: str | Path,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    *,
    quantize: QuantScheme | str | None = None,
    height: int = 1024,
    width: int = 1024,
    batch: int = 1,
    max_memory: str | int | None = None,
    images: bool = False,
    residency: str | None = None,
    conditions: int = 0,
    step_cache: bool = False,
    jacobi_window: int = 0,
    parallel=None,
) -> MemoryPlan:
    """The residency (and, for ``quantize="auto"``, the scheme) for generating ``batch`` images of
    ``height`` x ``width`` from the checkpoint at ``root`` on ``device`` (see the module docstring).

    ``max_memory`` ("16GB", "16GiB" or bytes) caps the device's free memory. On a CPU the stages
    share host memory with nothing to swap to, so the plan is always ``resident`` (its estimate
    says whether the host's available memory holds it). A scheme the device cannot run (fp8 off a
    recent CUDA GPU) is planned all the same, its ``device_error`` saying why, in the words loading
    would raise. ``residency``: force one of ``RESIDENCIES`` (the plan says whether it fits; on a
    CPU too, where every residency runs the same code path synchronously). ``images``,
    ``conditions``, ``step_cache``, ``jacobi_window``: what the calls will hold (see
    ``estimate_memory``). ``parallel``: a ``parallel.ParallelConfig`` whose stages run on several
    devices: the plan is then for the busiest device (its budget the device's free memory or
    ``max_memory``), and ``resident`` the one residency (the engine swaps and streams on one
    device only). Logs ``MemoryPlan.describe()``."""
    from .device import default_dtype
    from .engine.graphs import DEFAULT_BUCKETS

    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    scheme = parse_quantize(quantize)
    forced = check_residency(residency)
    cap = parse_memory(max_memory)
    free = device_budget(device) if device.type != "meta" else None
    budget = min(x for x in (cap, free) if x is not None) if (cap or free) else None
    source = "max_memory" if cap is not None and (free is None or cap <= free) else "free memory"

    spread = parallel is not None and parallel.spread
    if spread and forced not in (None, "resident"):
        raise GlmImageError(
            f"residency = {forced!r}: the stages run on several devices ({parallel.describe()}); "
            "allowed: resident or none"
        )
    one_place = device.type == "cpu" or spread
    # the AR keeps its graph buckets where graphs exist (meta: an accelerator, as planned for)
    buckets = DEFAULT_BUCKETS if device.type in ("cuda", "npu", "meta") else 0
    residencies = (forced,) if forced else ("resident",) if one_place else RESIDENCIES
    candidates = (
        [(s, r) for s, r in _AUTO if r in residencies] if scheme.auto else [(scheme, r) for r in residencies]
    )
    estimates: dict[QuantScheme, MemoryEstimate] = {}
    choice = None
    for candidate, residency in candidates:
        if candidate not in estimates:
            estimates[candidate] = estimate_memory(
                root,
                candidate,
                dtype,
                height=height,
                width=width,
                batch=batch,
                images=images,
                conditions=conditions,
                step_cache=step_cache,
                jacobi_window=jacobi_window,
                parallel=parallel,
                graph_buckets=buckets,
            )
        peak = estimates[candidate].peak(residency)
        if budget is None or peak <= budget:
            choice = (candidate, residency, peak, True)
            break
    if choice is None:  # nothing fits: the smallest candidate, said to be too big
        candidate, residency = candidates[-1]
        choice = (candidate, residency, estimates[candidate].peak(residency), False)
    candidate, residency, peak, fits = choice

    if forced:
        reason = f"residency {forced} as asked" + (
            "" if budget is None else f"; it fits the {source} ({budget / 1e9:.1f} GB)" if fits else ""
        )
        if budget is not None and not fits:
            reason += f"; does NOT fit the {source} ({budget / 1e9:.1f} GB); expect out-of-memory errors"
    elif budget is None:
        reason = "no memory budget known for this device: both stages stay"
    elif not fits:
        reason = f"does NOT fit the {source} ({budget / 1e9:.1f} GB) even so; expect out-of-memory errors"
    elif spread:
        reason = f"fits the {source} ({budget / 1e9:.1f} GB) of each device: {parallel.describe()}"
    elif device.type == "cpu":
        reason = f"the stages share host memory ({source} {budget / 1e9:.1f} GB)"
    else:
        tried = candidates[: candidates.index((candidate, residency))]
        skipped = ", ".join(
            f"{s} {r} {estimates[s].peak(r) / 1e9:.1f} GB" for s, r in tried if s in estimates
        )
        reason = f"fits the {source}" + (f" (too big: {skipped})" if skipped else "")
    device_error = None
    if device.type != "meta":  # meta is no device: what it can run is not known
        try:
            check_device(candidate, device)
        except GlmImageError as e:
            device_error = str(e)
    plan = MemoryPlan(
        residency,
        candidate,
        budget,
        peak,
        estimates[candidate],
        fits,
        reason,
        str(device),
        (height, width),
        batch,
        device_error,
        parallel if spread else None,
        buckets,
    )
    log.info(plan.describe())
    return plan
