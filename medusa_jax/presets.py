"""Random-weight models of a named shape, built on the device: for measuring speed where no
checkpoint can travel (an accelerator lent for minutes, a CI runner).

    cfg = preset_config("llama2-7b")            # bf16 off the CPU, float32 on it
    params = random_params(cfg)                 # a jitted init: the weights never touch the host

The weights are random (normal, std 0.02), so the text is noise and nothing ends it: the
presets carry no EOS token. ``smollm2-135m`` has the shape of the default model, so the heads
shipped for it (:func:`preset_heads`) load onto it and propose (their proposals mean nothing on
random weights, but they cost what they cost).
"""

from __future__ import annotations

import functools

from medusa_jax.config import ConfigError, ModelConfig, tiny_config  # no jax: decode.py's --help
from medusa_jax.defaults import default_dtype, default_heads_path

# Shapes only (no EOS: random text has no end).
PRESETS: dict[str, dict] = {
    # Llama-2-7B / Vicuna-7B: the Medusa paper's main model
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, bos_token_id=1, pad_token_id=0),
    # SmolLM2-135M-Instruct, the default model (the shipped heads fit it)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                         rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=1, pad_token_id=2),
    # the test suite's tiny shape (CPU smoke runs)
    "tiny": dict(),
}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def preset_config(name: str, dtype: str | None = None, **overrides) -> ModelConfig:
    """The config of preset ``name`` with weights and compute in ``dtype`` (default: bf16 on
    accelerators, float32 on a CPU). ``overrides``: other ModelConfig fields."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    if dtype is None:
        dtype = default_dtype()
    kw = dict(PRESETS[name], eos_token_ids=(), param_dtype=dtype, dtype=dtype)
    kw.update(overrides)
    if name == "tiny":
        return tiny_config(**kw)
    return ModelConfig(**kw)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random base parameters for ``cfg``, made on the default device (a 7B model in bf16 is
    13.5 GB there and nothing on the host): normal with std 0.02, norm scales one, biases zero,
    as the model's own initializers give, but leaf by leaf from the parameter shapes alone. The
    model's ``init`` also runs (and so compiles) a whole forward pass: on an H200 that took 98 s
    for the 7B shape and 151 s for SmolLM2's (autotuning every unrolled layer's products), on
    this CPU 23 s for SmolLM2's; this takes seconds."""
    import jax

    shapes = _param_shapes(cfg)
    key = jax.random.PRNGKey(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        name = str(getattr(path[-1], "key", path[-1]))
        kind = "ones" if name == "scale" else "zeros" if name.endswith("bias") else "normal"
        out.append(_leaf(kind, tuple(leaf.shape), str(leaf.dtype))(jax.random.fold_in(key, i)))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=8)
def _param_shapes(cfg: ModelConfig):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from medusa_jax.model.llama import LlamaModel

    def init(key):
        variables = LlamaModel(cfg).init(key, jnp.zeros((1, 1), jnp.int32))
        return nn.meta.unbox(variables["params"])

    return jax.eval_shape(init, jax.random.PRNGKey(0))  # traced, never compiled


@functools.lru_cache(maxsize=64)
def _leaf(kind: str, shape: tuple[int, ...], dtype: str):
    import jax
    import jax.numpy as jnp

    def make(key):
        if kind == "ones":
            return jnp.ones(shape, dtype)
        if kind == "zeros":
            return jnp.zeros(shape, dtype)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return jax.jit(make)


def preset_heads(name: str) -> str | None:
    """The Medusa heads shipped for preset ``name``'s shape (SmolLM2's), else None."""
    if name != "smollm2-135m":
        return None
    return default_heads_path()
