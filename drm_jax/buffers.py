"""Host buffers that XLA's CPU client reads in place.

Handed a NumPy array whose data is 64-byte aligned, the CPU client uses that memory as the device buffer;
any other array it copies first, at a fraction of the speed of NumPy's own copy (NumPy's allocator only
guarantees 16 bytes). Tensors read from checkpoints land in aligned buffers (`drm_jax.io.base.read_exact`),
and the engine aligns NumPy inputs once before a program reads them (`drm_jax.engine.compiled.aligned`).
"""

from __future__ import annotations

import numpy as np

ALIGNMENT = 64


def aligned_empty(nbytes: int, alignment: int = ALIGNMENT) -> np.ndarray:
    """An uninitialized uint8 array of `nbytes` whose data starts at a multiple of `alignment`."""
    buffer = np.empty(nbytes + alignment, np.uint8)
    start = -buffer.ctypes.data % alignment
    return buffer[start:start + nbytes]


def is_aligned(x: np.ndarray, alignment: int = ALIGNMENT) -> bool:
    return x.ctypes.data % alignment == 0


__all__ = ["ALIGNMENT", "aligned_empty", "is_aligned"]
