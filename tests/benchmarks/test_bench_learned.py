"""benchmarks/bench_learned.py on tiny shapes: the extrapolation of FusionBench's time from a measured
subset, the agreement verdicts, and the RegMean line (skips without fusion-bench)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_learned  # noqa: E402
from fusion_bench_files import FusionBenchUnavailable, load  # noqa: E402


@pytest.fixture(scope="module")
def fusion_bench():
    try:
        fb = load()
    except FusionBenchUnavailable as err:
        pytest.skip(f"fusion-bench not importable: {err}")
    fb.torch.set_grad_enabled(True)
    return fb


def test_linear_fit_extrapolates_setup_plus_per_step_time():
    assert bench_learned.linear_fit({25: 5.5, 5: 1.5}, 400) == pytest.approx(0.5 + 0.2 * 400)
    assert bench_learned.linear_fit({5: 2.0, 25: 1.0}, 400) == pytest.approx(2.0)  # noise: no negative slope


def test_wudi_rows_full_and_extrapolated_agree_with_fusion_bench(fusion_bench):
    rng = np.random.default_rng(0)
    tvs = {name: 1e-3 * rng.standard_normal(shape).astype(np.float32)
           for name, shape in (("l0.a", (3, 8, 6)), ("l0.b", (3, 4, 10)), ("l1.a", (3, 8, 6)), ("l1.b", (3, 4, 10)))}
    full = bench_learned.compare("full", tvs, 12, 1, fusion_bench)
    row = full.row()
    assert row[:3] == ["full", 3, 12] and row[-1] == "yes" and full.equal and not full.notes
    subset = bench_learned.compare("subset", tvs, 400, 1, fusion_bench, subset=["l0.a", "l0.b"], fb_steps=(2, 6))
    row, notes = subset.row(), subset.notes
    assert row[-1] == "yes" and row[3].endswith("(extrapolated)") and not row[4].endswith("(extrapolated)")
    assert "2 of 4 weights at 2 and 6 steps" in notes[0] and "x2 in weights" in notes[0]
    assert any("agreement on what both ran: 2 weights, 6 steps" in n for n in notes)  # (and perhaps a noise note)
    both = bench_learned.compare("both", tvs, 400, 1, fusion_bench, fb_steps=(2, 6), ours_full=False)
    row = both.row()
    assert row[3].endswith("(extrapolated)") and row[4].endswith("(extrapolated)") and row[-1] == "yes"
    # Weights compared one part at a time (the Llama layer): times add up, the worst difference is kept.
    total = bench_learned.combined("layer", [subset, both], "how")
    assert total.t_fb == pytest.approx(subset.t_fb + both.t_fb)
    assert total.t_ours == pytest.approx(subset.t_ours + both.t_ours)
    assert total.ratio == pytest.approx(total.t_ours / total.t_fb)
    assert total.diff == max(subset.diff, both.diff) and total.equal
    row = total.row()
    assert row[0] == "layer" and row[3].endswith("(extrapolated)") and row[4].endswith("(extrapolated)")
    assert total.rows() == [subset.row(), both.row(), row] and total.notes == ["how"]
    assert not bench_learned.combined("layer", [subset, dataclasses.replace(both, equal=False)], "how").goal


def test_regmean_line_agrees_with_fusion_bench(fusion_bench):
    rng = np.random.default_rng(1)
    weights = {n: rng.standard_normal(shape).astype(np.float32) for n, shape in (("a", (3, 5, 7)), ("b", (3, 7, 5)))}
    lines, ok = bench_learned.regmean_agreement(weights, fusion_bench, 1)
    assert ok and lines[2].startswith("| 2 weights | 3 |")
