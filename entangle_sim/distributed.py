"""Sweeps across hosts with `jax.distributed`: the run axis sharded over every device of every process.

Launch one process per host (or several on one machine for testing), each with the same code:

    from entangle_sim import distributed
    distributed.initialize("10.0.0.1:12357", num_processes=2, process_id=RANK)   # before any JAX work
    traj = distributed.sweep(policy, batch, cfg, jax.random.PRNGKey(0), runs=1024)

`sweep` builds the same keys as `train.sweep` (so results do not depend on the number of
processes), places each process's slice on its local devices, runs the compiled vmapped
scan SPMD, and returns the full [R, S, B] trajectory on every process (all-gathered). On CPU
the collectives use gloo. runs must be divisible by the global device count.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .train import sweep_fn


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize`, with gloo collectives when the platform is CPU."""
    if jax.config.jax_platforms in (None, "", "cpu") or str(jax.config.jax_platforms).startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)


def sweep(policy, batch, cfg, key, runs: int, *, params0=None, lrs=None, init_noise: float = 0.0):
    """Multi-process version of `train.sweep` (same keys, same results); see the module doc."""
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec


    n_dev = jax.device_count()
    if runs % n_dev:
        raise ValueError(f"runs={runs} must be divisible by the global device count {n_dev}")
    mesh = Mesh(np.array(jax.devices()), ("runs",))
    shard = NamedSharding(mesh, PartitionSpec("runs"))
    keys = np.asarray(jax.random.split(key, runs))  # the same keys as train.sweep
    lrs = np.full((runs,), cfg.lr) if lrs is None else np.asarray(lrs)
    per = runs // jax.process_count()
    lo = jax.process_index() * per
    g_keys = jax.make_array_from_process_local_data(shard, keys[lo:lo + per])
    g_lrs = jax.make_array_from_process_local_data(shard, lrs[lo:lo + per])
    fn = sweep_fn(policy, cfg, params0 is None)
    out = fn(g_keys, g_lrs, {}, batch, params0, jnp.asarray(init_noise))
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), out)
