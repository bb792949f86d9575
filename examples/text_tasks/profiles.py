"""Run profiles: how many tasks, examples, steps and search points (sizes per task and split)."""

from __future__ import annotations

import dataclasses

from text_tasks.encoder import LoraConfig, TrainConfig
from text_tasks.merging import AdaConfig, Grid


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
    ada: AdaConfig | None = AdaConfig()  # AdaMerging rows (None: none)
    lora: LoraConfig | None = None  # LoRA adapters per task instead of full fine-tuning
    count_labels: tuple[str, ...] | None = None  # methods in the number-of-tasks curve (None: all)
    time_one_shot: bool = False  # also time one drm_jax.merge per method (the speed-up of prepare)
    gram_texts: int = 256  # unlabeled fine-tuning texts per task for RegMean's Gram matrices (FusionBench: 256)


# The tasks of the full profile: 8 tasks from 4 wheels, chosen for their headroom. Seed 0 at these sizes,
# test accuracy pretrained -> fine-tuned (measured once, 200 test texts): rt_sentiment 67.0 -> 76.5,
# election_tweets 87.0 -> 96.0, newsgroups20 55.0 -> 64.0, reuters_r52 80.0 -> 93.0, debate_party
# 55.2 -> 69.0, health_tweets 30.0 -> 50.0, news_outlet 48.0 -> 75.5, bbc_news 90.5 -> 95.0.
# commons_party (52.6 -> 50.9: 898 speeches, 40 tokens each, do not teach the party), rt_subjectivity
# and reuters_r8 (91.0 -> 95.0) are there for --tasks.
FULL_TASKS = ("rt_sentiment", "election_tweets", "newsgroups20", "reuters_r52", "debate_party", "health_tweets",
              "news_outlet", "bbc_news")

PROFILES = {
    # The README's main job: about 10 minutes on 2 CPU cores from nothing (two wheels, 20 MB).
    "default": Profile(
        tasks=("rt_sentiment", "debate_party", "health_tweets", "news_outlet"),
        n_head=256, n_train=576, n_val=128, n_test=200, max_len=40,
        train=TrainConfig(steps=60, batch_size=16, learning_rate=1e-4),
        grid=Grid(refine=0, sweep_test=()),  # no refinement: the 10 minutes (see README, search on validation)
        ada=AdaConfig(steps=10, batch_per_task=8, learning_rate=0.02, relative=True),
        # No number-of-tasks curve nor test sweep here (the full profile has them): the time went to the
        # larger validation split, the search of every parameter and the second table.
        task_counts=(), reselect_per_count=False, seeds=(0,),
    ),
    # Eight tasks, three seeds. Only DRM-H's drop-rate stage is also evaluated on test (each test evaluation
    # encodes 1600 texts). From an empty cache it fine-tunes 24 encoders; a second run reuses the heads,
    # the checkpoints, the learned coefficients and the evaluations stored in the cache (--no-eval-cache
    # redoes every merge and evaluation).
    "full": Profile(
        tasks=FULL_TASKS,
        n_head=256, n_train=1024, n_val=128, n_test=200, max_len=40,
        train=TrainConfig(steps=120, batch_size=16, learning_rate=1e-4),
        grid=Grid(ta_lambdas=(0.1, 0.2, 0.3), sweep_test=("DRM-H",)),
        ada=AdaConfig(steps=16, batch_per_task=8, learning_rate=0.02, relative=True),
        task_counts=(2, 4, 6), count_labels=("Task arithmetic", "TIES", "KnOTS-TIES", "DRM-H", "TSV-M", "Iso-CTS"),
        reselect_per_count=False, seeds=(0, 1, 2),
    ),
    # The full profile's tasks with LoRA adapters (rank 8 on the 36 linear kernels) instead of full
    # fine-tuning: PEFT adapter directories in the cache, merged by every method (in factored form by
    # drm_jax.merge_adapters where the method has one), the same table.
    "lora": Profile(
        tasks=FULL_TASKS,
        n_head=256, n_train=1024, n_val=128, n_test=200, max_len=40,
        train=TrainConfig(steps=120, batch_size=16, learning_rate=2e-3),
        grid=Grid(sweep_test=()),
        ada=AdaConfig(steps=16, batch_per_task=8, learning_rate=0.02, relative=True),
        lora=LoraConfig(rank=8, alpha=16.0),
        task_counts=(), reselect_per_count=False, seeds=(0, 1, 2),
    ),
    # Seconds, for a smoke test of the whole pipeline (numbers mean nothing).
    "smoke": Profile(
        tasks=("rt_sentiment", "health_tweets"),
        n_head=32, n_train=16, n_val=16, n_test=16, max_len=32,
        train=TrainConfig(steps=2, batch_size=8, learning_rate=1e-4),
        grid=Grid(refine=0, max_extend=2, rounds=1, wudi_iter_num=4), gram_texts=8,
        ada=AdaConfig(steps=2, batch_per_task=4, learning_rate=0.03),
        task_counts=(2,), reselect_per_count=False, seeds=(0,), time_one_shot=True,
    ),
}
PROFILES["lora-smoke"] = dataclasses.replace(
    PROFILES["smoke"], lora=LoraConfig(rank=4, alpha=8.0),
    train=TrainConfig(steps=2, batch_size=8, learning_rate=2e-3), time_one_shot=False)
