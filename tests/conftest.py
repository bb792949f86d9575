"""Test-wide setup: eight forced host devices, so multi-device code runs on a CPU-only machine.

Must run before jax initialises its backends; pytest imports this file before any test module.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
