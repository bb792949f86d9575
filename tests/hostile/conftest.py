"""Shared pieces of the hostile-input tests: a tiny model family and the refusal contract.

`tiny_family` (session-scoped): a tiny Llama (random weights from a transformers config, no download)
saved as `base`, `task_a`, `task_b` safetensors directories. `refused(...)` runs the command line in
process and checks the contract every bad input must meet: exit 2, exactly one line on stderr naming
what is wrong, no traceback, nothing left at or beside the output, inputs byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import pytest

TASKS = ("task_a", "task_b")
MERGE_CONFIG = """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: {wa}}}
  - model: {b}
    parameters: {{weight: {wb}}}
parameters: {{lambda: 1.0}}
"""


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> Path:
    """<root>/{base,task_a,task_b}: a one-layer Llama of width 16 and two noisy copies (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(root / "base")
    state = base.state_dict()
    for t, name in enumerate(TASKS):
        gen = torch.Generator().manual_seed(10 + t)
        tuned = LlamaForCausalLM(config).eval()
        tuned.load_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in state.items()})
        tuned.save_pretrained(root / name)
    return root


@pytest.fixture
def family(tiny_family, tmp_path) -> Path:
    """A private copy of the tiny family (tests may break it) under tmp_path/models."""
    target = tmp_path / "models"
    shutil.copytree(tiny_family, target, symlinks=True)
    return target


def write_merge_config(directory: Path, base: Path, a: Path, b: Path, wa="0.5", wb="0.5",
                       extra: str = "") -> Path:
    path = Path(directory) / "merge.yaml"
    path.write_text(MERGE_CONFIG.format(base=base, a=a, b=b, wa=wa, wb=wb) + extra)
    return path


def tree_digest(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of every regular file under (or at) each path, symlinks recorded by their target."""
    digest = {}
    for root in paths:
        root = Path(root)
        entries = [root] if not root.is_dir() or root.is_symlink() else [root, *sorted(root.rglob("*"))]
        for p in entries:
            if p.is_symlink():
                digest[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                digest[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                digest[str(p)] = "dir"
            elif p.exists():
                digest[str(p)] = f"special:{p.stat().st_mode:o}"
    return digest


def leftovers(out_dir: Path) -> list[str]:
    """Temporary or backup directories the writer may have left beside `out_dir`."""
    parent = Path(out_dir).parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir()
                  if p.name.startswith(f".{Path(out_dir).name}.tmp-") or p.name.startswith(f".{Path(out_dir).name}.old-"))


def refused(capfd, argv: Sequence[str], out_dir: Path, inputs: Sequence[Path], names: Sequence[str],
            out_existed: bool = False) -> str:
    """Run `drm-jax ARGV` in process and assert the refusal contract; returns the error line.

    names: substrings the one line must contain (the file, tensor or key at fault).
    out_existed: out_dir existed before the run (then it must be unchanged, else absent).
    """
    from drm_jax.cli.main import main

    before = tree_digest(inputs)
    out_before = tree_digest([out_dir]) if out_existed else None
    capfd.readouterr()
    code = main([str(a) for a in argv])
    captured = capfd.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (code, captured.err[-2000:])
    assert len(lines) == 1, captured.err[-2000:]
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    line = lines[0]
    assert line.startswith("drm-jax: error: "), line
    for name in names:
        assert str(name) in line, (name, line)
    if out_existed:
        assert tree_digest([out_dir]) == out_before
    else:
        assert not Path(out_dir).exists() and not Path(out_dir).is_symlink(), sorted(Path(out_dir).parent.iterdir())
    assert leftovers(out_dir) == []
    assert tree_digest(inputs) == before
    return line


def lora_adapter_dir(directory: Path, name: str = "adapter", **settings) -> Path:
    """A rank-2 PEFT LoRA adapter of the tiny family's layer-0 q_proj (width 16) at directory/name, with
    `settings` written over its adapter_config.json."""
    import json

    import numpy as np

    from drm_jax.io.peft_io import write_lora_adapter

    rng = np.random.default_rng(len(name))
    weights = {"model.layers.0.self_attn.q_proj.weight": (0.1 * rng.standard_normal((16, 2)).astype(np.float32),
                                                          rng.standard_normal((2, 16)).astype(np.float32), False)}
    path = write_lora_adapter(Path(directory) / name, weights)
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(settings)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path
