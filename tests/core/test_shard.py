"""Sharded merges over a device mesh (8 forced host devices, see tests/conftest.py) and across processes."""

import functools
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import drm_jax
import merge_reference as ref
from drm_jax.engine import shard

HERE = Path(__file__).parent
# The CPU devices (8, forced by tests/conftest.py), so the meshes are the same on a machine with a GPU.
CPU_DEVICES = jax.devices("cpu")
if len(CPU_DEVICES) < 8:  # fail, not skip: a skip here would hide every multi-device test
    raise RuntimeError(f"tests/core/test_shard.py needs 8 CPU devices, jax has {len(CPU_DEVICES)}: XLA_FLAGS="
                       f"{os.environ.get('XLA_FLAGS')!r} was read too late or sets another "
                       "--xla_force_host_platform_device_count (tests/conftest.py sets 8)")


def models_with(layers, k=3, seed=0):
    rng = np.random.default_rng(seed)
    base = {f"blocks.{i}.w": rng.standard_normal((6, 5)).astype(np.float32) for i in range(layers)}
    base["norm.scale"] = rng.standard_normal(5).astype(np.float32)
    models = [{n: v + 0.3 * rng.standard_normal(v.shape).astype(np.float32) for n, v in base.items()}
              for _ in range(k)]
    return base, models


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(CPU_DEVICES[:8]), ("layers",))


# every method merged by leaf name (regmean_plusplus merges block after block: drm_jax.regmean_plusplus)
CASES = [(m, 11, "horizontal") for m in sorted(drm_jax.methods.METHODS) if m != "regmean_plusplus"] + [
    (m, layers, d) for m in ("drm", "knots_ties") for layers in (8, 3) for d in ("horizontal", "vertical")
] + [("drm", 11, "vertical")]


@pytest.mark.parametrize(("method", "layers", "direction"), CASES)
def test_sharded_equals_single_device(mesh, method, layers, direction):
    """Layer counts that divide (8) and do not divide (11, 3) the device count."""
    base, models = models_with(layers)
    most = drm_jax.methods.get_method(method).max_models  # slerp, nearswap, passthrough: one; nuslerp: two
    models = models[:most] if most else models
    given = {"direction": direction} if "direction" in drm_jax.methods.get_method(method).names else {}
    given.update({d.name: [{}] * len(models) for d in drm_jax.methods.get_method(method).leaf_data})  # identity Grams
    single = drm_jax.merge(base, models, method=method, **given)
    sharded = drm_jax.merge(base, models, method=method, mesh=mesh, **given)
    for name in base:
        assert ref.relative_error(sharded[name], single[name]) < 1e-5, name


def test_two_dimensional_mesh_splits_layers_over_both_axes():
    mesh = Mesh(np.array(CPU_DEVICES[:8]).reshape(4, 2), ("data", "model"))
    base, models = models_with(10)
    single = drm_jax.merge(base, models)
    sharded = drm_jax.merge(base, models, mesh=mesh)
    for name in base:
        assert ref.relative_error(sharded[name], single[name]) < 1e-5


def test_ties_over_the_whole_task_vector_shards_too(mesh):
    base, models = models_with(9)
    single = drm_jax.merge(base, models, method="ties", trim_scope="model")
    sharded = drm_jax.merge(base, models, method="ties", trim_scope="model", mesh=mesh)
    for name in base:
        assert ref.relative_error(sharded[name], single[name]) < 1e-5


# Runs drm_jax.merge(mesh=...) in a fresh process whose XLA dumps every program it compiles (after
# optimization, so with whatever collectives the SPMD partitioner inserted): the programs checked are the
# ones the merge runs, whatever the engine calls them.
_DUMPED_MERGES = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_dump_hlo_as_text --xla_dump_to=" + sys.argv[1]
import jax, numpy as np
from jax.sharding import Mesh
import drm_jax
rng = np.random.default_rng(0)
base = {f"blocks.{i}.w": rng.standard_normal((6, 5)).astype(np.float32) for i in range(16)}
models = [{n: v + 0.3 * rng.standard_normal(v.shape).astype(np.float32) for n, v in base.items()} for _ in range(3)]
mesh = Mesh(np.array(jax.devices()[:8]), ("layers",))
for method in sys.argv[2:]:
    drm_jax.merge(base, models, method=method, mesh=mesh, exclude=())
"""


def test_compiled_programs_have_no_collectives(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", _DUMPED_MERGES, str(tmp_path), "drm", "ties", "dare_ties"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    programs = {p.name: p.read_text() for p in tmp_path.glob("*after_optimizations.txt")}
    assert programs, "XLA dumped no program"
    for name, hlo in programs.items():
        for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter"):
            assert collective not in hlo, (name, collective)
    # the stacked models stay split: a program the merge ran sees 16 / 8 = 2 layers of 3 models per device
    assert any("f32[2,3,6,5]" in hlo for hlo in programs.values()), sorted(programs)


def test_padded_length():
    mesh = Mesh(np.array(CPU_DEVICES[:8]), ("layers",))
    assert shard.padded_length(8, mesh) == 8
    assert shard.padded_length(11, mesh) == 16
    assert shard.padded_length(3, mesh) == 8


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(method, outs):
    """Run the two processes of tests/core/multihost_worker.py; returns their (return codes, logs)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE.parent.parent)])
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(i), "2", str(port),
                               str(outs[i]), method], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    return [p.returncode for p in procs], logs


@functools.cache
def _distributed_backend_failure() -> str | None:
    """Start jax.distributed with gloo CPU collectives in two processes and nothing else, once: None where
    it works, else the end of the log (the backend ships with jaxlib, but not every build has it)."""
    with tempfile.TemporaryDirectory() as tmp:
        codes, logs = _run_workers("probe", [Path(tmp) / "p0.npz", Path(tmp) / "p1.npz"])
    return None if codes == [0, 0] else logs[0][-2000:]


def test_two_processes_each_read_only_their_layers(tmp_path):
    failure = _distributed_backend_failure()
    if failure is not None:
        print(failure, file=sys.stderr)  # shown with -rs / on failure: why the probe failed
        pytest.skip("needs jaxlib with gloo CPU collectives (jax.distributed on the CPU backend)")
    outs = [tmp_path / f"p{i}.npz" for i in range(2)]
    codes, logs = _run_workers("drm", outs)
    # the backend works (probed above): any failure of a worker is a failure of the merge
    assert codes == [0, 0], "\n\n".join(logs)
    results = [np.load(o) for o in outs]
    import multihost_data

    base, models = multihost_data.make_models()
    want = drm_jax.merge(base, models, method="drm")
    seen = {}
    for res in results:
        for key in res.files:
            if key.startswith("leaf:"):
                seen[key[5:]] = res[key]
    assert sorted(seen) == sorted(base)  # every leaf written once, by its owner
    for name, value in seen.items():
        assert ref.relative_error(value, want[name]) < 1e-5
    read0, read1 = set(results[0]["read"]), set(results[1]["read"])
    layers = {n for n in base if n.startswith("layers.")}
    assert read0 & read1 & layers == set()  # no layer read by both processes
    assert (read0 | read1) >= layers
    assert len(read0 & layers) == len(read1 & layers) == 8
