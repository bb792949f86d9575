"""Test-wide setup: eight forced host devices, so multi-device code runs on a CPU-only machine.

Must run before jax initialises its backends; pytest imports this file before any test module. A
pre-set XLA_FLAGS keeps its other flags but gets the device count added: without it every multi-device
test would have one device (tests/core/test_shard.py then fails, saying why, instead of skipping).
"""

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_flags = os.environ.get("XLA_FLAGS", "")
if DEVICE_COUNT_FLAG not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} {DEVICE_COUNT_FLAG}=8".strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `drm-jax merge` keeps compiled programs on disk between runs; tests compile afresh, in no shared folder
os.environ.setdefault("DRM_JAX_CACHE_DIR", "off")

