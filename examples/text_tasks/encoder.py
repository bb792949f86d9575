"""Tokenising, batching by length, pooled features, frozen linear heads, full and LoRA fine-tuning.

Parameters are Flax trees (drm_jax.models.bert). Full fine-tuning trains every encoder weight, the
token-embedding table included; only the pooler, which mean pooling never reads, is kept frozen (it would
get no gradient, only weight decay). LoRA fine-tuning trains low-rank factors of the encoder's 36 linear
kernels only (PEFT's LoRA: W + (alpha / r) B A, A (r, in), B (out, r) starting at zero), saved as PEFT
adapter directories.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from tqdm.auto import tqdm

from drm_jax.models import BertConfig, BertModel, mean_pool

FROZEN_PREFIXES = (("pooler",),)
LENGTH_BUCKET = 16  # pad each batch to a multiple of this: few compiled shapes, little padding


# ----------------------------------------------------------------------------------------- tokens
class Tokenizer:
    """The model's WordPiece tokenizer (tokenizer.json), truncating to max_len tokens."""

    def __init__(self, model_dir: Path, max_len: int):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_len)
        self.max_len = max_len

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(list(texts))]


def pad_batch(seqs: Sequence[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id arrays to the next multiple of LENGTH_BUCKET -> (ids (b, s), mask (b, s))."""
    longest = max(len(s) for s in seqs)
    width = min(max_len, LENGTH_BUCKET * math.ceil(longest / LENGTH_BUCKET)) if max_len else longest
    width = max(width, longest)
    ids = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def length_batches(seqs: Sequence[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """Index batches of similar length (sorted), so short texts are not padded to long ones."""
    order = np.argsort([len(s) for s in seqs], kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ----------------------------------------------------------------------------------------- params
def split_frozen(params: Mapping) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; frozen = the pooler."""
    flat = traverse_util.flatten_dict(params)
    frozen = {k: v for k, v in flat.items() if any(k[: len(p)] == p for p in FROZEN_PREFIXES)}
    trainable = {k: v for k, v in flat.items() if k not in frozen}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def join_params(trainable: Mapping, frozen: Mapping) -> dict:
    flat = {**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)}
    return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass
class Encoder:
    """The BERT encoder with mean pooling, jitted once per padded batch shape."""

    config: BertConfig
    max_len: int

    def __post_init__(self):
        self.module = BertModel(self.config, add_pooling_layer=False)
        self._features = jax.jit(self._pooled)
        self.tokens = 0  # padded tokens encoded by `features` (the cost of an evaluation)
        self.seconds = 0.0

    def _pooled(self, trainable, frozen, ids, mask):
        params = join_params(trainable, frozen)
        params.pop("pooler", None)
        hidden, _ = self.module.apply({"params": params}, ids, mask)
        return mean_pool(hidden, mask)

    def features(self, trainable, frozen, seqs: Sequence[np.ndarray], batch_size: int = 64,
                 desc: str | None = None) -> np.ndarray:
        """Mean-pooled final hidden states, (n, hidden) float32, in the order of `seqs`."""
        out = np.zeros((len(seqs), self.config.hidden_size), np.float32)
        start = time.perf_counter()
        trainable, frozen = jax.device_put((trainable, frozen))  # once, not once per batch
        batches = length_batches(seqs, batch_size)
        for idx in tqdm(batches, desc=desc, leave=False, disable=desc is None):
            ids, mask = pad_batch([seqs[i] for i in idx], self.max_len)
            out[idx] = np.asarray(self._features(trainable, frozen, ids, mask))
            self.tokens += ids.size
        self.seconds += time.perf_counter() - start
        return out


# ----------------------------------------------------------------------------------------- heads
@dataclasses.dataclass(frozen=True)
class Head:
    """A linear classifier on pooled features: logits = features @ weight + bias; weight (d, C)."""

    weight: np.ndarray
    bias: np.ndarray

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.argmax(features @ self.weight + self.bias, axis=-1)

    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(features) == labels))

    def padded(self, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """(weight, bias) with extra never-winning classes, so one compiled step serves every task."""
        d, c = self.weight.shape
        weight = np.zeros((d, num_classes), np.float32)
        bias = np.full((num_classes,), -1e9, np.float32)
        weight[:, :c], bias[:c] = self.weight, self.bias
        return weight, bias


def fit_head(features: np.ndarray, labels: np.ndarray, num_classes: int, c_reg: float = 1.0) -> Head:
    """Multinomial logistic regression on standardised features, folded into one affine map.

    Classes absent from `labels` get a bias of -1e4 (never predicted). lbfgs: deterministic.
    """
    from sklearn.linear_model import LogisticRegression

    mean, std = features.mean(0), features.std(0) + 1e-6
    model = LogisticRegression(C=c_reg, max_iter=2000)
    model.fit((features - mean) / std, labels)
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # sklearn's binary form: one logit for class 1
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((features.shape[1], num_classes), np.float32)
    bias = np.full((num_classes,), -1e4, np.float32)
    weight[:, model.classes_] = (coef / std).T
    bias[model.classes_] = intercept - (coef / std) @ mean
    return Head(weight, bias)


# ----------------------------------------------------------------------------------------- training
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 60
    batch_size: int = 16
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06


def make_optimizer(cfg: TrainConfig, trainable) -> optax.GradientTransformation:
    """AdamW with linear warmup then linear decay to zero; no weight decay on biases and LayerNorms."""
    warmup = max(1, int(cfg.steps * cfg.warmup_fraction))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, warmup),
         optax.linear_schedule(cfg.learning_rate, 0.0, max(1, cfg.steps - warmup))], [warmup])
    decay_mask = jax.tree.map(lambda x: x.ndim >= 2, trainable)
    return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask)


