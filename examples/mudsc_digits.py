"""Merge two MLPs trained from different seeds on disjoint halves of sklearn's digits (no download).

Model A learns digits 0-4, model B digits 5-9, each from its own random initialization. They are
merged with plain averaging, Git Re-Basin weight matching, activation alignment, ZipIt! and MuDSC
(align and zip), using unlabeled training images of both tasks for activations. Printed: accuracy on
each task (argmax over that task's five classes) and joint accuracy (argmax over all ten classes, all
test images), as a Markdown table.

Run: python examples/mudsc_digits.py   (about 30 s on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from drm_jax.permute import (
    activation_align,
    average,
    mlp_spec,
    mudsc,
    weight_matching,
    zipit,
)
from drm_jax.permute.models import MLP

TASKS = {"A (0-4)": np.arange(0, 5), "B (5-9)": np.arange(5, 10)}


def load_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits 8x8 scaled to [0, 1], flattened to 64 features; stratified 70/30 split."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return train_test_split(x, digits.target, test_size=0.3, random_state=seed, stratify=digits.target)


def train(model: MLP, x: np.ndarray, y: np.ndarray, seed: int, steps: int, batch: int = 128) -> dict:
    """Adam on cross-entropy over all 10 logits, with only this task's labels present."""
    key = jax.random.PRNGKey(seed)
    variables = model.init(key, x[:1])
    optimizer = optax.adam(3e-3)
    state = optimizer.init(variables)

    @jax.jit
    def step(variables, state, xb, yb):
        def loss_fn(v):
            logits = model.apply(v, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        grads = jax.grad(loss_fn)(variables)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(variables, updates), state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(x), batch)
        variables, state = step(variables, state, x[idx], y[idx])
    return variables


def accuracies(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Per-task accuracy (argmax within the task's classes, on its test images) and joint accuracy."""
    result = {}
    for name, classes in TASKS.items():
        rows = np.isin(y, classes)
        predicted = classes[np.argmax(logits[rows][:, classes], axis=1)]
        result[name] = float(np.mean(predicted == y[rows]))
    result["joint"] = float(np.mean(np.argmax(logits, axis=1) == y))
    return result


def run_seed(hidden: tuple[int, ...], steps: int, seed: int) -> list[tuple[str, dict[str, float]]]:
    """Train the two parents from seeds 2*seed+1, 2*seed+2 and merge them with every method."""
    x_train, x_test, y_train, y_test = load_split(seed)
    model = MLP(hidden=hidden, num_classes=10)
    apply_fn = jax.jit(model.apply)
    parents = []
    for offset, classes in enumerate(TASKS.values()):
        rows = np.isin(y_train, classes)
        parents.append(train(model, x_train[rows], y_train[rows], seed=2 * seed + 1 + offset, steps=steps))

    spec = mlp_spec(parents[0])
    # unlabeled images of both tasks: the data a user has for matching
    batches = [x_train[i : i + 256] for i in range(0, len(x_train), 256)]
    methods = {
        "Weight averaging": lambda: average(parents, spec),
        "Git Re-Basin (weight matching)": lambda: weight_matching(parents, spec),
        "Activation alignment": lambda: activation_align(parents, spec, model.apply, batches),
        "MuDSC-align (alpha=0.5)": lambda: mudsc(parents, spec, model.apply, batches, mode="align"),
        "ZipIt": lambda: zipit(parents, spec, model.apply, batches),
        "MuDSC-zip (alpha=0.5)": lambda: mudsc(parents, spec, model.apply, batches, mode="zip"),
    }
    logits_a = np.asarray(apply_fn(parents[0], x_test))
    logits_b = np.asarray(apply_fn(parents[1], x_test))
    rows = [
        ("Model A alone", accuracies(logits_a, y_test)),
        ("Model B alone", accuracies(logits_b, y_test)),
        ("Ensemble (mean logits, 2x compute)", accuracies((logits_a + logits_b) / 2, y_test)),
    ]
    for name, merge in methods.items():
        rows.append((name, accuracies(np.asarray(apply_fn(merge(), x_test)), y_test)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    start = time.time()

    runs = [run_seed(tuple(args.hidden), args.steps, seed) for seed in args.seeds]
    names = [name for name, _ in runs[0]]
    columns = [*TASKS, "Task mean", "joint"]

    def cell(name: str, column: str) -> str:
        values = []
        for run in runs:
            acc = dict(run)[name]
            values.append(np.mean([acc[t] for t in TASKS]) if column == "Task mean" else acc[column])
        values = 100 * np.asarray(values)
        return f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1 else f"{values[0]:.1f}"

    print(f"sklearn digits, two MLPs (hidden {args.hidden}, {args.steps} Adam steps each, different seeds), "
          f"model A on digits 0-4, model B on 5-9; test accuracy in %, mean ± std over seeds {args.seeds}\n")
    header = ["Model", *TASKS, "Task mean", "Joint (10-way)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for name in names:
        print(f"| {name} | " + " | ".join(cell(name, c) for c in columns) + " |")
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
