"""WUDI and RegMean: drm_jax against FusionBench 0.2.33's loops, on the same CPU and the same inputs.

WUDI: drm_jax.math.wudi (compiled, vmapped over same-shaped weights, the Adam steps a traced count)
against FusionBench's `wudi_merging` (PyTorch, one matrix after another, autograd through the loss every
step). Both run Adam at learning rate 1e-5 (FusionBench's fixed value) from sum_t tau_t on every 2-D weight:
  * minilm (default): one all-MiniLM-L6-v2 layer, q, k, v, o (384 x 384), intermediate (1536 x 384),
    output (384 x 1536), K random task vectors per weight (entries N(0, 1e-3^2)), both timed in full;
  * --real: the main job's fine-tuned MiniLM encoders (benchmarks/real_deltas.py; K = 6 wanted, the
    default profile makes 4: the K used is printed), all 36 encoder weights, 400 steps;
  * --llama: one Llama-3.1-8B layer, q, o (4096 x 4096), k, v (1024 x 4096), gate, up (14336 x 4096),
    down (4096 x 14336), random task vectors, 400 steps; one weight at a time, since FusionBench's loop
    alone adds about 17 GB on gate_proj (K = 4; measured).
FusionBench's loop is too slow to run in full on the large cases (64 s for one MiniLM layer, K = 4, 50
steps, on a 2-core machine). There it is timed on a measured subset -- the first `--fb-layers` layers'
weights (real MiniLM), at two small step counts `--fb-steps` -- and extrapolated linearly: time(S) =
a + b S fitted through the two points (a: per-weight setup, b: per step), times (all weights / measured
weights), which is exact in the weights because every MiniLM layer has the same six shapes. The Llama
layer is measured in full in its weights, at `--llama-fb-steps` (1 and 3) and extrapolated in steps, on
both sides unless --ours-full. Every extrapolated number is marked so.

Agreement: on what both ran (the subset, at the larger measured step count), max |ours - FusionBench|,
and each side's distance from the same Adam run in float64 (drm_jax.math.wudi under jax.enable_x64, which
tests/core/test_learned.py checks against a float64 Adam loop written from the paper). What float32 Adam
allows: Adam divides each gradient entry by its running scale, so where an entry's gradient is near its
rounding error (the gradient is a difference, tau A - B, that cancels) each side moves by up to lr per
step in a direction set by rounding; the gradients are rounded differently here (Gram form) and there
(autograd of the product form). Equal results: drm_jax no further from float64 than FusionBench is
(at most 2x, plus 4 float32 ulps of max |tau|), and |ours - FusionBench| a small fraction of lr * steps,
the furthest Adam can move an entry.

RegMean (--regmean): drm_jax.math.regmean (batched solves, vmapped over same-shaped weights) against
FusionBench's `merging_with_regmean_weights` (explicit inverse per weight) on the same weights and the
same Gram matrices (random X^T X / rows, 512 rows of N(0, 1) per model and input size; the real
checkpoints' weights when present), ratio 0.95; both against a float64 numpy solve.

drm_jax is timed warm (its first call, which compiles one program per shape, is reported apart); the two
are interleaved and the best of `--repeats` kept (benchmarks/_common.py). Goal (issue 25): drm_jax at most
0.1 of FusionBench's time at equal results.

    python benchmarks/bench_learned.py                  # MiniLM layer, K = 4, 50 steps
    python benchmarks/bench_learned.py --real --regmean # the main job's checkpoints, 400 steps; RegMean
    python benchmarks/bench_learned.py --llama          # one Llama-3.1-8B-shaped layer, 400 steps
    python benchmarks/bench_learned.py --no-layer --llama --llama-shrink 16   # its code path, in seconds
    python benchmarks/bench_learned.py --real --llama --regmean --write   # all, to RESULTS_learned.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import os
import sys
import time
from typing import Callable

import jax
import numpy as np

from _common import REPO, interleaved_best, table, verdict, write_results
from drm_jax.math.regmean import regmean
from drm_jax.math.wudi import wudi
from real_deltas import MissingCheckpoints, linear_deltas
from real_deltas import load as load_real

sys.path.insert(0, str(REPO / "tests"))
from fusion_bench_files import FusionBenchUnavailable, load as load_fusion_bench  # noqa: E402

LEARNING_RATE = 1e-5  # FusionBench's loop has it fixed
REGMEAN_RATIO = 0.95  # FusionBench's CLIP config
GRAM_ROWS = 512
MINILM = {"attention.self.query": (384, 384), "attention.self.key": (384, 384), "attention.self.value": (384, 384),
          "attention.output.dense": (384, 384), "intermediate.dense": (1536, 384), "output.dense": (384, 1536)}
LLAMA_8B = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
            "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
            "mlp.down_proj": (4096, 14336)}
HEADER = ["weights", "K", "steps", "FusionBench loop (s)", "drm_jax warm (s)", "drm_jax first call, compiling (s)",
          "drm_jax / FusionBench", "max |drm_jax - FB| / (lr steps)", "drm_jax vs float64", "FB vs float64",
          "equal results"]


def random_task_vectors(shapes: dict[str, tuple[int, int]], k: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (1e-3 * rng.standard_normal((k, *shape), dtype=np.float32)) for name, shape in shapes.items()}


def float64_adam(task_vectors: dict[str, np.ndarray], steps: int) -> dict[str, np.ndarray]:
    """The same Adam run in float64 (drm_jax.math.wudi with 64-bit types enabled), one weight at a time."""
    with jax.enable_x64(True):
        run = jax.jit(wudi)
        return {n: np.asarray(run(jax.numpy.asarray(tv, jax.numpy.float64), steps, LEARNING_RATE))
                for n, tv in task_vectors.items()}


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[n].astype(np.float64) - b[n]).max()) for n in b)


# ------------------------------------------------------------------------------------ the two WUDI runners
class Ours:
    """drm_jax: one compiled vmapped program per distinct shape; the step count is traced (no recompile)."""

    def __init__(self, task_vectors: dict[str, np.ndarray]):
        self.merge = jax.jit(jax.vmap(wudi, in_axes=(0, None, None)))
        self.groups: dict[tuple, list[str]] = {}
        for name, tv in task_vectors.items():
            self.groups.setdefault(tv.shape, []).append(name)
        self.stacks = {shape: jax.device_put(np.stack([task_vectors[n] for n in names]))
                       for shape, names in self.groups.items()}
        self.compile_s = None

    def __call__(self, steps: int) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        merged = {shape: self.merge(stack, steps, LEARNING_RATE) for shape, stack in self.stacks.items()}
        out = {}
        for shape, names in self.groups.items():
            layers = np.asarray(merged[shape])  # waits for the result
            out.update({n: layers[i] for i, n in enumerate(names)})
        if self.compile_s is None:
            self.compile_s = time.perf_counter() - start
        return out


def theirs_runner(fb, task_vectors: dict[str, np.ndarray]):
    """FusionBench's wudi_merging on the same task vectors: steps -> {name: merged task vector}."""
    torch = fb.torch
    per_model = [{n: torch.from_numpy(np.ascontiguousarray(tv[t])) for n, tv in task_vectors.items()}
                 for t in range(next(iter(task_vectors.values())).shape[0])]

    def run(steps: int) -> dict[str, np.ndarray]:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its tqdm lines
            merged = fb.wudi_merging(per_model, accelerator="cpu", iter_num=steps)
        return {n: v.detach().numpy() for n, v in merged.items()}

    return run


