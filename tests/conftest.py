"""Test-wide setup: eight forced host devices, so multi-device code runs on a CPU-only machine, and
XLA's CPU backend at its lowest optimization level, so that the compile-bound suite compiles faster.

Must run before jax initialises its backends; pytest imports this file before any test module. A
pre-set XLA_FLAGS keeps its other flags but gets the device count added: without it every multi-device
test would have one device (tests/core/test_shard.py then fails, saying why, instead of skipping).
"""

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_flags = os.environ.get("XLA_FLAGS", "")
if DEVICE_COUNT_FLAG not in _flags:
    _flags = f"{_flags} {DEVICE_COUNT_FLAG}=8".strip()
# The suite is compile-bound (hundreds of small programs on tiny arrays): LLVM at -O0 halves XLA's CPU
# compile time (the whole suite 9 min 12 s -> 7 min 55 s on 2 cores) and changes no result a test checks.
# The benchmarks run outside pytest and never get it. A pre-set level is kept.
OPT_LEVEL_FLAG = "--xla_backend_optimization_level"
if OPT_LEVEL_FLAG not in _flags:
    _flags = f"{_flags} {OPT_LEVEL_FLAG}=0".strip()
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `drm-jax merge` keeps compiled programs on disk between runs; tests compile afresh, in no shared folder
os.environ.setdefault("DRM_JAX_CACHE_DIR", "off")

