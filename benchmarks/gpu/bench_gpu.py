"""GPU figures in one call: drm_jax at Llama-3.1-8B shapes against the PyTorch references on the same GPU.

Run by benchmarks/gpu/run.sh (see benchmarks/gpu/README.md). In one process, on one accelerator:

  1. DRM-H and DRM-V, K models, on `--layers` Llama-3.1-8B-shaped layers (q/o 4096x4096, k/v 1024x4096,
     gate/up 14336x4096, down 4096x14336): bf16 models, a float32 zero base (so the output is the merged
     delta itself, not rounded to bf16), float32 compute (`precision="float32"`), through `drm_jax.merge`,
     warm (the first call, which compiles, is reported apart), against the reference algorithm as a
     PyTorch per-matrix loop on the same device (benchmarks/torch_drm.py: float32 torch.linalg.svd). One
     row per weight shape (drm_jax merges the stacked layers of that shape; the loop does the same matrices
     one by one), then the total. Errors: relative Frobenius error of each merged delta of layer 0 against
     the float64 NumPy reference DRM (tests/merge_reference.py) on the CPU, run in a thread while the device
     is timed; matrices whose reference did not finish within the time budget are named.
  2. linear and TIES through `drm_jax.merge` against mergekit's `merge_tensors` on the same device, where
     mergekit imports (else a line saying why not).
  3. WUDI against FusionBench's loop, when drm_jax has a `wudi` method (else a line saying so).
  4. A streamed `drm-jax merge` of `--stream-layers` full-width layers from safetensors files on this
     machine's disk (written here, flushed and dropped from the page cache first): the read/write rate of
     a linear merge (I/O bound) and the wall time of a DRM merge; then the projected time of five
     Llama-3.1-8B models merged by DRM, with every input of the projection shown.

Each part checks the remaining time budget (`--budget-s`) first and is skipped with a line saying so
rather than overrunning. Inputs are synthetic: per matrix, a full-rank Gaussian bulk plus a few
directions ~30x above it (every singular value is above DRM's 1% cut, the worst case for its time).

    bash benchmarks/gpu/run.sh                 # on the lent GPU machine: results.json + the table
    bash benchmarks/gpu/run.sh --cpu-smoke     # the same code on tiny shapes, on CPU (a test runs it)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1] / "tests")]

import drm_jax  # noqa: E402
from drm_jax.methods import METHODS  # noqa: E402
from _common import REPO, interleaved_best, machine, table, verdict  # noqa: E402
from bench_streaming import llama_config, llama_shapes, merge_config  # noqa: E402
from torch_drm import torch_drm  # noqa: E402
import merge_reference  # noqa: E402  (the float64 NumPy reference DRM the core tests check against)

# Llama-3.1-8B: hidden 4096, MLP 14336, 32 heads of which 8 key/value heads (k/v project to 1024),
# 32 layers, vocabulary 128256; bf16 on disk
LLAMA_8B = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=32, vocab=128256)
# one weight shape (16x16) for all: each distinct shape is one more compilation, and the smoke run checks
# the code, not the shapes
SMOKE = dict(hidden=16, intermediate=16, heads=2, kv_heads=2, layers=32, vocab=32)
SPEED_GOAL = 3.0  # DRM: torch loop time / drm_jax time at least this, with no larger median error
PROJECTION_GOAL_S = 600.0  # five 8B models merged by DRM in under 10 minutes
BF16_BYTES = 2
NOT_JUDGED = "not judged (a CPU smoke run on tiny shapes checks the code, not the goals)"


def kv_dim(dims: dict) -> int:
    return dims["hidden"] // dims["heads"] * dims["kv_heads"]


def layer_shapes(dims: dict, layers: int) -> dict[str, tuple[int, int]]:
    """The 2-D weights of `layers` decoder layers (what DRM merges), Hugging Face names -> (out, in)."""
    shapes = llama_shapes(dims["hidden"], dims["intermediate"], layers, dims["vocab"], kv_dim(dims))
    return {n: s for n, s in shapes.items() if ".layers." in n and len(s) == 2}


def joint_cost(shape: tuple[int, int], k: int, direction: str) -> float:
    """rows x cols x min(rows, cols) of the joint matrix: how a dense SVD's time grows."""
    rows, cols = (shape[0], k * shape[1]) if direction == "horizontal" else (k * shape[0], shape[1])
    return float(rows) * cols * min(rows, cols)