class FineTuner:
    """Fine-tunes the encoder through a frozen head; one compiled step per padded batch shape.

    The optimizer and the compiled step are built once and shared by every task (heads are padded
    to `head_classes`), so later tasks reuse the compilations of the first.
    """

    def __init__(self, encoder: Encoder, cfg: TrainConfig, head_classes: int, trainable_template):
        self.encoder, self.cfg, self.head_classes = encoder, cfg, head_classes
        self.optimizer = make_optimizer(cfg, trainable_template)
        self._step = jax.jit(self._train_step, donate_argnums=(0, 1))

    def _train_step(self, trainable, opt_state, frozen, weight, bias, ids, mask, labels):
        def loss_fn(p):
            logits = self.encoder._pooled(p, frozen, ids, mask) @ weight + bias
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    def batches(self, n: int, seed: int) -> Iterator[np.ndarray]:
        """Endless shuffled batches of indices into n examples (epochs reshuffled by the seed)."""
        if n == 0:
            raise ValueError("no training examples to fine-tune on")
        size = min(self.cfg.batch_size, n)
        rng = np.random.default_rng(seed)
        while True:
            order = rng.permutation(n)
            for i in range(0, n - size + 1, size):
                yield order[i : i + size]

    def run(self, trainable, frozen, head: Head, seqs: Sequence[np.ndarray], labels: np.ndarray,
            seed: int, desc: str = "fine-tune") -> tuple[dict, list[float]]:
        """Returns (fine-tuned trainable params, per-step losses)."""
        trainable = jax.tree.map(jnp.array, trainable)  # own copies: the step donates its buffers
        frozen = jax.device_put(frozen)
        opt_state = self.optimizer.init(trainable)
        weight, bias = head.padded(self.head_classes)
        losses = []
        batches = self.batches(len(seqs), seed)
        bar = tqdm(range(self.cfg.steps), desc=desc, leave=False)
        for _ in bar:
            idx = next(batches)
            ids, mask = pad_batch([seqs[i] for i in idx], self.encoder.max_len)
            trainable, opt_state, loss = self._step(trainable, opt_state, frozen, weight, bias, ids, mask,
                                                    labels[idx])
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        return jax.tree.map(np.asarray, trainable), losses


# ----------------------------------------------------------------------------------------- LoRA
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """PEFT's LoRA on every linear kernel of the encoder (query, key, value, attention output,
    intermediate, output): rank r, scaling alpha / r."""

    rank: int = 8
    alpha: float = 16.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def leaf_names(tree) -> list[str]:
    """The dotted leaf names drm_jax gives a tree (drm_jax.merge, drm_jax.merge_adapters)."""
    from drm_jax.engine.tree import flatten

    return flatten(tree).names


def lora_targets(trainable) -> list[str]:
    """Dotted names of the encoder's linear kernels (2-D, under 'encoder'): the LoRA-adapted weights."""
    flat = traverse_util.flatten_dict(trainable, sep=".")
    return [n for n in leaf_names(trainable) if n.startswith("encoder.") and n.endswith(".kernel")
            and np.ndim(flat[n]) == 2]


def _get(tree, name: str):
    node = tree
    for part in name.split("."):
        node = node[part]
    return node


