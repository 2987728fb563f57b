"""LoRA adapters for the AR and the DiT: read (PEFT, diffusers), merged or applied per request.

``formats``: the files, read without PEFT. ``apply``: where an adapter's updates land on our
(fused, possibly sharded, possibly quantized) linears; ``merge`` for a fixed adapter, ``LoraSet``
for adapters chosen per call or per batch row. ``spec``: the user's ``PATH[:SCALE]`` and
``name=PATH`` strings. ``stage``: what a stage call carries (``StageLora``) and applies wherever
the stage runs (``applied``); ``registry``: a pipeline's adapters, talking to its stages' handles.
"""

from .apply import LoraSet, Selection, fit, merge, narrowed
from .formats import Adapter, LoraError, ModuleLora, read_adapters
from .registry import LoraRegistry
from .spec import parse_lora, parse_named_lora
from .stage import StageLora, applied

__all__ = [
    "Adapter",
    "LoraError",
    "LoraRegistry",
    "LoraSet",
    "ModuleLora",
    "Selection",
    "StageLora",
    "applied",
    "fit",
    "merge",
    "narrowed",
    "parse_lora",
    "parse_named_lora",
    "read_adapters",
]