def synthetic_deltas(key, shape: tuple[int, int], k: int, spikes: int = 4, ratio: float = 30.0,
                     scale: float = 1e-3) -> jax.Array:
    """(K, out, in) bf16 deltas: a Gaussian bulk plus `spikes` shared output directions ~`ratio`x the bulk's
    largest singular value (of the side-by-side stack); generated on the default device."""
    n, m = shape
    kb, ku, kw = jax.random.split(key, 3)
    bulk = scale * jax.random.normal(kb, (k, n, m), jnp.float32)
    top = scale * (np.sqrt(n) + np.sqrt(k * m))
    u = jax.random.normal(ku, (n, spikes), jnp.float32) / np.sqrt(n)
    w = jax.random.normal(kw, (k, m, spikes), jnp.float32) / np.sqrt(k * m)
    return (bulk + ratio * top * jnp.einsum("ns,kms->knm", u, w)).astype(jnp.bfloat16)


def to_torch(x: jax.Array, device: torch.device) -> torch.Tensor:
    """The same buffer as a torch tensor where DLPack allows it (no copy), else a copy through the host."""
    try:
        return torch.from_dlpack(x).to(device)
    except Exception:  # noqa: BLE001 - any DLPack refusal falls back to the host copy
        host = np.asarray(x)
        if host.dtype.name == "bfloat16":
            return torch.from_numpy(host.view(np.uint16).copy()).view(torch.bfloat16).to(device)
        return torch.from_numpy(np.array(host)).to(device)


