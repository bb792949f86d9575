"""One process of a two-process merge over a CPU mesh (run by test_shard.py, not collected by pytest).

argv: process_id, num_processes, coordinator port, output .npz, method (or "probe": start the
distributed backend, check it, stop; nothing of drm_jax runs). Each process has 4 CPU devices; the
mesh spans all 8. Writes the merged leaves this process received and the names of the leaves it read.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

pid, nproc, port, out_path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
                           initialization_timeout=60)

if sys.argv[5] == "probe":  # only the distributed backend: every process sees the devices of all
    assert jax.device_count() == nproc * jax.local_device_count(), (jax.device_count(), jax.local_device_count())
    jax.distributed.shutdown()
    sys.exit(0)

from drm_jax.engine.merge import merge_leaves  # noqa: E402
from multihost_data import make_models  # noqa: E402

base, models = make_models()
names = sorted(base)
read, out = set(), {}


def get_base(i):
    read.add(names[i])
    return base[names[i]]


def get_model(t, i):
    read.add(names[i])
    return models[t][names[i]]


mesh = Mesh(np.array(jax.devices()), ("layers",))
merge_leaves(names, [base[n].shape for n in names], [base[n].dtype for n in names], get_base=get_base,
             get_model=get_model, put=lambda i, x: out.__setitem__(names[i], np.asarray(x)),
             num_models=len(models), method=sys.argv[5], mesh=mesh)
np.savez(out_path, read=np.array(sorted(read)), **{"leaf:" + k: v for k, v in out.items()})
jax.distributed.shutdown()
