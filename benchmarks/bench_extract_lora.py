"""`drm-jax extract-lora` against `mergekit-extract-lora` (mergekit 0.1.5): time, peak memory, accuracy.

Builds a Llama-shaped base checkpoint and a fine-tuned one (safetensors, bfloat16 by default, with a
LlamaConfig; the defaults give about 1 GB per file: hidden 2048, MLP 5632, 32 heads with 4 key-value
heads, 9 layers, vocabulary 32000). The fine-tuned weights are the base plus a delta shaped like a real
fine-tuning delta: a decaying spectrum (rank-64 part with singular values ~ 1/j) plus small noise.
Then, each in a fresh process on the CPU (`JAX_PLATFORMS=cpu`, mergekit without CUDA), peak resident set
size from `/usr/bin/time -v` and wall time:

  * ours: `drm-jax extract-lora FT BASE OUT --max-rank R` (auto route: randomized where R + oversampling
    is at most a quarter of the matrix's short side, else dense);
  * mergekit: `mergekit-extract-lora --model FT --base-model BASE --out-path OUT --max-rank R`.

Accuracy: for every LoRA module, the error of each adapter against the delta, ||delta - B A||_F, and the
ratio ours / mergekit's (mergekit's is the exact truncated SVD, so the ratio is >= 1 up to rounding).
Goal (issue 26): at least 3x faster than mergekit-extract-lora at no more peak memory. The figures go to
benchmarks/RESULTS_extract_lora.md.

    python benchmarks/bench_extract_lora.py                       # about 1 GB per checkpoint
    python benchmarks/bench_extract_lora.py --hidden 256 --intermediate 688 --kv-heads 4 --layers 2 \
        --vocab 1000 --max-rank 16                                 # a small smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from _common import table, verdict, write_results
from bench_streaming import llama_config, llama_shapes, measure

REPO = Path(__file__).resolve().parents[1]
GB = 10**9
MIB = 2**20
SPEED_GOAL = 3.0  # mergekit time / ours at least (issue 26)
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def write_pair(workdir: Path, args) -> tuple[Path, Path]:
    """base/ and finetuned/ (skipped when present with the same settings)."""
    from safetensors.numpy import save_file

    heads, kv_heads = args.heads, args.kv_heads
    config = llama_config(args.hidden, args.intermediate, heads, args.layers, args.vocab, kv_heads)
    config["torch_dtype"] = args.dtype
    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab, args.hidden // heads * kv_heads)
    base_dir, tuned_dir = workdir / "base", workdir / "finetuned"
    stamp = json.dumps({"config": config, "dtype": args.dtype})
    if (workdir / "stamp.json").is_file() and (workdir / "stamp.json").read_text() == stamp:
        return base_dir, tuned_dir
    rng = np.random.default_rng(0)
    dtype = DTYPES[args.dtype]
    base, tuned = {}, {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            weight = np.ones(shape, np.float32)
            delta = rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-3)
        else:
            weight = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            k = min(64, *shape)
            left = rng.standard_normal((shape[0], k), dtype=np.float32) / np.float32(np.sqrt(shape[0]))
            right = rng.standard_normal((k, shape[1]), dtype=np.float32) / np.float32(np.sqrt(shape[1]))
            spectrum = (np.float32(0.05) / np.arange(1, k + 1, dtype=np.float32))[:, None]
            delta = left @ (spectrum * right) + rng.standard_normal(shape, dtype=np.float32) * np.float32(2e-5)
        base[name] = weight.astype(dtype)
        tuned[name] = (weight + delta).astype(dtype)
    for directory, tensors in ((base_dir, base), (tuned_dir, tuned)):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (workdir / "stamp.json").write_text(stamp)
    return base_dir, tuned_dir


def lora_errors(adapter: Path, base: Path, tuned: Path) -> dict[str, float]:
    """module -> ||delta - B A||_F / ||delta||_F for every LoRA module of `adapter` (PEFT scaling 1)."""
    from safetensors import safe_open

    errors = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), "np") as lora, \
            safe_open(str(base / "model.safetensors"), "np") as b, safe_open(str(tuned / "model.safetensors"), "np") as t:
        for key in lora.keys():
            if not key.endswith("lora_A.weight"):
                continue
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            a = lora.get_tensor(key).astype(np.float64)
            bb = lora.get_tensor(key.replace("lora_A", "lora_B")).astype(np.float64)
            name = f"{module}.weight"
            delta = t.get_tensor(name).astype(np.float64) - b.get_tensor(name).astype(np.float64)
            errors[module] = float(np.linalg.norm(delta - bb @ a) / np.linalg.norm(delta))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/drm_jax_bench_extract_lora"))
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--svd-route", default="auto", help="drm-jax extract-lora --svd-route")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS_extract_lora.md")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints for another run")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, tuned = write_pair(args.workdir, args)
    size = (tuned / "model.safetensors").stat().st_size
    print(f"two checkpoints of {size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s", flush=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    ours_out, theirs_out = args.workdir / "ours", args.workdir / "mergekit"
    for out in (ours_out, theirs_out):
        shutil.rmtree(out, ignore_errors=True)
    ours_peak, ours_wall = measure([sys.executable, "-m", "drm_jax.cli.main", "extract-lora", str(tuned), str(base),
                                    str(ours_out), "--max-rank", str(args.max_rank), "--svd-route", args.svd_route],
                                   env, args.workdir)
    print(f"drm-jax extract-lora   peak {ours_peak / 1e9:.3f} GB  {ours_wall:7.1f} s", flush=True)
    theirs_peak, theirs_wall = measure([shutil.which("mergekit-extract-lora") or "mergekit-extract-lora",
                                        "--model", str(tuned), "--base-model", str(base), "--out-path", str(theirs_out),
                                        "--max-rank", str(args.max_rank), "--no-cuda"], env, args.workdir)
    print(f"mergekit-extract-lora  peak {theirs_peak / 1e9:.3f} GB  {theirs_wall:7.1f} s", flush=True)
    ours_err, theirs_err = lora_errors(ours_out, base, tuned), lora_errors(theirs_out, base, tuned)
    if set(ours_err) != set(theirs_err):
        raise SystemExit(f"the adapters factor different modules: {sorted(set(ours_err) ^ set(theirs_err))[:5]}")
    ratios = [ours_err[m] / max(theirs_err[m], 1e-30) for m in ours_err]
    speedup, memory = theirs_wall / ours_wall, ours_peak / theirs_peak
    speed_ok, memory_ok = speedup >= SPEED_GOAL, memory <= 1.0
    body = [
        f"Two Llama-shaped {args.dtype} checkpoints (base and fine-tuned) of {size / 1e6:.0f} MB each: hidden "
        f"{args.hidden}, MLP {args.intermediate}, {args.heads} heads ({args.kv_heads} key-value heads), {args.layers} "
        f"layers, vocabulary {args.vocab}; the delta is a rank-64 part with singular values ~ 1/j plus noise. "
        f"`--max-rank {args.max_rank}`, `--svd-route {args.svd_route}`. Each run is a fresh process on the CPU; peak "
        f"resident set size from `/usr/bin/time -v`.",
        "",
        *table(["tool", "wall time", "peak RSS"],
               [("drm-jax extract-lora", f"{ours_wall:.1f} s", f"{ours_peak / 1e9:.2f} GB ({ours_peak / MIB:.0f} MiB)"),
                ("mergekit-extract-lora", f"{theirs_wall:.1f} s",
                 f"{theirs_peak / 1e9:.2f} GB ({theirs_peak / MIB:.0f} MiB)")], "lrr"),
        "",
        f"Relative error ||delta - B A||_F / ||delta||_F over the {len(ours_err)} LoRA modules: ours at most "
        f"{max(ours_err.values()):.3e}, mergekit's at most {max(theirs_err.values()):.3e}; ours / mergekit's per "
        f"module between {min(ratios):.6f} and {max(ratios):.6f}.",
        "",
        "Goals (issue 26):",
        f"- at least {SPEED_GOAL:.0f}x faster than mergekit-extract-lora: {speedup:.2f}x, {verdict(speed_ok)};",
        f"- no more peak memory: {memory:.2f}x mergekit's, {verdict(memory_ok)}.",
    ]
    write_results("extract_lora", "LoRA extraction: drm-jax extract-lora against mergekit-extract-lora", body,
                  path=args.results)
    print("\n".join(body))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
