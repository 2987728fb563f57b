"""Strict safetensors loading into modules built on the ``meta`` device.

A module is built with no storage (``torch.device("meta")``), then every tensor it declares is
read from the checkpoint memory-mapped, cast, moved straight to the target device and put in
place with ``load_state_dict(assign=True)``: no full-size random init, no second copy in host
memory. Loading is strict: a missing, unexpected or wrong-shaped tensor is an error that lists
the names. A module may declare named remaps (``Fuse``: one module tensor made of several
checkpoint tensors, e.g. q/k/v) and checkpoint prefixes it deliberately does not use.

Only safetensors are read. Headers are validated before any tensor is touched, so a truncated
or corrupt file, a missing shard or an index naming a missing file gives an error naming the
file. Nothing is ever unpickled.

Quantization happens here, while loading (``quantize=``): the checks run against the module as
built (full-precision linears), then each linear named for quantization has its weight read,
converted on the device into the module that replaces it (``glm_image.quant.QuantLinear``) and
dropped, one tensor at a time. The device never holds more than the converted model plus one
full-precision tensor (and the converter's temporaries).
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError, CorruptCheckpointError, WeightsMismatchError

__all__ = [
    "Fuse",
    "LoadReport",
    "Part",
    "TensorInfo",
    "WeightIndex",
    "build_on_meta",
    "load_model",
    "load_weights",
    "read_safetensors_header",
]

log = logging.getLogger(__name__)

# safetensors dtype codes -> (torch dtype, bytes per element)
_DTYPES: Mapping[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors format itself sets
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_LISTED = 20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it (nothing read yet)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPES[self.dtype][1]


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header against the file's real size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weights file: {path}")
    size = path.stat().st_size
    if size < 8:
        raise CorruptCheckpointError(f"{path}: {size} bytes is too short to be a safetensors file")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise CorruptCheckpointError(
                f"{path}: header claims {header_len} bytes but the file holds {size - 8} after the length "
                "field: truncated, or not a safetensors file"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: header is not valid JSON ({e}): corrupt file") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header is not a JSON object: corrupt file")

    data_len = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{path}: header entry for tensor '{name}' is malformed") from None
        if dtype not in _DTYPES:
            raise CorruptCheckpointError(
                f"{path}: tensor '{name}' has dtype {dtype!r}; allowed: {', '.join(_DTYPES)}"
            )
        info = TensorInfo(name, path, dtype, shape)
        if any(not isinstance(d, int) or d < 0 for d in shape) or not 0 <= begin <= end:
            raise CorruptCheckpointError(f"{path}: tensor '{name}' has an invalid shape or offsets")
        if end - begin != info.nbytes:
            raise CorruptCheckpointError(
                f"{path}: tensor '{name}' spans {end - begin} bytes but {dtype} {list(shape)} needs {info.nbytes}"
            )
        if end > data_len:
            raise CorruptCheckpointError(
                f"{path}: truncated: tensor '{name}' ends at byte {end} of the data section, "
                f"but the file holds only {data_len} data bytes"
            )
        tensors[name] = info
    return tensors


@dataclass(frozen=True)
class WeightIndex:
    """Where every tensor of one component folder lives (single file or sharded with an index)."""

    folder: Path
    tensors: Mapping[str, TensorInfo]
    index_file: Path | None

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(sorted({t.file for t in self.tensors.values()}))

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @classmethod
    def from_folder(cls, folder: str | Path) -> WeightIndex:
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint component folder not found: {folder}")
        if (folder / "drawn_weights.json").is_file():  # glm-image-random: drawn from a seed, not stored
            from .synthetic.random import drawn_index

            return cls(folder, drawn_index(folder), None)
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(
                f"{folder}: several weight indexes ({', '.join(p.name for p in indexes)}); keep one"
            )
        if indexes:
            return cls._from_index(indexes[0])
        files = sorted(folder.glob("*.safetensors"))
        if len(files) == 1:
            return cls(folder, read_safetensors_header(files[0]), None)
        if len(files) > 1:
            raise CheckpointError(
                f"{folder}: several .safetensors files ({', '.join(p.name for p in files)}) and no "
                "*.safetensors.index.json saying which tensor is where"
            )
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{folder}: only pickle weights found ({', '.join(pickles)}); this engine reads .safetensors "
                "only, because unpickling can run arbitrary code. Convert them with the library that wrote them."
            )
        raise CheckpointError(
            f"{folder}: no weights found (expected model.safetensors, diffusion_pytorch_model.safetensors, "
            "or a *.safetensors.index.json with its shards)"
        )

    @classmethod
    def _from_index(cls, index_file: Path) -> WeightIndex:
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(f"{index_file}: not valid JSON ({e})") from None
        except (KeyError, TypeError):
            raise CorruptCheckpointError(f"{index_file}: no 'weight_map' object") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptCheckpointError(f"{index_file}: 'weight_map' must be a non-empty object")

        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise CorruptCheckpointError(
                    f"{index_file}: tensor '{name}' points at {shard!r}, which is not a file name in this folder"
                )
            by_shard.setdefault(shard, []).append(name)

        for shard, names in sorted(by_shard.items()):
            if not (index_file.parent / shard).is_file():
                raise CheckpointError(
                    f"{index_file}: shard '{shard}' (holding {len(names)} tensors, e.g. '{names[0]}') "
                    f"is missing from {index_file.parent}"
                )
        tensors: dict[str, TensorInfo] = {}
        for shard, names in sorted(by_shard.items()):
            path = index_file.parent / shard
            header = read_safetensors_header(path)
            absent = [n for n in names if n not in header]
            if absent:
                raise CorruptCheckpointError(
                    f"{index_file}: lists {_names(absent)} in '{shard}', but that file does not hold them"
                )
            extra = sorted(set(header) - set(names))
            if extra:
                raise CorruptCheckpointError(
                    f"{path}: holds {_names(extra)} that {index_file.name} does not list"
                )
            tensors.update(header)
        return cls(index_file.parent, tensors, index_file)


@dataclass(frozen=True)
class Part:
    """Rows or columns [start, stop) along ``dim`` of checkpoint tensor ``name``: a tensor-parallel
    rank's shard (``glm_image.parallel.layout``). Only the slice is read from the file."""

    name: str
    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class Fuse:
    """A module tensor made by concatenating checkpoint tensors (e.g. q, k, v -> qkv) along ``dim``;
    a source may be a ``Part`` of one."""

    sources: tuple[str | Part, ...]
    dim: int = 0


