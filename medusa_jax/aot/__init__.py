"""Ahead-of-time compilation for real TPU topologies, on any machine with ``libtpu`` installed.

``jax.experimental.topologies.get_topology_desc("v5e:4x4", platform="tpu")`` describes the
chips of a TPU slice without owning one. A mesh over those devices, shardings from our logical
axis rules and abstract inputs (``jax.ShapeDtypeStruct`` with a sharding: nothing is
materialised) are enough for ``jax.jit(fn).lower(...).compile()`` to run the real TPU compiler
here, on a CPU. The compiled program then reports its per-chip memory, and a program that does
not fit fails with the compiler's own out-of-memory message, which we turn into a
"does not fit: needs X GiB per chip, chip has Y GiB; try ..." :class:`AOTError`.

What is compiled is our real code: the Medusa-1/2 train step (``training.step``: the loss, the
gradients and the optimizer update, sharded by ``sharding.LOGICAL_AXIS_RULES``, the state
donated) and the Medusa tree-decoding loop (``decoding.medusa.medusa_decode``: the whole
``lax.while_loop`` of verification steps over a KV cache of ``cache_len`` slots).

    python -m medusa_jax.aot --config configs/vicuna7b_medusa2_pod.yaml --model llama2-7b \\
        --topology v5p:2x2x1 train.batch_size=4
    python -m medusa_jax.aot --config configs/vicuna7b_medusa2_pod.yaml --model llama2-7b \\
        --topology v5e:2x2 --what decode mesh.fsdp=1 mesh.tensor=4 model.param_dtype=bfloat16

A multi-host topology (``v5p:4x4x4``: 16 hosts) compiles from this one process: the devices of
every host are in the description. Run with ``JAX_PLATFORMS=cpu`` so that JAX itself does not try
to start a TPU runtime; the topology API loads ``libtpu`` on its own.

The package's modules: :mod:`~medusa_jax.aot.topology` (topology -> devices -> mesh),
:mod:`~medusa_jax.aot.report` (the report, and compiling into it), :mod:`~medusa_jax.aot.flops`
(model FLOPs), :mod:`~medusa_jax.aot.train` and :mod:`~medusa_jax.aot.decode` (the two programs)
and :mod:`~medusa_jax.aot.command` (the command line). Their public names are all here.
"""

from medusa_jax.aot.command import MODEL_PRESETS, main, model_from_run_config
from medusa_jax.aot.decode import DEFAULT_TREE, abstract_decode_inputs, compile_decode
from medusa_jax.aot.flops import decode_flops, train_flops
from medusa_jax.aot.report import AOTError, AOTReport, GiB, entry_relayout_bytes, parse_oom
from medusa_jax.aot.topology import (
    CHIPS,
    TOPOLOGY_EXAMPLES,
    Topology,
    get_topology,
    libtpu_available,
    topology_mesh,
)
from medusa_jax.aot.train import abstract_train_inputs, compile_train

__all__ = [
    "CHIPS", "DEFAULT_TREE", "MODEL_PRESETS", "TOPOLOGY_EXAMPLES", "AOTError", "AOTReport",
    "GiB", "Topology", "abstract_decode_inputs", "abstract_train_inputs", "compile_decode",
    "compile_train", "decode_flops", "entry_relayout_bytes", "get_topology", "libtpu_available",
    "main", "model_from_run_config", "parse_oom", "topology_mesh", "train_flops",
]