def linear_fit(times: dict[int, float], steps: int) -> float:
    """time(steps) from a + b S through the two measured (S, time) points (b, a clipped at 0)."""
    (s1, t1), (s2, t2) = sorted(times.items())
    slope = max((t2 - t1) / (s2 - s1), 0.0)
    return max(t1 - slope * s1, 0.0) + slope * steps


def measured(fn, results: dict, key: str | None, steps: int) -> Callable:
    """A timed run of fn(steps); its output kept under `key` (None: dropped at once, to save memory)."""
    def run():
        out = fn(steps)
        if key is not None:
            results[key] = out
    return run


@dataclasses.dataclass
class Comparison:
    """One WUDI comparison: times (s), the agreement on what both ran and whether the results are equal."""

    label: str
    k: int
    steps: int
    t_fb: float
    t_ours: float
    compile_s: float
    diff: float  # max |ours - FusionBench|
    ours_err: float  # max |ours - float64 Adam|
    fb_err: float  # max |FusionBench - float64 Adam|
    move: float  # lr * steps compared: the furthest Adam can move an entry
    equal: bool
    fb_extrapolated: bool
    ours_extrapolated: bool
    notes: list[str]
    parts: list[Comparison] = dataclasses.field(default_factory=list)  # combined(): the rows summed

    @property
    def ratio(self) -> float:
        return self.t_ours / self.t_fb

    @property
    def goal(self) -> bool:
        return self.equal and self.ratio <= 0.1

    def rows(self) -> list[list[object]]:
        """Its table rows: the parts it sums, then itself."""
        return [row for part in self.parts for row in part.rows()] + [self.row()]

    def row(self) -> list[object]:
        def cell(t, extrapolated, digits):
            return f"{t:.1f} (extrapolated)" if extrapolated else f"{t:.{digits}f}"

        return [self.label, self.k, self.steps, cell(self.t_fb, self.fb_extrapolated, 2),
                cell(self.t_ours, self.ours_extrapolated, 3), f"{self.compile_s:.2f}", f"{self.ratio:.4f}",
                f"{self.diff / self.move:.1e}", f"{self.ours_err / self.move:.1e}",
                f"{self.fb_err / self.move:.1e}", "yes" if self.equal else "NO"]


