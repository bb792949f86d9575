"""benchmarks/gpu/run.sh --cpu-smoke: the GPU benchmark's code on tiny shapes on CPU, so that the script
cannot rot between lent GPU machines. One run (about 20 s of CPU time: three processes compile DRM), in
one test so that pytest-xdist never runs it twice; the checks read its results file."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drm_jax.methods import METHODS

REPO = Path(__file__).resolve().parents[2]


def run_smoke(out: Path) -> str:
    env = dict(os.environ)
    # one CPU device, as on a plain machine (the suite's conftest forces eight for the sharding tests)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--cpu-smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_cpu_smoke_run_writes_every_row(tmp_path):
    stdout = run_smoke(tmp_path / "results.json")
    res = json.loads((tmp_path / "results.json").read_text())
    check_drm(res, stdout)
    check_linear_ties_wudi(res, stdout)
    check_streaming_and_projection(res, stdout)


def check_drm(res: dict, stdout: str) -> None:
    assert res["mode"] == "cpu-smoke" and res["complete"] and res["k"] == 5
    rows = res["drm"]["rows"]
    for direction in ("horizontal", "vertical"):
        mine = [r for r in rows if r["direction"] == direction]
        assert mine and all("skipped" not in r for r in mine)
        assert sum(r["matrices"] for r in mine) == 7 * res["layers"]  # q, k, v, o, gate, up, down per layer
        assert all(r["drm_jax_s"] > 0 and r["torch_s"] > 0 and r["first_call_s"] > 0 for r in mine)
        (total,) = [t for t in res["drm"]["totals"] if t["direction"] == direction]
        assert total["complete"] and not total["error_missing"] and len(total["error_matrices"]) == 7
        # float32 against float64 on the same inputs: small, but not zero (a zero means no comparison ran)
        for who in ("drm_jax", "torch"):
            assert 0 < total[f"{who}_err_median"] <= total[f"{who}_err_max"] < 0.5
        assert total["speedup"] == pytest.approx(total["torch_s"] / total["drm_jax_s"])
    assert "| direction | shape | matrices | torch loop (s) | drm_jax (s)" in stdout


def check_linear_ties_wudi(res: dict, stdout: str) -> None:
    part = res["elementwise"]
    if importlib.util.find_spec("mergekit") is None:
        assert "mergekit" in part["skipped"]
    else:
        assert [r["method"] for r in part["rows"]] == ["linear", "ties"]
        assert all(r["drm_jax_s"] > 0 and r["mergekit_s"] > 0 for r in part["rows"])
        assert part["rows"][0]["max_rel_diff"] < 1e-2  # linear: the same average, rounded to bf16
    if "wudi" not in METHODS:
        assert "wudi" in res["wudi"]["skipped"] and "wudi: skipped" in stdout
    elif "rows" in res["wudi"]:
        assert res["wudi"]["rows"][0]["fusion_bench_s"] > 0
    else:  # drm_jax has the method; FusionBench is not importable on this machine
        assert "FusionBench" in res["wudi"]["skipped"] and "wudi: skipped" in stdout


def check_streaming_and_projection(res: dict, stdout: str) -> None:
    stream, proj = res["streaming"], res["projection"]
    assert stream["layers"] == 4 and stream["models"] == 5
    for method, files_read in (("linear", 5), ("drm", 6)):  # linear averages the models, DRM reads the base too
        run = stream["runs"][method]
        assert run["wall_s"] > 0 and run["written_bytes"] > 0
        assert run["read_bytes"] == files_read * stream["checkpoint_bytes"]
    # the projection's inputs are the measured figures
    assert proj["io_mb_per_s"] == stream["runs"]["linear"]["mb_per_s"]
    assert proj["drm_h_per_layer_s"] == pytest.approx(res["drm"]["totals"][0]["drm_jax_s"] / res["layers"])
    moved_s = proj["bytes_moved"] / (proj["io_mb_per_s"] * 1e6)
    assert proj["estimate_a_s"] == pytest.approx(32 * proj["drm_h_per_layer_s"] + moved_s)
    assert proj["projected_s"] == max(proj["estimate_a_s"], proj["estimate_b_s"])
    assert "Projected:" in stdout and len(res["goals"]) == 3
    assert all("not judged" in goal for goal in res["goals"])  # tiny CPU shapes never claim a goal
