"""`drm-jax merge` end to end on a tiny GPT-2, whose Conv1D weights are stored (in, out).

DRM must decompose the (out, in) matrix: the command line's output equals `drm_jax.merge` run on the
transposed Conv1D weights (transposed back), and differs from merging the stored matrices as they are.
Position and token embeddings (`wpe`, `wte`) stay out of DRM by default: they take the TIES-like path.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import drm_jax
import merge_reference as ref
from drm_jax.cli.main import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"
CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def _transposed(tensors):
    return {n: (v.T.copy() if CONV1D.search(n) else v) for n, v in tensors.items()}


@pytest.fixture(scope="module")
def gpt2_merged(gpt2_family, read_output, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2_out") / "drm"
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(gpt2_family)  # the example config names models/base, models/task_a, models/task_b
        assert main(["merge", str(EXAMPLES / "drm.yaml"), str(out), "--quiet"]) == 0
    finally:
        mp.undo()
    family = [read_output(gpt2_family / "models" / n) for n in ("base", "task_a", "task_b")]
    return family, read_output(out), out


def test_conv1d_weights_are_merged_as_out_in_matrices(gpt2_merged):
    (base, a, b), got, _ = gpt2_merged
    conv = sorted(n for n in base if CONV1D.search(n))
    assert len(conv) == 8  # 4 Conv1D weights in each of the 2 blocks
    kwargs = dict(method="drm", drop_rate=0.8, coefficients=[1.0, 1.0])
    want = _transposed(drm_jax.merge(_transposed(base), [_transposed(a), _transposed(b)], **kwargs))
    as_stored = drm_jax.merge(base, [a, b], **kwargs)
    assert set(got) == set(base)
    for name in base:
        np.testing.assert_allclose(got[name], np.asarray(want[name]), rtol=1e-5, atol=1e-6, err_msg=name)
    # decisive: merging the stored (in, out) matrices gives another result
    assert max(float(np.abs(np.asarray(as_stored[n]) - got[n]).max()) for n in conv) > 1e-3


def test_embeddings_take_the_ties_like_path(gpt2_merged):
    (base, a, b), got, _ = gpt2_merged
    for name in ("transformer.wpe.weight", "transformer.wte.weight"):
        d = np.stack([a[name] - base[name], b[name] - base[name]]).astype(np.float64)
        delta = got[name].astype(np.float64) - base[name]
        assert ref.relative_error(delta, ref.ties_like(d)) < 1e-5, name
        assert ref.relative_error(delta, ref.drm_h(d)) > 1e-2, name  # DRM would give another result


def test_merged_gpt2_runs_in_transformers(gpt2_merged):
    import torch
    from transformers import GPT2LMHeadModel

    _, _, out = gpt2_merged
    model = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()