def combined(label: str, parts: list[Comparison], note: str) -> Comparison:
    """Weights compared one part at a time, as one: times summed, differences their maximum; `note` says
    how (the parts' own notes are left out)."""
    return Comparison(label, parts[0].k, parts[0].steps, sum(p.t_fb for p in parts), sum(p.t_ours for p in parts),
                      sum(p.compile_s for p in parts), max(p.diff for p in parts),
                      max(p.ours_err for p in parts), max(p.fb_err for p in parts), parts[0].move,
                      all(p.equal for p in parts), any(p.fb_extrapolated for p in parts),
                      any(p.ours_extrapolated for p in parts), [note], parts)


def compare(label: str, task_vectors: dict[str, np.ndarray], steps: int, repeats: int, fb, *,
            subset: list[str] | None = None, fb_steps: tuple[int, int] | None = None,
            ours_full: bool = True) -> Comparison:
    """One comparison. subset / fb_steps: FusionBench (and, where not ours_full, drm_jax) timed on these
    weights at these two step counts and extrapolated."""
    k = next(iter(task_vectors.values())).shape[0]
    subset = subset or list(task_vectors)
    sub = {n: task_vectors[n] for n in subset}
    weight_factor = len(task_vectors) / len(sub)
    notes = []
    ours_all = Ours(task_vectors) if fb_steps is None or ours_full else None
    ours_sub = ours_all if ours_all is not None and len(sub) == len(task_vectors) else Ours(sub)
    theirs = theirs_runner(fb, sub)
    results: dict = {}
    if fb_steps is None:  # everything in full
        ours_all(steps)  # compile
        best = interleaved_best({"fb": measured(theirs, results, "fb", steps),
                                 "ours": measured(ours_all, results, "ours", steps)}, repeats)
        t_fb, t_ours, compare_steps = best["fb"], best["ours"], steps
        compile_s = ours_all.compile_s
        ours_out, fb_out = results["ours"], results["fb"]
    else:
        s1, s2 = fb_steps
        runners = {}
        for s in (s1, s2):  # only the longer runs' outputs are compared
            runners[f"fb{s}"] = measured(theirs, results, f"fb{s}" if s == s2 else None, s)
            if not ours_full:
                runners[f"ours{s}"] = measured(ours_sub, results, f"ours{s}" if s == s2 else None, s)
        ours_sub(s2)  # compile (the same shapes as the full run)
        best = interleaved_best(runners, repeats)
        t_fb = weight_factor * linear_fit({s1: best[f"fb{s1}"], s2: best[f"fb{s2}"]}, steps)
        where = f"{len(sub)} of {len(task_vectors)} weights" if len(sub) < len(task_vectors) else "all weights"
        notes.append(f"{label}: FusionBench measured on {where} at {s1} and {s2} steps "
                     f"({best[f'fb{s1}']:.2f} s, {best[f'fb{s2}']:.2f} s), extrapolated linearly to {steps} steps"
                     + (f" and x{weight_factor:g} in weights" if weight_factor != 1 else "") + f": {t_fb:.1f} s.")
        if ours_full:
            ours_all(steps)  # compile
            t_ours = interleaved_best({"ours": measured(ours_all, results, None, steps)}, repeats)["ours"]
            compile_s = ours_all.compile_s
        else:
            t_ours = weight_factor * linear_fit({s1: best[f"ours{s1}"], s2: best[f"ours{s2}"]}, steps)
            compile_s = ours_sub.compile_s
            notes.append(f"{label}: drm_jax measured the same way ({best[f'ours{s1}']:.2f} s, "
                         f"{best[f'ours{s2}']:.2f} s): {t_ours:.1f} s.")
        for side in ("fb", "ours"):
            if f"{side}{s2}" in best and best[f"{side}{s2}"] < best[f"{side}{s1}"]:
                notes.append(f"{label}: {'FusionBench' if side == 'fb' else 'drm_jax'} ran {s2} steps faster than "
                             f"{s1} (timing noise): its extrapolation is its {s1}-step time; rerun with --repeats 2 "
                             f"on a quiet machine.")
        compare_steps = s2
        fb_out = results[f"fb{s2}"]
        ours_out = results[f"ours{s2}"] if not ours_full else ours_sub(s2)
    del ours_all, ours_sub, results  # their device copies, before the float64 run
    exact = float64_adam({n: task_vectors[n] for n in fb_out}, compare_steps)
    diff, ours_err, fb_err = max_diff(ours_out, fb_out), max_diff(ours_out, exact), max_diff(fb_out, exact)
    scale = max(float(np.abs(v).max()) for v in fb_out.values())
    equal = ours_err <= 2 * fb_err + 4 * float(np.spacing(np.float32(scale)))
    if compare_steps != steps or len(fb_out) != len(task_vectors):
        notes.append(f"{label}: agreement on what both ran: {len(fb_out)} weights, {compare_steps} steps.")
    return Comparison(label, k, steps, t_fb, t_ours, compile_s, diff, ours_err, fb_err,
                      LEARNING_RATE * compare_steps, equal, fb_steps is not None,
                      fb_steps is not None and not ours_full, notes)


