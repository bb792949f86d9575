"""The models merged by the multi-host test: 16 stacked (6, 5) layers and a bias, 3 fine-tuned models."""

import numpy as np


def make_models(layers=16, k=3):
    rng = np.random.default_rng(0)
    base = {f"layers.{i:02d}.w": rng.standard_normal((6, 5)).astype(np.float32) for i in range(layers)}
    base["bias"] = rng.standard_normal(5).astype(np.float32)
    models = [{n: v + rng.standard_normal(v.shape).astype(np.float32) for n, v in base.items()} for _ in range(k)]
    return base, models