@dataclass(frozen=True)
class LoadReport:
    """What a load did, for logs and ``glm-image info``."""

    folder: Path
    files: tuple[Path, ...]
    num_tensors: int
    num_bytes: int
    seconds: float
    ignored: tuple[str, ...]
    # Non-persistent buffers (rotary tables, ...) are not in checkpoints: the model computes them.
    meta_buffers: tuple[str, ...]


def build_on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Construct a module with no storage; its tensors get real values only when loaded."""
    with torch.device("meta"):
        return factory()


# a linear's name -> what turns the linear (on meta) and its loaded weight into its replacement
Converters = Mapping[str, Callable[[torch.nn.Module, torch.Tensor], torch.nn.Module]]


def load_model(
    factory: Callable[[], torch.nn.Module],
    folder: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    quantize: Callable[[torch.nn.Module], Converters] | None = None,
) -> torch.nn.Module:
    """Build on ``meta`` and load ``folder`` strictly; the module may declare how it reads it.

    A model whose names differ from the checkpoint's declares ``checkpoint_key_map()`` (see
    ``load_weights``) and, for tensors of the folder it deliberately leaves unread,
    ``UNUSED_CHECKPOINT_PREFIXES``. ``quantize``: given the module built on meta, the converters
    of ``load_weights`` (e.g. ``glm_image.quant.linear_quantizers("int8")``).
    """
    module = build_on_meta(factory)
    key_map = module.checkpoint_key_map() if hasattr(module, "checkpoint_key_map") else None
    unused = tuple(getattr(module, "UNUSED_CHECKPOINT_PREFIXES", ()))
    load_weights(
        module,
        folder,
        device=device,
        dtype=dtype,
        key_map=key_map,
        ignore_prefixes=unused,
        quantize=quantize(module) if quantize is not None else None,
    )
    return module


def _names(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(f"'{n}'" for n in names[:_MAX_LISTED])
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{len(names)} tensor(s): {shown}{more}"


def _alias_groups(module: torch.nn.Module) -> list[list[str]]:
    """State-dict keys grouped by the tensor they name (tied weights share one group)."""
    groups: dict[int, list[str]] = {}
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    persistent = set(module.state_dict(keep_vars=True))
    for name, tensor in named:
        if name in persistent:
            groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def load_weights(
    module: torch.nn.Module,
    folder: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    key_map: Mapping[str, str | Part | Fuse] | None = None,
    ignore_prefixes: tuple[str, ...] = (),
    quantize: Converters | None = None,
) -> LoadReport:
    """Load a component folder's safetensors into ``module`` (usually built on ``meta``), strictly.

    ``key_map`` maps a module key to the checkpoint name it comes from, a ``Part`` of one (a
    tensor-parallel shard), or a ``Fuse`` of several; unmapped keys are read under their own name.
    Checkpoint tensors under ``ignore_prefixes`` are deliberately unused (e.g. the ViT when only
    the text decoder is built). ``dtype`` casts floating-point tensors; integer tensors keep theirs.

    ``quantize`` maps the names of linear submodules to converters: each such linear's weight is
    checked as usual, read (on ``device``, in ``dtype``), passed with the linear to its converter,
    and the module returned replaces the linear; its bias, if any, is loaded as usual into the
    replacement's ``bias``. A linear whose weight is a ``Part`` of columns (a row-parallel shard)
    gets the whole weight and ``columns=(start, stop)``, to quantize it whole and keep its shard.
    The full-precision weight is dropped at once (see the module docstring).
    """
    start = time.perf_counter()
    index = WeightIndex.from_folder(folder)
    key_map = key_map or {}
    expected = module.state_dict(keep_vars=True)
    converted = _converted_keys(module, quantize or {})

    def sources(key: str) -> tuple[str, ...]:
        return tuple(_name(e) for e in _entries(key_map.get(key, key)))

    plan: dict[str, str] = {}  # module key -> the key of its group that the checkpoint provides
    missing: list[str] = []
    for group in _alias_groups(module):
        provided = [k for k in group if all(s in index.tensors for s in sources(k))]
        if provided:
            plan.update(dict.fromkeys(group, provided[0]))
        else:
            missing.append(" = ".join(group) if len(group) > 1 else group[0])

    used = {s for k in set(plan.values()) for s in sources(k)}
    ignored = tuple(n for n in index.tensors if n not in used and n.startswith(ignore_prefixes))
    unexpected = [n for n in index.tensors if n not in used and not n.startswith(ignore_prefixes)]

    wrong_shape: list[str] = []
    for key, src in plan.items():
        shape = _checkpoint_shape(key_map.get(src, src), index.tensors)
        if shape != tuple(expected[key].shape):
            shown = list(shape) if shape is not None else "a slice out of range"
            wrong_shape.append(f"'{key}': checkpoint {shown} vs module {list(expected[key].shape)}")

    if missing or unexpected or wrong_shape:
        parts = [f"{index.folder}: the checkpoint does not match {type(module).__name__}"]
        if missing:
            parts.append(f"missing {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {_names(unexpected)}")
        if wrong_shape:
            shown = wrong_shape[:_MAX_LISTED]
            parts.append(f"wrong shape ({len(wrong_shape)}): " + "; ".join(shown))
        raise WeightsMismatchError("\n  ".join(parts))

    sharing = Counter(plan.values())
    tied = [k for k in converted if plan[k] != k or sharing[k] > 1]
    if tied:
        raise WeightsMismatchError(f"{index.folder}: cannot quantize tied weights: {_names(tied)}")

    device = torch.device(device)
    state: dict[str, torch.Tensor] = {}
    loaded: dict[str, torch.Tensor] = {}
    replacements: dict[str, torch.nn.Module] = {}
    num_bytes = 0
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}

        def read(entry: str | Part) -> torch.Tensor:
            name = _name(entry)
            info = index.tensors[name]
            if info.file.name == "drawn_weights.json":  # drawn on the device (glm_image.synthetic.random)
                from .synthetic.random import draw_tensor

                tensor = draw_tensor(info, device)
                if isinstance(entry, Part):
                    tensor = tensor.narrow(entry.dim, entry.start, entry.stop - entry.start)
                cast = dtype if dtype is not None else tensor.dtype
                return tensor.to(dtype=cast)
            if info.file not in handles:
                try:
                    handles[info.file] = stack.enter_context(
                        safe_open(str(info.file), framework="pt", device="cpu")
                    )
                except Exception as e:  # the library's own errors are terse; name the file
                    raise CorruptCheckpointError(f"{info.file}: cannot be opened as safetensors ({e})") from e
            try:
                if isinstance(entry, Part):  # only the shard's bytes are read
                    where = [slice(None)] * len(info.shape)
                    where[entry.dim] = slice(entry.start, entry.stop)
                    tensor = handles[info.file].get_slice(name)[tuple(where)]
                else:
                    tensor = handles[info.file].get_tensor(name)
            except Exception as e:
                raise CorruptCheckpointError(f"{info.file}: cannot read tensor '{name}' ({e})") from e
            cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            return tensor.to(device=device, dtype=cast)

        def read_full(src: str) -> torch.Tensor:
            target = key_map.get(src, src)
            parts = [read(e) for e in _entries(target)]
            return torch.cat(parts, dim=target.dim) if isinstance(target, Fuse) else parts[0]

        for key, src in plan.items():
            if key in converted:  # read, convert, drop: one full-precision tensor at a time
                name = converted[key]
                target = key_map.get(src, src)
                if isinstance(target, Part) and target.dim in (1, -1):
                    # a row-parallel shard: quantized from the whole weight, then cut, so its
                    # per-row scales are the unsharded model's (see ``quant.linear``)
                    columns = (target.start, target.stop)
                    new = quantize[name](module.get_submodule(name), read(target.name), columns=columns)
                else:
                    new = quantize[name](module.get_submodule(name), read_full(src))
                replacements[name] = new
                num_bytes += sum(
                    t.numel() * t.element_size() for n, t in new.named_parameters() if n != "bias"
                )
                continue
            if src not in loaded:
                loaded[src] = read_full(src)
                num_bytes += loaded[src].numel() * loaded[src].element_size()
            state[key] = loaded[src]
        for name, new in replacements.items():
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent), attr, new)
            for tensor_name, tensor in new.state_dict(keep_vars=True).items():
                if tensor_name != "bias":
                    state[f"{name}.{tensor_name}"] = tensor
        module.load_state_dict(state, strict=True, assign=True)

    _retie(module, plan)
    meta_buffers = tuple(n for n, b in module.named_buffers() if b.is_meta)
    report = LoadReport(
        folder=index.folder,
        files=index.files,
        num_tensors=len(loaded) + len(replacements),
        num_bytes=num_bytes,
        seconds=time.perf_counter() - start,
        ignored=ignored,
        meta_buffers=meta_buffers,
    )
    log.info(
        "loaded %d tensors (%.1f MB) from %s in %.2fs",
        report.num_tensors,
        num_bytes / 1e6,
        index.folder,
        report.seconds,
    )
    return report


def _entries(target: str | Part | Fuse) -> tuple[str | Part, ...]:
    return target.sources if isinstance(target, Fuse) else (target,)


def _name(entry: str | Part) -> str:
    return entry.name if isinstance(entry, Part) else entry


def _checkpoint_shape(target: str | Part | Fuse, tensors: Mapping[str, TensorInfo]) -> tuple[int, ...] | None:
    """The shape ``target`` reads from the checkpoint; None when a ``Part`` lies outside its tensor."""
    shapes = []
    for entry in _entries(target):
        shape = list(tensors[_name(entry)].shape)
        if isinstance(entry, Part):
            if (
                not -len(shape) <= entry.dim < len(shape)
                or not 0 <= entry.start < entry.stop <= shape[entry.dim]
            ):
                return None
            shape[entry.dim] = entry.stop - entry.start
        shapes.append(shape)
    if not isinstance(target, Fuse):
        return tuple(shapes[0])
    shape, dim = list(shapes[0]), target.dim
    if all(len(s) == len(shape) for s in shapes) and -len(shape) <= dim < len(shape):
        shape[dim] = sum(s[dim] for s in shapes)
    return tuple(shape)


def _converted_keys(module: torch.nn.Module, quantize: Converters) -> dict[str, str]:
    """The weight key of each linear named in ``quantize`` -> that linear's name."""
    keys = {}
    for name in quantize:
        try:
            linear = module.get_submodule(name)
        except AttributeError:
            raise WeightsMismatchError(
                f"{type(module).__name__} has no module '{name}' to quantize"
            ) from None
        if not isinstance(linear, torch.nn.Linear):
            raise WeightsMismatchError(
                f"'{name}' is a {type(linear).__name__}; only nn.Linear weights are quantized"
            )
        keys[f"{name}.weight"] = name
    return keys


def _retie(module: torch.nn.Module, plan: Mapping[str, str]) -> None:
    """``assign=True`` gives every alias of a tied weight its own Parameter; make them one again."""
    for key, src in plan.items():
        if key == src:
            continue
        owner_name, _, attr = src.rpartition(".")
        alias_owner_name, _, alias_attr = key.rpartition(".")
        tensor = getattr(module.get_submodule(owner_name), attr)
        alias_owner = module.get_submodule(alias_owner_name)
        if isinstance(tensor, torch.nn.Parameter):
            setattr(alias_owner, alias_attr, tensor)
        else:
            alias_owner.register_buffer(alias_attr, tensor)
