"""Peak memory of `drm-jax merge` (streaming) against loading every model at once.

Builds Llama-shaped checkpoints of about 330 MB each in float32 (hidden 1024, MLP 2816, 16 heads, 5
layers, vocabulary 8000; random weights, saved as Hugging Face safetensors with a LlamaConfig): a base and
five fine-tuned models (base + noise), six files in all. Then, each in a fresh process whose peak resident
set size the operating system reports (`/usr/bin/time -v`, else `getrusage(RUSAGE_CHILDREN)`):

  * streaming: `drm-jax merge CONFIG OUT --max-memory 1GB` with `ties` and with `drm`;
  * all at once: every checkpoint read into memory (safetensors.numpy.load_file), merged with the in-memory
    Python API `drm_jax.merge`, written with save_file: the usual way, and the DRM reference's way;
  * mergekit: `mergekit-yaml CONFIG OUT` (mergekit 0.1.5, CPU) on the same files and the same config, for
    the methods it has (linear, ties), with the output compared tensor by tensor to drm-jax merge's.

The streaming peak must stay below 1.2 GB (`--bound`). Goals against mergekit-yaml (issue 12): linear no
slower, ties at least 2x faster, peak memory below mergekit's for both. The figures go to
benchmarks/RESULTS_streaming.md.

    python benchmarks/bench_streaming.py                    # full run (about 2 GB of checkpoints in --workdir)
    python benchmarks/bench_streaming.py --methods linear ties --skip-all-at-once   # against mergekit only
    python benchmarks/bench_streaming.py --layers 1 --models 2 --methods ties   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from _common import table, verdict, write_results

REPO = Path(__file__).resolve().parents[1]
GB = 10**9
MIB = 2**20
MERGEKIT_METHODS = ("linear", "ties")
# ours / mergekit-yaml wall time at most (issue 12): linear no slower, ties at least 2x faster
TIME_GOALS = {"linear": 1.0, "ties": 0.5}


def llama_config(hidden: int, intermediate: int, heads: int, layers: int, vocab: int,
                 kv_heads: int | None = None) -> dict:
    """A LlamaConfig as a dict; `kv_heads` (default `heads`) < heads is grouped-query attention."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads or heads,
                         max_position_embeddings=256, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    return config.to_dict()


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int,
                 kv_dim: int | None = None) -> dict[str, tuple[int, ...]]:
    """Hugging Face Llama tensor names and (out, in) shapes; k and v project to `kv_dim` (default `hidden`)."""
    kv_dim = kv_dim or hidden
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            **{p + f"self_attn.{n}_proj.weight": (hidden, hidden) for n in "qo"},
            **{p + f"self_attn.{n}_proj.weight": (kv_dim, hidden) for n in "kv"},
            p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        })
    return shapes


