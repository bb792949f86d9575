"""A new user's first hour (issue 23, class 10): an Orbax checkpoint given by a relative path, a PyTorch
`state_dict()` and an NNX `State` holding RNG keys. The README says all of them are accepted: they are."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

import drm_jax
from drm_jax.errors import MergeInputError

from .conftest import write_merge_config


# -- an Orbax checkpoint by a relative path ----------------------------------------------------------------
def _tensors(directory):
    from drm_jax.io import open_checkpoint

    with open_checkpoint(directory) as reader:
        return {name: reader.get(name) for name in reader.keys()}


@pytest.mark.parametrize("given", ["orbax", "./orbax", "sub/../orbax"])
def test_orbax_by_a_relative_path_converts(family, tmp_path, monkeypatch, given):
    from drm_jax.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    assert main(["convert", str(family / "base"), "orbax", "--to", "orbax"]) == 0  # written by a relative path
    assert main(["convert", given, "back", "--to", "hf"]) == 0
    original, back = _tensors(family / "base"), _tensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    for name in original:
        np.testing.assert_array_equal(back[name], original[name])


def test_orbax_by_a_relative_path_merges(family, tmp_path, monkeypatch):
    from drm_jax.cli.main import main

    monkeypatch.chdir(tmp_path)
    for name in ("base", "task_a", "task_b"):
        assert main(["convert", str(family / name), f"orbax_{name}", "--to", "orbax"]) == 0
    relative = write_merge_config(tmp_path, "orbax_base", "orbax_task_a", "orbax_task_b")
    assert main(["merge", os.path.relpath(relative), "merged_orbax"]) == 0
    absolute = tmp_path / "abs"
    absolute.mkdir()
    config = write_merge_config(absolute, family / "base", family / "task_a", family / "task_b")
    assert main(["merge", str(config), str(tmp_path / "merged_hf")]) == 0
    from_orbax, from_hf = _tensors(tmp_path / "merged_orbax"), _tensors(tmp_path / "merged_hf")
    assert len(from_orbax) == len(from_hf) > 0
    for name, value in from_hf.items():
        np.testing.assert_allclose(np.asarray(value, np.float32), np.asarray(from_orbax[name], np.float32),
                                   rtol=1e-6, atol=1e-6)


# -- a PyTorch state_dict() ------------------------------------------------------------------------------------
def _torch_models(dtype):
    import torch

    torch.manual_seed(0)
    nets = []
    for _ in range(3):
        net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)).to(dtype)
        net.train()(torch.randn(5, 6, dtype=dtype))  # running statistics and num_batches_tracked move
        nets.append(net)
    return nets


@pytest.mark.parametrize("method", ["task_arithmetic", "drm"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_state_dict_is_merged_into_a_state_dict(method, dtype):
    import torch

    nets = _torch_models(getattr(torch, dtype))
    base, *models = [n.state_dict() for n in nets]
    merged = drm_jax.merge(base, models, method=method, coefficients=[0.4, 0.6])
    assert list(merged) == list(base)
    for name, value in merged.items():
        assert isinstance(value, torch.Tensor) and value.dtype == base[name].dtype, name
        assert value.shape == base[name].shape
    assert torch.equal(merged["1.num_batches_tracked"], base["1.num_batches_tracked"])  # not floating: kept
    # the same merge from NumPy arrays of the same values
    as_numpy = [{k: (v.float().numpy() if v.is_floating_point() else v.numpy()) for k, v in sd.items()}
                for sd in (base, *models)]
    reference = drm_jax.merge(as_numpy[0], as_numpy[1:], method=method, coefficients=[0.4, 0.6])
    for name in base:
        if base[name].is_floating_point():
            want = torch.from_numpy(np.array(reference[name], np.float32)).to(base[name].dtype)
            torch.testing.assert_close(merged[name], want, rtol=1e-2 if dtype == "bfloat16" else 1e-5, atol=1e-5)
    nets[0].load_state_dict(merged)  # usable as it is


def test_torch_dtype_without_numpy_equivalent_names_the_leaf():
    import torch

    base = {"w": torch.zeros(3, 3), "scale": torch.zeros(3, dtype=torch.float8_e4m3fn)}
    with pytest.raises(MergeInputError, match="leaf 'scale': torch dtype float8_e4m3fn"):
        drm_jax.merge(base, [base, base], method="task_arithmetic")


# -- an NNX State holding RNG keys -----------------------------------------------------------------------------
def _nnx_states():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(5, 4, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)
            self.out = nnx.Linear(4, 2, rngs=rngs)

    nets = [Net(nnx.Rngs(params=i, dropout=10 + i)) for i in range(3)]
    return nets, [nnx.state(n) for n in nets]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "drm"])
def test_nnx_state_with_rng_keys_is_merged(method):
    from flax import nnx

    nets, (base, *models) = _nnx_states()
    merged = drm_jax.merge(base, models, method=method, layout="flax")
    nnx.update(nets[0], merged)  # the merged State fits the module
    names = lambda tree: [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert names(merged) == names(base)
    leaves = dict(zip(names(merged), jax.tree.leaves(merged)))
    base_leaves = dict(zip(names(base), jax.tree.leaves(base)))
    rng_names = [n for n in leaves if "rngs" in n]
    assert len(rng_names) == 2  # the dropout stream's key and counter, kept at the base's values
    for n in rng_names:
        np.testing.assert_array_equal(np.asarray(jax.random.key_data(leaves[n]) if "key" in n else leaves[n]),
                                      np.asarray(jax.random.key_data(base_leaves[n]) if "key" in n
                                                 else base_leaves[n]))
    # the parameters are those of the same merge without the RNG state
    params = [nnx.state(n, nnx.Param) for n in _nnx_states()[0]]
    want = drm_jax.merge(params[0], params[1:], method=method, layout="flax")
    got = nnx.state(nets[0], nnx.Param)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
