"""Runs mergekit 0.1.5's `mergekit-yaml` (its click entry point) on several configs in one subprocess, the
reference side of the tests that compare `drm-jax merge` with mergekit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Sequence

_DRIVER = """
import sys
from mergekit.scripts.run_yaml import main
args = sys.argv[1:]
for config, out in zip(args[::2], args[1::2]):
    main([config, out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--no-lazy-unpickle"],
         standalone_mode=False)
"""


def run_mergekit_yaml(runs: Sequence[tuple[Path, Path]], timeout: float = 900) -> None:
    """Each (config file, output directory) merged by mergekit, in order; AssertionError with mergekit's
    stderr tail when one fails."""
    args = [str(p) for pair in runs for p in pair]
    proc = subprocess.run([sys.executable, "-c", _DRIVER, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