def init_lora(trainable, cfg: LoraConfig, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """name -> {"a": (r, in), "b": (out, r)}: A as PEFT initialises it (Kaiming-uniform, bound
    1 / sqrt(in)), B zeros, so training starts from the pretrained encoder."""
    rng = np.random.default_rng([seed, 7])
    out = {}
    for name in lora_targets(trainable):
        fan_in, fan_out = np.shape(_get(trainable, name))  # flax kernel: (in, out)
        bound = 1.0 / math.sqrt(fan_in)
        out[name] = {"a": rng.uniform(-bound, bound, (cfg.rank, fan_in)).astype(np.float32),
                     "b": np.zeros((fan_out, cfg.rank), np.float32)}
    return out


def apply_lora(trainable, factors: Mapping[str, Mapping], scale) -> dict:
    """The encoder with every adapted kernel (in, out) replaced by kernel + scale * (B A)^T."""
    flat = dict(traverse_util.flatten_dict(trainable, sep="."))
    for name, f in factors.items():
        flat[name] = flat[name] + scale * jnp.matmul(f["b"], f["a"]).T
    return traverse_util.unflatten_dict(flat, sep=".")


def hf_weight_name(name: str) -> str:
    """A Flax leaf name -> the Hugging Face BertModel name ('encoder.layer_0....kernel' ->
    'encoder.layer.0....weight')."""
    from drm_jax.models import flax_to_hf

    return next(iter(flax_to_hf(traverse_util.unflatten_dict({tuple(name.split(".")): np.zeros((1, 1))}))))


def save_lora_adapter(directory: Path, factors: Mapping[str, Mapping], cfg: LoraConfig, base_name: str) -> Path:
    """A PEFT adapter directory (adapter_config.json, adapter_model.safetensors, PEFT key names):
    the scale is folded into B, so the config has r = lora_alpha (PEFT's scaling 1), the same update."""
    from drm_jax.io.peft_io import write_lora_adapter

    weights = {hf_weight_name(n): (np.asarray(f["b"]) * cfg.scale, np.asarray(f["a"]), False)
               for n, f in factors.items()}
    return write_lora_adapter(directory, weights, base_model_name_or_path=base_name, overwrite=True)


def load_lora_adapter(directory: Path, trainable) -> dict:
    """A PEFT adapter directory -> {Flax kernel name: drm_jax.LoraWeight(B, A, scale, transposed=True)}
    (a Flax kernel is stored (in, out), the transpose of B A)."""
    from drm_jax import LoraWeight
    from drm_jax.io.peft_io import PeftReader

    by_hf = {hf_weight_name(n): n for n in lora_targets(trainable)}
    reader = PeftReader(Path(directory))
    try:
        weights = reader.lora_weights()
    finally:
        reader.close()
    out = {}
    for hf_name, (b, a, scale, transposed) in weights.items():
        if hf_name not in by_hf or transposed:
            raise ValueError(f"{directory}: {hf_name!r} is not one of the encoder's linear weights")
        out[by_hf[hf_name]] = LoraWeight(b, a, float(scale), True)
    return out


def lora_factors(adapter: Mapping) -> dict[str, dict[str, np.ndarray]]:
    """{name: LoraWeight} -> {name: {"a", "b"}} with the scale folded into B (for apply_lora(..., 1))."""
    return {n: {"a": np.asarray(w.a), "b": np.asarray(w.b) * w.scale} for n, w in adapter.items()}


class LoraFineTuner:
    """LoRA fine-tuning through a frozen head: only the factors train (AdamW, warmup + linear decay, no
    weight decay); one compiled step per padded batch shape, shared by every task."""

    def __init__(self, encoder: Encoder, cfg: TrainConfig, lora: LoraConfig, head_classes: int, template):
        self.encoder, self.cfg, self.lora, self.head_classes = encoder, cfg, lora, head_classes
        warmup = max(1, int(cfg.steps * cfg.warmup_fraction))
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.learning_rate, warmup),
             optax.linear_schedule(cfg.learning_rate, 0.0, max(1, cfg.steps - warmup))], [warmup])
        self.optimizer = optax.adam(schedule)
        self._step = jax.jit(self._train_step, donate_argnums=(0, 1))

    def _train_step(self, factors, opt_state, trainable, frozen, weight, bias, ids, mask, labels):
        def loss_fn(f):
            params = apply_lora(trainable, f, self.lora.scale)
            logits = self.encoder._pooled(params, frozen, ids, mask) @ weight + bias
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(factors)
        updates, opt_state = self.optimizer.update(grads, opt_state, factors)
        return optax.apply_updates(factors, updates), opt_state, loss

    def run(self, trainable, frozen, head: Head, seqs: Sequence[np.ndarray], labels: np.ndarray,
            seed: int, desc: str = "LoRA") -> tuple[dict, list[float]]:
        """Returns (trained factors {name: {"a", "b"}} as numpy, per-step losses)."""
        factors = jax.tree.map(jnp.array, init_lora(trainable, self.lora, seed))
        trainable, frozen = jax.device_put((trainable, frozen))
        opt_state = self.optimizer.init(factors)
        weight, bias = head.padded(self.head_classes)
        losses = []
        batches = FineTuner.batches(self, len(seqs), seed)
        bar = tqdm(range(self.cfg.steps), desc=desc, leave=False)
        for _ in bar:
            idx = next(batches)
            ids, mask = pad_batch([seqs[i] for i in idx], self.encoder.max_len)
            factors, opt_state, loss = self._step(factors, opt_state, trainable, frozen, weight, bias, ids, mask,
                                                  labels[idx])
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        return jax.tree.map(np.asarray, factors), losses
