"""The digits example end to end (small): MuDSC and ZipIt merge two different-seed models trained on
disjoint classes far better than plain averaging (MuDSC paper's ordering)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mudsc_digits.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("mudsc_digits_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matching_merges_beat_plain_averaging_on_digits():
    example = _load_example()
    rows = dict(example.run_seed(hidden=(64, 64), steps=300, seed=0))

    def task_mean(name):
        return np.mean([rows[name][task] for task in example.TASKS])

    # each parent only knows its own five digits
    assert rows["Model A alone"]["A (0-4)"] > 0.95 and rows["Model B alone"]["B (5-9)"] > 0.95
    baseline = task_mean("Weight averaging")
    for name in ("MuDSC-align (alpha=0.5)", "ZipIt", "MuDSC-zip (alpha=0.5)"):
        assert task_mean(name) > baseline + 0.15, (name, task_mean(name), baseline)
        assert rows[name]["joint"] > rows["Weight averaging"]["joint"] + 0.1
    assert task_mean("MuDSC-zip (alpha=0.5)") > task_mean("MuDSC-align (alpha=0.5)")
