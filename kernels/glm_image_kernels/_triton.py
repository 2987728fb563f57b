"""Triton, imported once and guarded: this package must import where Triton is not installed.

Without Triton, ``triton.jit`` here is a stand-in that keeps the kernel definitions importable
and ``tl.constexpr`` exists for their annotations; the entry points call ``require_triton``
before launching anything, so only a *call* needs Triton.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated (module import), so whether the
kernels run in the interpreter (CPU tensors) is fixed at import: ``interpreted`` reports it.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the package stays importable; calling a kernel raises require_triton's error
    HAVE_TRITON = False

    class _MissingLanguage:
        constexpr = object  # only evaluated as an annotation

    class _MissingTriton:
        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = _MissingTriton()
    tl = _MissingLanguage()

__all__ = ["HAVE_TRITON", "cdiv", "interpreted", "next_power_of_2", "require_triton", "tl", "triton"]

_INTERPRETED = HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"

MISSING = "Triton is not installed (pip install 'glm-image[cuda]', or triton for the CPU interpreter)"


def require_triton() -> None:
    if not HAVE_TRITON:
        raise ImportError(MISSING)


def interpreted() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1`` (they then take CPU tensors)."""
    return _INTERPRETED


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