def write_checkpoints(workdir: Path, args) -> list[Path]:
    """base + `args.models` fine-tuned checkpoints (base + low-rank-ish noise), skipped when present."""
    from safetensors.numpy import save_file

    config = llama_config(args.hidden, args.intermediate, args.heads, args.layers, args.vocab)
    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab)
    names = ["base"] + [f"task_{t}" for t in range(args.models)]
    dirs = [workdir / n for n in names]
    stamp = json.dumps({"config": config, "models": args.models})
    if all((d / "model.safetensors").is_file() for d in dirs) and (workdir / "stamp.json").is_file() \
            and (workdir / "stamp.json").read_text() == stamp:
        return dirs
    rng = np.random.default_rng(0)
    base = {}
    for name, shape in shapes.items():
        base[name] = (np.ones(shape, np.float32) if len(shape) == 1
                      else rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
    for t, directory in enumerate(dirs):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        if t == 0:
            save_file(base, str(directory / "model.safetensors"), metadata={"format": "pt"})
            continue
        task_rng = np.random.default_rng(100 + t)
        tuned = {n: (w + task_rng.standard_normal(w.shape, dtype=np.float32) * np.float32(0.002)).astype(np.float32)
                 for n, w in base.items()}
        save_file(tuned, str(directory / "model.safetensors"), metadata={"format": "pt"})
        del tuned
    (workdir / "stamp.json").write_text(stamp)
    return dirs


def merge_config(method: str, dirs: list[Path]) -> str:
    """mergekit's YAML schema, read by both drm-jax merge and mergekit-yaml; linear averages the fine-tuned
    models (no base, as mergekit's linear)."""
    models = "\n".join(f"  - model: {d}\n    parameters: {{weight: {1.0 / (len(dirs) - 1):.6f}"
                       + (", density: 0.3" if method == "ties" else "") + "}" for d in dirs[1:])
    params = "parameters: {drop_rate: 0.8}" if method == "drm" else "parameters: {normalize: true}"
    base = "" if method == "linear" else f"base_model: {dirs[0]}\n"
    return f"merge_method: {method}\n{base}models:\n{models}\n{params}\ndtype: float32\n"


def tensors_of(directory: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file of `directory` holding it."""
    from safetensors import safe_open

    where = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "np") as f:
            where.update({name: path for name in f.keys()})
    return where


def output_difference(ours: Path, theirs: Path, base: Path) -> str:
    """max over tensors of max|ours - theirs| / max|theirs - base|, one tensor at a time."""
    from safetensors import safe_open

    mine, other, first = tensors_of(ours), tensors_of(theirs), tensors_of(base)
    if set(mine) != set(other):
        return f"different tensor names ({len(set(mine) ^ set(other))})"
    worst = 0.0
    for name in sorted(mine):
        with safe_open(str(mine[name]), "np") as a, safe_open(str(other[name]), "np") as b, \
                safe_open(str(first[name]), "np") as c:
            x, y = a.get_tensor(name).astype(np.float64), b.get_tensor(name).astype(np.float64)
            scale = np.max(np.abs(y - c.get_tensor(name)))
        worst = max(worst, float(np.max(np.abs(x - y)) / (scale if scale > 0 else 1.0)))
    return f"{worst:.1e}"


ALL_AT_ONCE = textwrap.dedent("""
    import sys, json
    from safetensors.numpy import load_file, save_file
    import numpy as np, drm_jax
    method, out, dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
    base = load_file(dirs[0] + "/model.safetensors")
    models = [load_file(d + "/model.safetensors") for d in dirs[1:]]
    k = len(models)
    kwargs = {"drm": dict(drop_rate=0.8), "linear": dict(normalize=True)}.get(method, dict(density=0.3, normalize=True))
    merged = drm_jax.merge(base, models, method=method, coefficients=[1.0 / k] * k, **kwargs)
    save_file({n: np.asarray(v) for n, v in merged.items()}, out)
""")


def measure(command: list[str], env: dict, cwd: Path | None = None) -> tuple[float, float]:
    """(peak RSS in bytes, wall seconds) of `command` run in a fresh process, as the OS reports it.

    `cwd` (the work directory) keeps `python -m` from importing drm_jax from wherever this was started:
    the drm_jax measured is the one this interpreter imports (PYTHONPATH, else the installed one)."""
    start = time.perf_counter()
    if Path("/usr/bin/time").exists():
        result = subprocess.run(["/usr/bin/time", "-v", *command], env=env, capture_output=True, text=True, cwd=cwd)
        if result.returncode != 0:
            raise RuntimeError(f"{command} failed:\n{result.stderr[-3000:]}")
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
        return int(match.group(1)) * 1024, time.perf_counter() - start
    # Fallback: a wrapper process whose only child is the command.
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", wrapper, *command], env=env, capture_output=True, text=True,
                            check=True, cwd=cwd)
    return int(result.stdout.strip().splitlines()[-1]) * 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/drm_jax_bench_streaming"))
    parser.add_argument("--models", type=int, default=5, help="fine-tuned models merged (besides the base)")
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--methods", nargs="+", default=["linear", "ties", "drm"])
    parser.add_argument("--max-memory", default="1GB", help="drm-jax merge --max-memory")
    parser.add_argument("--bound", type=float, default=1.2, help="required streaming peak, GB")
    parser.add_argument("--skip-all-at-once", action="store_true")
    parser.add_argument("--skip-mergekit", action="store_true", help="no mergekit-yaml runs")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS_streaming.md")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints for another run")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dirs = write_checkpoints(args.workdir, args)
    sizes = [(d / "model.safetensors").stat().st_size for d in dirs]
    print(f"{len(dirs)} checkpoints of {sizes[0] / 1e6:.0f} MB ({sum(sizes) / 1e9:.2f} GB) "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1"}
    rows, versus = [], []
    for method in args.methods:
        config = args.workdir / f"{method}.yaml"
        config.write_text(merge_config(method, dirs))
        out = args.workdir / f"out_{method}"
        cmd = [sys.executable, "-m", "drm_jax.cli.main", "merge", str(config), str(out), "--force", "--quiet",
               "--max-memory", args.max_memory]
        peak, wall = measure(cmd, env, args.workdir)
        out_size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        rows.append((method, "streaming (drm-jax merge)", peak, wall))
        print(f"{method:5s} streaming   peak {peak / 1e9:.3f} GB  {wall:6.1f} s  output {out_size / 1e6:.0f} MB",
              flush=True)
        if method in MERGEKIT_METHODS and not args.skip_mergekit:
            mk_out = args.workdir / f"mergekit_{method}"
            shutil.rmtree(mk_out, ignore_errors=True)
            mk_peak, mk_wall = measure([shutil.which("mergekit-yaml") or "mergekit-yaml", str(config), str(mk_out),
                                        "--quiet", "--no-cuda", "--no-copy-tokenizer", "--no-write-model-card"], env,
                                       args.workdir)
            rows.append((method, "mergekit-yaml", mk_peak, mk_wall))
            diff = output_difference(out, mk_out, dirs[0])
            versus.append((method, wall, peak, mk_wall, mk_peak, diff))
            print(f"{method:5s} mergekit    peak {mk_peak / 1e9:.3f} GB  {mk_wall:6.1f} s  output difference {diff}",
                  flush=True)
            shutil.rmtree(mk_out, ignore_errors=True)
        if not args.skip_all_at_once:
            script = args.workdir / "all_at_once.py"
            script.write_text(ALL_AT_ONCE)
            peak, wall = measure([sys.executable, str(script), method, str(args.workdir / f"all_{method}.safetensors"),
                                  *map(str, dirs)], env, args.workdir)
            rows.append((method, "all at once (load_file + drm_jax.merge)", peak, wall))
            print(f"{method:5s} all at once peak {peak / 1e9:.3f} GB  {wall:6.1f} s", flush=True)
            (args.workdir / f"all_{method}.safetensors").unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)

    streaming_ok = all(peak < args.bound * GB for _, how, peak, _ in rows if how.startswith("streaming"))
    body = [
        f"{len(dirs)} Llama-shaped float32 checkpoints (a base and {args.models} fine-tuned models; hidden "
        f"{args.hidden}, MLP {args.intermediate}, {args.heads} heads, {args.layers} layers, vocabulary {args.vocab}) "
        f"of {sizes[0] / 1e6:.0f} MB each, {sum(sizes) / 1e9:.2f} GB in all. Each run is a fresh process; peak "
        f"resident set size as the operating system reports it (`/usr/bin/time -v`), CPU only "
        f"(`JAX_PLATFORMS=cpu`), `drm-jax merge --max-memory {args.max_memory}`. linear averages the fine-tuned "
        f"models (no base), ties uses density 0.3 and weights 1/K.",
        "",
        *table(["method", "how", "peak RSS", "wall time"],
               [(m, how, f"{peak / 1e9:.2f} GB ({peak / MIB:.0f} MiB)", f"{wall:.0f} s") for m, how, peak, wall in rows],
               "llrr"),
        "",
        f"Bound for streaming: {args.bound} GB: {verdict(streaming_ok)}.",
    ]
    goals_ok = True
    if versus:
        vs_rows, goal_lines = [], []
        for method, wall, peak, mk_wall, mk_peak, diff in versus:
            t_ok, m_ok = wall / mk_wall <= TIME_GOALS[method], peak < mk_peak
            goals_ok &= t_ok and m_ok
            vs_rows.append((method, f"{wall:.1f}", f"{mk_wall:.1f}", f"{wall / mk_wall:.2f}x", f"{peak / 1e9:.2f}",
                            f"{mk_peak / 1e9:.2f}", f"{peak / mk_peak:.2f}x", diff))
            goal_lines.append(f"- {method}: time at most {TIME_GOALS[method]}x mergekit-yaml's: "
                              f"{wall / mk_wall:.2f}x, {verdict(t_ok)}; peak memory below mergekit's: "
                              f"{peak / mk_peak:.2f}x, {verdict(m_ok)}.")
        body += ["", "## drm-jax merge against mergekit-yaml (same files, same config)", "",
                 "Ratios are drm-jax merge / mergekit-yaml (below 1: faster, smaller). Output difference: max over "
                 "tensors of max|ours - mergekit| / max|mergekit - base|.", "",
                 *table(["method", "drm-jax merge (s)", "mergekit-yaml (s)", "time ratio", "drm-jax peak (GB)",
                         "mergekit peak (GB)", "memory ratio", "output difference"], vs_rows, "lrrrrrrr"),
                 "", "Goals (issue 12):", *goal_lines]
    write_results("streaming", "Streaming merge: peak memory and time, against loading everything and mergekit-yaml",
                  body, path=args.results)
    print("\n".join(body))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    if not (streaming_ok and goals_ok):
        sys.exit(1)


if __name__ == "__main__":
    main()