class Budget:
    """Wall-clock budget of the whole run; parts ask before starting work predicted to take `need` s."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, need: float, reserve: float = 0.0) -> bool:
        """Whether `need` seconds fit, keeping `reserve` seconds for the parts still to come."""
        return need + reserve <= self.left()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ReferenceThread(threading.Thread):
    """Float64 NumPy DRM (tests/merge_reference.py) of layer 0's matrices on the CPU, cheapest first, both
    directions; runs beside the device timings (NumPy's LAPACK releases the GIL) and stops between
    matrices once `stop` is set. Results: {(direction, name): merged delta (float64)}."""

    def __init__(self, deltas: dict[str, np.ndarray], k: int):
        super().__init__(daemon=True)
        self.deltas, self.k = deltas, k
        self.done: dict[tuple[str, str], np.ndarray] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        work = [(d, n) for n in self.deltas for d in ("horizontal", "vertical")]
        work.sort(key=lambda dn: joint_cost(self.deltas[dn[1]].shape[1:], self.k, dn[0]))
        for direction, name in work:
            if self.stop.is_set():
                return
            fn = merge_reference.drm_h if direction == "horizontal" else merge_reference.drm_v
            self.done[(direction, name)] = fn(self.deltas[name].astype(np.float64), drop_rate=0.8)


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))


def drm_part(args, names_by_shape, deltas, device, budget, results, layer0) -> dict:
    """DRM-H and DRM-V: drm_jax.merge per weight shape against the torch loop on the same matrices.

    (direction, shape) pairs run cheapest first, the two directions interleaved, so that a budget too short
    for the largest shapes still leaves both directions' smaller ones measured."""
    rows, outputs, rate = [], {}, {}
    models_t = {n: to_torch(d, device) for n, d in deltas.items()}  # (K, out, in) bf16, the same buffers
    torch_drm(torch.ones((2, 4, 4), device=device))  # the solver's start-up (cuSOLVER handles), not timed
    sync(device)
    pairs = sorted(((d, s) for d in ("horizontal", "vertical") for s in names_by_shape),
                   key=lambda ds: joint_cost(ds[1], args.k, ds[0]))
    for direction, shape in pairs:
        names = names_by_shape[shape]
        cost = joint_cost(shape, args.k, direction) * len(names)
        # 1 compiling call + `repeats` of drm_jax and one loop, predicted from the last pair's rates
        need = args.compile_s + cost * (rate.get("jax", 0) * (1 + args.repeats) + rate.get("torch", 0))
        row = dict(direction=direction, shape=list(shape), matrices=len(names),
                   names=[n.split(".", 3)[-1] for n in names if n in layer0])
        rows.append(row)
        if not budget.allows(need, args.reserve_s):
            row["skipped"] = f"predicted {need:.0f} s, {budget.left():.0f} s of the budget left"
            print(f"DRM {direction} {shape}: skipped ({row['skipped']})", flush=True)
            continue
        base = {n: jnp.zeros(shape, jnp.float32) for n in names}
        base_t = {n: torch.zeros(shape, dtype=torch.float32, device=device) for n in names}
        models = [{n: deltas[n][t] for n in names} for t in range(args.k)]
        last = {}  # each side's latest result: layer 0's go to the error columns

        def ours():
            last["drm_jax"] = jax.block_until_ready(drm_jax.merge(
                base, models, method="drm", direction=direction, drop_rate=0.8, precision="float32"))

        def theirs():
            last["torch"] = {n: torch_drm(models_t[n].float() - base_t[n], 0.8, vertical=direction == "vertical")
                             for n in names}
            sync(device)

        start = time.perf_counter()
        ours()
        first = time.perf_counter() - start
        repeats = args.repeats if budget.allows(cost * (rate.get("torch", 0) + rate.get("jax", 0)) * args.repeats,
                                                args.reserve_s) else 1
        times = interleaved_best({"drm_jax": ours, "torch": theirs}, repeats)
        rate = {"jax": times["drm_jax"] / cost, "torch": times["torch"] / cost}
        for n in names:
            if n in layer0:
                outputs[(direction, n)] = (np.asarray(last["drm_jax"][n]), last["torch"][n].cpu().numpy())
        del last, base, base_t, models
        row.update(first_call_s=first, drm_jax_s=times["drm_jax"], torch_s=times["torch"],
                   speedup=times["torch"] / times["drm_jax"], repeats=repeats)
        print(f"DRM {direction} {shape} x{len(names)}: drm_jax {times['drm_jax']:.3f} s (first call "
              f"{first:.1f} s), torch loop {times['torch']:.3f} s, {row['speedup']:.2f}x", flush=True)
    del models_t
    results["drm_outputs"] = outputs
    rows.sort(key=lambda r: (r["direction"], joint_cost(tuple(r["shape"]), args.k, r["direction"])))
    return {"rows": rows}


def drm_errors(part: dict, outputs: dict, reference: ReferenceThread, layer0: list[str], judge: bool) -> None:
    """Fill each direction's total row: times, speed-up, errors over the layer-0 matrices the reference did."""
    totals = []
    for direction in ("horizontal", "vertical"):
        rows = [r for r in part["rows"] if r["direction"] == direction]
        done = [r for r in rows if "skipped" not in r]
        total = dict(direction=direction, shape="all", matrices=sum(r["matrices"] for r in rows),
                     complete=len(done) == len(rows))
        if done:
            total.update(drm_jax_s=sum(r["drm_jax_s"] for r in done), torch_s=sum(r["torch_s"] for r in done),
                         first_call_s=sum(r["first_call_s"] for r in done))
            total["speedup"] = total["torch_s"] / total["drm_jax_s"]
        have = [n for n in layer0 if (direction, n) in reference.done and (direction, n) in outputs]
        total["error_matrices"] = [n.split(".", 3)[-1] for n in have]
        total["error_missing"] = [n.split(".", 3)[-1] for n in layer0 if n not in have]
        if have:
            e_ours = [rel_error(outputs[(direction, n)][0], reference.done[(direction, n)]) for n in have]
            e_torch = [rel_error(outputs[(direction, n)][1], reference.done[(direction, n)]) for n in have]
            total.update(drm_jax_err_median=float(np.median(e_ours)), drm_jax_err_max=max(e_ours),
                         torch_err_median=float(np.median(e_torch)), torch_err_max=max(e_torch))
        # speed over every shape; errors over the layer-0 matrices whose float64 reference finished in time
        # (the largest take minutes on the CPU), which the goal line names when they are not all
        decided = total["complete"] and bool(have)
        met = decided and total["speedup"] >= SPEED_GOAL and total["drm_jax_err_median"] <= total["torch_err_median"]
        coverage = "" if not total["error_missing"] else f" (errors on {len(have)} of {len(layer0)} matrices)"
        total["goal"] = (f"drm_jax >= {SPEED_GOAL:g}x faster than the torch loop with no larger median error: "
                         + (verdict(met) + coverage if decided
                            else "not decided (part of the run was skipped for the time budget)"))
        if not judge:
            total["goal"] = NOT_JUDGED
        totals.append(total)
    part["totals"] = totals


def elementwise_part(args, names, deltas, device, budget) -> dict:
    """linear and TIES: drm_jax.merge against mergekit's merge_tensors (one call per tensor), same device."""
    try:
        from mergekit.merge_methods.api import merge_tensors
    except Exception as err:  # noqa: BLE001 - any import failure means: skip, and say why
        return {"skipped": f"mergekit is not importable here ({type(err).__name__}: {err})"}
    key = jax.random.PRNGKey(7)
    base = {n: (0.02 * jax.random.normal(jax.random.fold_in(key, i), deltas[n].shape[1:])).astype(jnp.bfloat16)
            for i, n in enumerate(names)}
    models = [{n: (base[n].astype(jnp.float32) + deltas[n][t].astype(jnp.float32)).astype(jnp.bfloat16)
               for n in names} for t in range(args.k)]
    base_t = {n: to_torch(v, device) for n, v in base.items()}
    models_t = [{n: to_torch(v, device) for n, v in m.items()} for m in models]
    rows = []
    for method in ("linear", "ties"):
        if not budget.allows(0.0 if args.cpu_smoke else 30.0):
            rows.append(dict(method=method, skipped=f"{budget.left():.0f} s of the budget left"))
            continue
        kwargs = dict(density=0.2, trim_scope="tensor") if method == "ties" else {}
        params = {"weight": 1.0, **({"density": 0.2} if method == "ties" else {})}

        def ours():
            return jax.block_until_ready(drm_jax.merge(base, models, method=method, **kwargs))

        def theirs():
            with torch.no_grad():
                out = {n: merge_tensors([base_t[n], *(m[n] for m in models_t)] if method == "ties"
                                        else [m[n] for m in models_t], method, parameters=params,
                                        base_index=0 if method == "ties" else None, dtype=torch.float32,
                                        out_dtype=torch.bfloat16) for n in names}
            sync(device)
            return out

        got, want = ours(), theirs()  # warm-up (compiles ours); outputs for the agreement
        # max |ours - mergekit| / max |mergekit - base| over tensors, and the share of (bf16) entries that
        # differ at all: TIES keeps entries of equal magnitude at the trim threshold (common in bf16) by
        # position, which two implementations may order differently
        worst, differing = 0.0, 0
        for n in names:
            w = want[n].float().cpu().numpy().astype(np.float64)
            diff = np.abs(np.asarray(got[n], np.float64) - w)
            worst = max(worst, float(diff.max()) / max(float(np.max(np.abs(w - np.asarray(base[n], np.float64)))),
                                                       1e-30))
            differing += int(np.count_nonzero(diff))
        share = differing / sum(int(np.prod(got[n].shape)) for n in names)
        del got, want
        t = interleaved_best({"drm_jax": ours, "mergekit": theirs}, args.repeats)
        rows.append(dict(method=method, drm_jax_s=t["drm_jax"], mergekit_s=t["mergekit"],
                         speedup=t["mergekit"] / t["drm_jax"], max_rel_diff=worst, entries_differing=share))
        print(f"{method}: drm_jax {t['drm_jax']:.3f} s, mergekit {t['mergekit']:.3f} s, max rel. diff {worst:.1e}, "
              f"{share:.1e} of entries differ", flush=True)
    return {"rows": rows}


# the same steps on both sides (FusionBench's function defaults to 300, its config and drm_jax to 400)
WUDI_STEPS = 400


def wudi_part(args, names, deltas, device, budget) -> dict:
    """WUDI through drm_jax against FusionBench's wudi_merging loop, once drm_jax has the method."""
    if "wudi" not in METHODS:
        return {"skipped": "drm_jax has no `wudi` method yet (not in drm_jax.methods.METHODS)"}
    try:
        from fusion_bench.method.wudi.wudi import wudi_merging
    except Exception as err:  # noqa: BLE001
        return {"skipped": f"FusionBench is not importable here ({type(err).__name__}: {err})"}
    if not budget.allows(0.0 if args.cpu_smoke else 60.0):
        return {"skipped": f"{budget.left():.0f} s of the budget left"}
    base = {n: jnp.zeros(deltas[n].shape[1:], jnp.float32) for n in names}
    models = [{n: deltas[n][t] for n in names} for t in range(args.k)]
    vectors = [{n: to_torch(deltas[n][t], device).float() for n in names} for t in range(args.k)]

    def ours():
        return jax.block_until_ready(drm_jax.merge(base, models, method="wudi", iter_num=WUDI_STEPS))

    def theirs():
        out = wudi_merging(vectors, accelerator=device, iter_num=WUDI_STEPS)
        sync(device)
        return out

    ours()
    t = interleaved_best({"drm_jax": ours, "fusion_bench": theirs}, 1)
    return {"rows": [dict(method="wudi", drm_jax_s=t["drm_jax"], fusion_bench_s=t["fusion_bench"],
                          speedup=t["fusion_bench"] / t["drm_jax"])]}


def drop_from_page_cache(path: Path) -> None:
    """Flush `path` to disk and drop its pages from the page cache, so that the next read is the disk's."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_checkpoint(directory: Path, tensors: dict[str, np.ndarray], config: dict) -> int:
    """config.json + model.safetensors, flushed and dropped from the page cache; returns the file's size."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    path = directory / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    drop_from_page_cache(path)
    return path.stat().st_size


def streaming_part(args, dims, budget, device_kind: str, drm_per_layer_s: float | None) -> dict:
    """Write base + K Llama-shaped checkpoints of `--stream-layers` full-width layers, then time a streamed
    `drm-jax merge` with linear (I/O bound: the read/write rate) and with DRM (`drm_per_layer_s`, the
    in-memory DRM-H time per layer, predicts its time for the budget; None: 60 s per layer)."""
    if not budget.allows(0.0 if args.cpu_smoke else 60.0):
        return {"skipped": f"{budget.left():.0f} s of the budget left"}
    workdir = Path(tempfile.mkdtemp(prefix="drm_jax_gpu_stream_", dir=args.workdir))
    try:
        return streamed_runs(args, dims, budget, device_kind, drm_per_layer_s, workdir)
    finally:
        subprocess.run(["rm", "-rf", str(workdir)])


def streamed_runs(args, dims, budget, device_kind, drm_per_layer_s, workdir: Path) -> dict:
    layers = args.stream_layers
    shapes = llama_shapes(dims["hidden"], dims["intermediate"], layers, args.stream_vocab, kv_dim(dims))
    config = llama_config(dims["hidden"], dims["intermediate"], dims["heads"], layers, args.stream_vocab,
                          dims["kv_heads"])
    dirs = [workdir / "base"] + [workdir / f"task_{t}" for t in range(args.k)]
    key = jax.random.PRNGKey(11)
    start, written = time.perf_counter(), 0
    for t, directory in enumerate(dirs):
        tensors = {}
        for i, (name, shape) in enumerate(shapes.items()):
            k = jax.random.fold_in(jax.random.fold_in(key, t), i)
            w = jnp.ones(shape) if len(shape) == 1 else 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape)
            if t and len(shape) == 2:
                w = w + 0.002 * jax.random.normal(k, shape)
            tensors[name] = np.asarray(w.astype(jnp.bfloat16))
        written += write_checkpoint(directory, tensors, config)
        del tensors
    write_s = time.perf_counter() - start
    size = written // len(dirs)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    runs = {}
    for method in ("linear", "drm"):
        # the DRM run: one compilation, the linear run's I/O and the layers' DRM time
        need = 40.0 if method == "linear" else (args.compile_s + runs["linear"].get("wall_s", 0.0)
                                                  + layers * (drm_per_layer_s or 60.0))
        if not budget.allows(0.0 if args.cpu_smoke else need):
            runs[method] = {"skipped": f"{budget.left():.0f} s of the budget left"}
            continue
        cfg = workdir / f"{method}.yaml"
        cfg.write_text(merge_config(method, dirs) + "out_dtype: bfloat16\n")
        out = workdir / f"out_{method}"
        for d in dirs:  # the previous run's reads are in the page cache
            drop_from_page_cache(d / "model.safetensors")
        cmd = [sys.executable, "-m", "drm_jax.cli.main", "merge", str(cfg), str(out), "--force", "--quiet",
               "--device", device_kind, "--max-memory", args.max_memory]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            runs[method] = {"skipped": f"drm-jax merge failed: {proc.stderr.strip()[-500:]}"}
            continue
        read = size * (len(dirs) if "base_model:" in cfg.read_text() else args.k)  # linear reads no base
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        runs[method] = dict(wall_s=wall, read_bytes=read, written_bytes=out_bytes,
                            mb_per_s=(read + out_bytes) / wall / 1e6)
        print(f"streamed {method}, {layers} layers: {wall:.1f} s, {runs[method]['mb_per_s']:.4g} MB/s read+written",
              flush=True)
        subprocess.run(["rm", "-rf", str(out)])
    return dict(layers=layers, vocab=args.stream_vocab, models=args.k, checkpoint_bytes=size,
                write_s=write_s, write_mb_per_s=written / write_s / 1e6, max_memory=args.max_memory, runs=runs)