# ------------------------------------------------------------------------------------ RegMean agreement
def regmean_agreement(weights: dict[str, np.ndarray], fb, repeats: int) -> tuple[list[str], bool]:
    """weights: name -> (K, out, in) float32. Lines of a table and whether both agree to 1e-5 relative."""
    torch = fb.torch
    k = next(iter(weights.values())).shape[0]
    rng = np.random.default_rng(1)
    dims = sorted({w.shape[2] for w in weights.values()})
    grams = {}
    for d in dims:
        xs = rng.standard_normal((k, GRAM_ROWS, d), dtype=np.float32)
        grams[d] = np.einsum("kri,krj->kij", xs, xs) / np.float32(GRAM_ROWS)
    params = {f"{n}.weight": [torch.from_numpy(np.ascontiguousarray(w[t])) for t in range(k)] for n, w in weights.items()}
    fb_grams = [{n: torch.from_numpy(np.ascontiguousarray(grams[w.shape[2]][t])) for n, w in weights.items()}
                for t in range(k)]
    merge = jax.jit(jax.vmap(functools.partial(regmean, input_axis=1), in_axes=(0, 0, None)))
    groups: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        groups.setdefault(w.shape, []).append(name)
    stacks = {s: (jax.device_put(np.stack([weights[n] for n in names])),
                  jax.device_put(np.stack([grams[s[2]]] * len(names)))) for s, names in groups.items()}
    results: dict = {}

    def ours():
        out = {}
        for s, names in groups.items():
            merged = np.asarray(merge(*stacks[s], REGMEAN_RATIO))
            out.update({n: merged[i] for i, n in enumerate(names)})
        results["ours"] = out

    def theirs():
        merged = fb.merging_with_regmean_weights(params, fb_grams, REGMEAN_RATIO)
        results["fb"] = {n: merged[f"{n}.weight"].numpy() for n in weights}

    start = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - start
    best = interleaved_best({"fb": theirs, "ours": ours}, repeats)
    reference = {}
    for n, w in weights.items():  # float64: (sum_t G_t')^-1 sum_t G_t' W_t^T, transposed back
        g = grams[w.shape[2]].astype(np.float64)
        g = g * (REGMEAN_RATIO + (1 - REGMEAN_RATIO) * np.eye(g.shape[1]))
        rhs = np.einsum("kij,koj->io", g, w.astype(np.float64))
        reference[n] = np.linalg.solve(g.sum(0), rhs).T

    def rel(a, b):
        return max(float(np.abs(a[n] - b[n]).max()) for n in weights) / max(float(np.abs(b[n]).max()) for n in weights)

    agree = rel(results["ours"], results["fb"])
    lines = table(["weights", "K", "FusionBench (s)", "drm_jax warm (s)", "drm_jax first call (s)",
                   "drm_jax / FusionBench", "max diff / max |W|", "drm_jax vs float64", "FusionBench vs float64"],
                  [[f"{len(weights)} weights", k, f"{best['fb']:.3f}", f"{best['ours']:.3f}", f"{compile_s:.2f}",
                    f"{best['ours'] / best['fb']:.3f}", f"{agree:.1e}", f"{rel(results['ours'], reference):.1e}",
                    f"{rel(results['fb'], reference):.1e}"]], "lrrrrrrrr")
    return lines, agree <= 1e-5


