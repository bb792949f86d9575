"""Dtype names of the checkpoint formats, mapped to numpy dtypes (bf16 and fp8 through `ml_dtypes`).

numpy has no bfloat16; `ml_dtypes` adds it (and the float8 types) as real numpy dtypes, which is what JAX,
tensorstore and orbax already return. Every reader hands out arrays of these dtypes, so bf16 stays bf16.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from drm_jax.numbers import is_floating  # re-exported: io reads it here

# safetensors header codes <-> numpy dtypes (https://github.com/huggingface/safetensors, format spec).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}

# Names numpy itself does not know but checkpoints write (flax msgpack, zarr, orbax metadata).
_EXTRA_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}


def dtype_from_name(name: str | bytes) -> np.dtype:
    """The numpy dtype for a dtype name such as "float32" or "bfloat16"; raises ValueError if unknown."""
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    if name in _EXTRA_DTYPES:
        return _EXTRA_DTYPES[name]
    try:
        dtype = np.dtype(name)
    except TypeError as err:
        raise ValueError(f"unknown dtype {name!r}") from err
    if dtype.hasobject or dtype.fields is not None:
        raise ValueError(f"unsupported dtype {name!r}")
    return dtype


def as_numpy_dtype(dtype) -> np.dtype:
    """A numpy dtype from anything numpy, ml_dtypes, JAX or tensorstore call a dtype."""
    numpy_dtype = getattr(dtype, "numpy_dtype", None)  # tensorstore.dtype
    if numpy_dtype is not None:
        return np.dtype(numpy_dtype)
    try:
        return np.dtype(dtype)
    except TypeError:
        return dtype_from_name(str(dtype))