def model_bytes(dims: dict) -> int:
    shapes = llama_shapes(dims["hidden"], dims["intermediate"], dims["layers"], dims["vocab"], kv_dim(dims))
    return BF16_BYTES * sum(int(np.prod(s)) for s in shapes.values())


def projection(dims: dict, drm: dict, stream: dict, layers_timed: int, k: int, judge: bool) -> dict:
    """Five (K) full models merged by DRM through `drm-jax merge`: two estimates, the larger one judged.

    a) layers x the in-memory DRM-H time per layer + bytes moved / the streamed linear merge's rate;
    b) bytes moved / the end-to-end rate of the streamed DRM merge (compute, I/O and start-up included).
    """
    total = next(t for t in drm["totals"] if t["direction"] == "horizontal")
    runs = stream.get("runs", {})
    if not total["complete"] or "mb_per_s" not in runs.get("linear", {}):
        return {"skipped": "a part it needs was skipped (see above)"}
    one = model_bytes(dims)
    moved = (k + 1) * one + one  # base + K models read, one model written
    per_layer = total["drm_jax_s"] / layers_timed
    a = dims["layers"] * per_layer + moved / (runs["linear"]["mb_per_s"] * 1e6)
    drm_rate = runs.get("drm", {}).get("mb_per_s")
    b = None if drm_rate is None else moved / (drm_rate * 1e6)
    worst = max(a, b or 0.0)
    return dict(layers=dims["layers"], model_bytes=one, bytes_moved=moved, drm_h_per_layer_s=per_layer,
                io_mb_per_s=runs["linear"]["mb_per_s"], drm_stream_mb_per_s=drm_rate,
                estimate_a_s=a, estimate_b_s=b, projected_s=worst,
                goal=(f"under {PROJECTION_GOAL_S / 60:g} min: {verdict(worst < PROJECTION_GOAL_S)}" if judge
                      else NOT_JUDGED)
                + ("" if b is not None else " (estimate a only: the streamed DRM run was skipped)"))


