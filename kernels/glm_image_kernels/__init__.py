"""Fused kernels for glm-image (Triton on CUDA, adapters for Ascend), each with a torch twin.

Imported lazily by ``glm_image.ops`` and only where the hardware is present; the engine runs on
the plain torch path without this package's optional dependencies.
"""

__all__: list[str] = []
