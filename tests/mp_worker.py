"""One process of the multi-process training test (``tests/test_multiprocess.py``).

Run as a script, it joins a ``jax.distributed`` job through
:func:`medusa_jax.distributed.maybe_initialize`, reads its share of every global batch with
``BatchIterator(process_index, process_count)``, runs ``STEPS`` Medusa-1 and ``STEPS`` Medusa-2
train steps of the tiny model on a ``data`` x ``fsdp`` mesh spanning all processes, and writes
the losses to a JSON file::

    python tests/mp_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 --process-id 0 \\
        --local-devices 2 --out /tmp/p0.json

Imported (by the test), it provides :func:`run_steps` for the single-process reference: the same
parameters, data and steps, with ``mesh=None``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from medusa_jax.config import MedusaConfig, tiny_config
from medusa_jax.sharding import MeshConfig, make_mesh, param_shardings, shard_params
from medusa_jax.training.data import BatchIterator
from medusa_jax.training.run_config import TrainConfig
from medusa_jax.training.step import abstract_params, init_train_state, make_train_step

B, T, N_ROWS, STEPS = 8, 16, 24, 3
CFG = tiny_config()  # scanned layers, as in training
MCFG = MedusaConfig.for_model(CFG, num_heads=3)
MODES = {
    "medusa1": TrainConfig(
        mode="medusa1", steps=10, batch_size=B, seq_len=T, heads_lr=0.05, warmup_steps=1
    ),
    "medusa2": TrainConfig(
        mode="medusa2",
        steps=10,
        batch_size=B,
        seq_len=T,
        base_lr=1e-2,
        heads_lr=2e-2,
        warmup_steps=1,
    ),
}
DATA_SEED = 0


def host_params(seed: int = 0) -> dict:
    """Identical numpy parameters in every process: N(0, 0.02) weights (random Medusa ResBlocks
    too, so Medusa-2's head gradients reach the base), unit norm scales."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        if path[-1].key == "scale":
            return np.ones(x.shape, x.dtype)
        return (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(one, nn.meta.unbox(abstract_params(CFG, MCFG)))


def dataset() -> dict:
    """``N_ROWS`` rows of random tokens; the loss mask drops a random ~20% of positions."""
    rng = np.random.default_rng(1)
    return {
        "input_ids": rng.integers(0, CFG.vocab_size, (N_ROWS, T)).astype(np.int32),
        "loss_mask": (rng.random((N_ROWS, T)) < 0.8).astype(np.int32),
    }


def run_steps(mesh=None, process_index: int = 0, process_count: int = 1) -> dict:
    """``STEPS`` Medusa-1 steps, then ``STEPS`` Medusa-2 steps (fresh state, the iterator goes
    on, crossing an epoch boundary). Returns ``{mode: [loss, ...]}`` and, with a mesh,
    ``batches_match``: whether every global batch assembled from the processes' shards equals
    the single-process batch."""
    from medusa_jax.distributed import global_batch_from_local

    params = host_params()
    it = BatchIterator(dataset(), B, DATA_SEED, process_index, process_count)
    ref_it = BatchIterator(dataset(), B, DATA_SEED)  # the full batches, to check the assembly
    out: dict = {"batches_match": True}
    for mode, tcfg in MODES.items():
        if mesh is None:
            placed = jax.tree.map(jax.numpy.array, params)
        else:
            placed = shard_params(params, param_shardings(abstract_params(CFG, MCFG), mesh))
        state = init_train_state(CFG, MCFG, tcfg, placed, mesh)
        step = make_train_step(CFG, MCFG, tcfg, mesh)
        losses = []
        for _ in range(STEPS):
            local, full = next(it), next(ref_it)
            if mesh is None:
                batch = local
            else:
                from jax.experimental import multihost_utils

                batch = global_batch_from_local(local, mesh)
                gathered = multihost_utils.process_allgather(batch["input_ids"], tiled=True)
                out["batches_match"] &= bool(np.array_equal(gathered, full["input_ids"]))
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
        out[mode] = losses
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coordinator", required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--local-devices", type=int, default=2)
    p.add_argument("--data", type=int, default=2, help="mesh data axis (fsdp takes the rest)")
    p.add_argument("--init-timeout", type=int, default=60)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    from medusa_jax.distributed import DistributedError, maybe_initialize

    t0 = time.perf_counter()
    info = maybe_initialize(
        a.coordinator,
        a.num_processes,
        a.process_id,
        a.local_devices,
        initialization_timeout=a.init_timeout,
        heartbeat_timeout=30,
    )
    assert info.started and info.process_count == a.num_processes, info
    again = maybe_initialize(a.coordinator, a.num_processes, a.process_id)  # idempotent
    assert again.initialized and not again.started and again.process_index == a.process_id
    try:
        maybe_initialize(num_processes=a.num_processes + 1)
        raise AssertionError("a clashing second maybe_initialize() did not raise")
    except DistributedError as e:
        assert "already initialized with other settings" in str(e), e
    assert jax.process_index() == a.process_id and jax.process_count() == a.num_processes
    assert jax.local_device_count() == a.local_devices, jax.local_devices()
    mesh = make_mesh(MeshConfig(data=a.data, fsdp=-1, tensor=1))
    res = run_steps(mesh, jax.process_index(), jax.process_count())
    res.update(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        device_count=jax.device_count(),
        local_device_count=jax.local_device_count(),
        mesh_shape=dict(mesh.shape),
        backend=jax.default_backend(),
        cpu_collectives=str(jax.config.jax_cpu_collectives_implementation),
        seconds=time.perf_counter() - t0,
    )
    with open(a.out, "w") as f:
        json.dump(res, f)
    jax.distributed.shutdown()  # a barrier: every process gets here before any exits
    return 0


if __name__ == "__main__":
    sys.exit(main())