# ------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=4, help="task vectors per weight, random cases (default 4)")
    parser.add_argument("--steps", type=int, default=50, help="Adam steps, random MiniLM layer (default 50)")
    parser.add_argument("--real", action="store_true", help="the main job's fine-tuned MiniLM encoders")
    parser.add_argument("--real-k", type=int, default=6, help="checkpoints wanted for --real (default 6)")
    parser.add_argument("--llama", action="store_true", help="one Llama-3.1-8B-shaped layer")
    parser.add_argument("--regmean", action="store_true", help="RegMean agreement with FusionBench")
    parser.add_argument("--big-steps", type=int, default=400, help="steps of --real and --llama (default 400)")
    parser.add_argument("--fb-steps", type=int, nargs=2, default=(5, 25), metavar=("S1", "S2"),
                        help="step counts FusionBench is measured at for --real (default 5 25)")
    parser.add_argument("--llama-fb-steps", type=int, nargs=2, default=(1, 3), metavar=("S1", "S2"),
                        help="the same for --llama (default 1 3: about 3 min per step of FusionBench's loop)")
    parser.add_argument("--fb-layers", type=int, default=1, help="MiniLM layers FusionBench runs for --real")
    parser.add_argument("--ours-full", action="store_true", help="--llama: time drm_jax at --big-steps in full")
    parser.add_argument("--llama-shrink", type=int, default=1, metavar="N",
                        help="--llama: every side divided by N (a quick check of the code path; default 1)")
    parser.add_argument("--no-layer", action="store_true", help="skip the random MiniLM layer")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="also write benchmarks/RESULTS_learned.md")
    args = parser.parse_args()
    try:
        fb = load_fusion_bench()
    except FusionBenchUnavailable as err:
        sys.exit(f"bench_learned: FusionBench's functions cannot be loaded ({err})")
    fb.torch.set_grad_enabled(True)
    load = os.getloadavg()
    comparisons, real = [], None
    if not args.no_layer:
        comparisons.append(compare("MiniLM layer, random (6 weights)", random_task_vectors(MINILM, args.k),
                                   args.steps, args.repeats, fb))
    notes = []
    if args.real or args.regmean:
        try:
            base, models, names = load_real(args.real_k)
            real = (linear_deltas(base, models), names)
        except MissingCheckpoints as err:
            notes.append(f"real checkpoints: {err}")
    if args.real and real is not None:
        deltas, names = real
        if len(names) < args.real_k:
            notes.append(f"real deltas: only {len(names)} fine-tuned checkpoints cached ({', '.join(names)}), "
                         f"so K = {len(names)}, not {args.real_k}.")
        subset = [n for n in deltas if any(n.startswith(f"encoder.layer.{i}.") for i in range(args.fb_layers))]
        comparisons.append(compare(f"MiniLM, real deltas ({len(deltas)} weights)", deltas, args.big_steps,
                                   args.repeats, fb, subset=subset, fb_steps=tuple(args.fb_steps)))
    if args.llama:
        # One weight at a time: FusionBench's loop holds K out x out products and their gradients (about
        # 17 GB on gate_proj, K = 4). So compared, the run peaks at 21.7 GB; the whole layer at once would
        # not fit in the 23 GB of the machine it was measured on.
        n = args.llama_shrink
        label = "Llama-3.1-8B layer, random (7 weights" + (f", every side / {n})" if n > 1 else ")")
        parts = []
        for i, (name, (rows_, cols)) in enumerate(LLAMA_8B.items()):
            parts.append(compare(f"{name} ({rows_ // n} x {cols // n})",
                                 random_task_vectors({name: (rows_ // n, cols // n)}, args.k, seed=i),
                                 args.big_steps, 1, fb, fb_steps=tuple(args.llama_fb_steps),
                                 ours_full=args.ours_full))
            print(" | ".join(map(str, parts[-1].row())), flush=True)
        s1, s2 = args.llama_fb_steps
        how = "drm_jax and FusionBench" if not args.ours_full else "FusionBench"
        comparisons.append(combined(label, parts, (
            f"{label}: each weight compared on its own (memory), {how} timed at {s1} and {s2} steps and "
            f"extrapolated linearly to {args.big_steps} steps; the row sums the weights' times, the rows "
            f"above it are the weights, run once each (minutes per run: timing noise is small); "
            f"agreement on what both ran (all weights, {s2} steps).")))
    rows = [row for c in comparisons for row in c.rows()]
    notes = [n for c in comparisons for n in c.notes] + notes
    goals = [c.goal for c in comparisons]
    lines = table(HEADER, rows, "lrrrrrrrrrl") if rows else []
    if rows:
        lines += ["", "Differences in units of lr * steps (the furthest Adam can move an entry); float64: the same "
                  "Adam run in float64. Equal results: drm_jax no further from float64 than FusionBench (2x, "
                  "plus 4 float32 ulps of max |tau|).", "",
                  f"Goal (drm_jax at most 0.1 of FusionBench's time at equal results): {verdict(all(goals))}."]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    if args.regmean:
        if real is not None:
            weights = {n: d + base[n][None] for n, d in real[0].items()}
            what = f"the real checkpoints' {len(weights)} encoder weights, K = {len(real[1])}"
        else:
            weights = {n: w + 1e-2 for n, w in random_task_vectors(MINILM, args.k).items()}
            what = "a random MiniLM layer"
        reg_lines, ok = regmean_agreement(weights, fb, args.repeats)
        lines += ["", f"RegMean on {what}, random Gram matrices ({GRAM_ROWS} rows per model), ratio "
                  f"{REGMEAN_RATIO}:", "", *reg_lines, "",
                  f"RegMean agreement with FusionBench to 1e-5 relative: {verdict(ok)}."]
    lines += ["", f"Load average at the start: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min) on {os.cpu_count()} cores."]
    print("\n".join(lines))
    if args.write:
        body = ["WUDI and RegMean, drm_jax against FusionBench 0.2.33's loops on the same CPU "
                "(benchmarks/bench_learned.py).", "", *lines]
        print(f"\nwrote {write_results('learned', 'WUDI and RegMean: drm_jax against FusionBench', body)}")


if __name__ == "__main__":
    main()