def fmt(x, spec=".3f", missing="-"):
    return missing if x is None else format(x, spec)


def report(res: dict) -> list[str]:
    """The Markdown tables of a results dict."""
    lines = [f"Device: {res['device']}; mode: {res['mode']}; K = {res['k']}; {res['layers']} layers; "
             f"wall {res['wall_s']:.0f} s.", "",
             "DRM (drop rate 0.8, rank cut 1%, precision float32), warm best-of times; errors on layer 0 "
             "against the float64 NumPy reference (median / max over matrices):", ""]
    drm = res["drm"]
    rows = []
    for r in drm["rows"] + drm["totals"]:
        shape = "all" if r["shape"] == "all" else "x".join(map(str, r["shape"]))
        err = (lambda who: f"{r[who + '_err_median']:.2e} / {r[who + '_err_max']:.2e}"
               if who + "_err_median" in r else "")
        rows.append([r["direction"], shape, r["matrices"], fmt(r.get("torch_s")), fmt(r.get("drm_jax_s")),
                     fmt(r.get("first_call_s"), ".1f"), fmt(r.get("speedup"), ".2f"), err("torch"),
                     err("drm_jax"), r.get("skipped", r.get("goal", ""))])
    lines += table(["direction", "shape", "matrices", "torch loop (s)", "drm_jax (s)", "drm_jax first call (s)",
                    "speed-up", "torch err", "drm_jax err", "note / goal"], rows, "llrrrrrrrl")
    for t in drm["totals"]:
        if t["error_missing"]:
            lines.append(f"- {t['direction']}: no error for {', '.join(t['error_missing'])} (shape skipped, or "
                         f"its float64 reference not done within the budget)")
    lines.append("")
    for part, other in (("elementwise", "mergekit"), ("wudi", "fusion_bench")):
        p = res[part]
        if "skipped" in p:
            lines += [f"{part}: skipped: {p['skipped']}", ""]
            continue
        lines += table(["method", "drm_jax (s)", f"{other} (s)", "speed-up", "max rel. diff", "entries differing"],
                       [[r["method"], fmt(r.get("drm_jax_s")), fmt(r.get(f"{other}_s")), fmt(r.get("speedup"), ".2f"),
                         fmt(r.get("max_rel_diff"), ".1e", r.get("skipped", "")), fmt(r.get("entries_differing"), ".1e")]
                        for r in p["rows"]]) + [""]
    s = res["streaming"]
    if "skipped" in s:
        lines += [f"streamed drm-jax merge: skipped: {s['skipped']}", ""]
    else:
        lines += [f"Streamed `drm-jax merge` of {s['layers']} full-width layers, base + {s['models']} models of "
                  f"{s['checkpoint_bytes'] / 1e6:.4g} MB (bf16; written at {s['write_mb_per_s']:.4g} MB/s, fsync "
                  f"included, then dropped from the page cache), --max-memory {s['max_memory']}:", "",
                  *table(["method", "wall (s)", "read + written (MB/s)"],
                         [[m, f"{r['wall_s']:.1f}", f"{r['mb_per_s']:.4g}"] if "skipped" not in r
                          else [m, "", f"skipped: {r['skipped']}"] for m, r in s["runs"].items()]), ""]
    p = res["projection"]
    if "skipped" in p:
        lines += [f"projection: skipped: {p['skipped']}"]
    else:
        model = "tiny Llama-shaped (smoke)" if res["mode"] == "cpu-smoke" else "Llama-3.1-8B"
        lines += [f"Projected: {res['k']} {model} models ({p['model_bytes'] / 1e9:.4g} GB each) merged by "
                  f"DRM-H through `drm-jax merge`: {p['bytes_moved'] / 1e9:.4g} GB read and written.",
                  f"- a) {p['layers']} layers x {p['drm_h_per_layer_s']:.2f} s per layer + "
                  f"{p['bytes_moved'] / 1e9:.4g} GB / {p['io_mb_per_s']:.4g} MB/s = {p['estimate_a_s']:.0f} s",
                  f"- b) {p['bytes_moved'] / 1e9:.4g} GB / {p['drm_stream_mb_per_s']:.4g} MB/s (the streamed DRM "
                  f"run's rate) = {p['estimate_b_s']:.0f} s" if p["estimate_b_s"] is not None
                  else "- b) not measured (the streamed DRM run was skipped)",
                  f"- goal (the larger, {p['projected_s'] / 60:.1f} min): {p['goal']}"]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the code, not speed")
    parser.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/gpu/results.json; "
                        "with --cpu-smoke a temporary folder)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2, help="Llama-3.1-8B layers for the in-memory parts")
    parser.add_argument("--stream-layers", type=int, default=4)
    parser.add_argument("--stream-vocab", type=int, default=1024, help="vocabulary of the streamed checkpoints")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=400.0, help="wall-clock budget of the whole run")
    parser.add_argument("--reserve-s", type=float, default=150.0,
                        help="seconds of the budget the DRM part leaves to the parts after it")
    parser.add_argument("--compile-s", type=float, default=20.0,
                        help="allowance for one DRM compilation when predicting a shape's time")
    parser.add_argument("--max-memory", default="16GB", help="drm-jax merge --max-memory of the streamed runs")
    parser.add_argument("--workdir", default=None, help="where the streamed checkpoints go (default: TMPDIR)")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    start = time.perf_counter()
    dims = SMOKE if args.cpu_smoke else LLAMA_8B
    if args.cpu_smoke:
        args.stream_vocab = min(args.stream_vocab, SMOKE["vocab"])
        args.reserve_s = args.compile_s = 0.0
        device, device_kind = torch.device("cpu"), "cpu"
        out = args.out or Path(tempfile.gettempdir()) / "drm_jax_gpu_smoke" / "results.json"
    else:
        if jax.default_backend() != "gpu" or not torch.cuda.is_available():
            print(f"no GPU: jax backend {jax.default_backend()}, torch CUDA {torch.cuda.is_available()} "
                  f"(use --cpu-smoke to check the script on CPU)", file=sys.stderr)
            return 2
        device, device_kind = torch.device("cuda"), "gpu"
        out = args.out or HERE / "results.json"
    device_name = jax.devices()[0].device_kind + (f" / torch: {torch.cuda.get_device_name()}"
                                                  if device.type == "cuda" else "")
    print(f"{device_name}; jax {jax.__version__}, torch {torch.__version__}", flush=True)

    res = dict(mode="cpu-smoke" if args.cpu_smoke else "gpu", device=device_name, machine=machine(),
               command=" ".join(["bash benchmarks/gpu/run.sh", *(argv if argv is not None else sys.argv[1:])]),
               k=args.k, layers=args.layers, dims=dims, budget_s=args.budget_s, complete=False)

    def save():  # after every part, so that a run stopped from outside still leaves what it measured
        res["wall_s"] = time.perf_counter() - start
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str))
        tmp.replace(out)

    shapes = layer_shapes(dims, args.layers)
    names = list(shapes)
    key = jax.random.PRNGKey(0)
    deltas = {n: synthetic_deltas(jax.random.fold_in(key, i), s, args.k) for i, (n, s) in enumerate(shapes.items())}
    layer0 = [n for n in names if n.startswith("model.layers.0.")]
    reference = ReferenceThread({n: np.asarray(deltas[n]) for n in layer0}, args.k)
    reference.start()
    by_shape: dict[tuple[int, int], list[str]] = {}
    for n, s in shapes.items():
        by_shape.setdefault(s, []).append(n)
    scratch: dict = {}
    res["drm"] = drm_part(args, by_shape, deltas, device, budget, scratch, layer0)
    save()
    args.reserve_s = 0.0
    res["elementwise"] = elementwise_part(args, names, deltas, device, budget)
    res["wudi"] = wudi_part(args, names, deltas, device, budget)
    save()
    del deltas
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the streamed merge's own process needs the device memory
    h_rows = [r for r in res["drm"]["rows"] if r["direction"] == "horizontal"]
    per_layer = (None if any("skipped" in r for r in h_rows)
                 else sum(r["drm_jax_s"] for r in h_rows) / args.layers)
    res["streaming"] = streaming_part(args, dims, budget, device_kind, per_layer)
    reference.join(timeout=max(budget.left(), 1.0))
    reference.stop.set()
    drm_errors(res["drm"], scratch["drm_outputs"], reference, layer0, judge=not args.cpu_smoke)
    res["projection"] = projection(dims, res["drm"], res["streaming"], args.layers, args.k, judge=not args.cpu_smoke)
    res["goals"] = [t["goal"] for t in res["drm"]["totals"]] + [
        "five Llama-3.1-8B models by DRM " + res["projection"].get("goal", "not projected")]
    res["complete"] = True
    save()
    print("\n" + "\n".join(report(res)))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
