"""The Llama-family decoder (Llama-2/3, Vicuna, Mistral, Qwen2, SmolLM2) as Flax linen modules.

Pure functions of ``(params, tokens, positions, cache, chunk_mask)``. Parameters carry logical
axis names (``medusa_jax.sharding`` maps them onto a mesh). With ``cfg.scan_layers`` the decoder
layers are one ``nn.scan`` (parameters stacked on a leading ``layers`` axis; compile time flat in
depth); otherwise they are unrolled ``layers_{i}`` (faster single-token decoding on CPU, where a
scan slices the stacked weights every step). ``stack_layers``/``unstack_layers`` convert.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.config import ModelConfig
from medusa_jax.model.attention import attention, attention_reference
from medusa_jax.model.cache import KVCache, write_chunk

_INIT = nn.initializers.normal(stddev=0.02)


def _param(mod: nn.Module, name: str, shape, axes, cfg: ModelConfig, init=_INIT):
    return mod.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(cfg.param_dtype))


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """``[H/2]`` inverse frequencies with the configured scaling (default, linear, llama3)."""
    H = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / H))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / rs.factor
    elif rs.rope_type == "llama3":
        old = rs.original_max_position_embeddings
        low_wl, high_wl = old / rs.low_freq_factor, old / rs.high_freq_factor
        wl = 2 * math.pi / inv
        scaled = np.where(wl > low_wl, inv / rs.factor, inv)
        smooth = (old / wl - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half rotary embedding. ``x: [B, T, N, H]``, ``positions: [B, T]``."""
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), self.cfg, nn.initializers.ones)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return (y * scale.astype(jnp.float32)).astype(jnp.dtype(self.cfg.dtype))


class Attention(nn.Module):
    cfg: ModelConfig
    write: bool = True

    @nn.compact
    def __call__(self, x, positions, mask, cache_kv=None, starts=None, layer_idx=None):
        """``x: [B, T, D]``. Without a cache, ``mask: [B, T, T]`` (training). With
        ``cache_kv=(k, v)`` (the stacked cache ``[L, B, K, S, H]``, or a tuple of per-layer
        buffers ``[B, K, S, H]``) the tokens attend to layer
        ``layer_idx``'s committed prefix (``starts: [B]`` slots per row) and, as ``mask``
        (``[T, T]`` / ``[B, T, T]``, None = causal) allows, to each other; then their K/V are
        written at ``starts`` (``write``) or returned apart (a Medusa tree's buffer)."""
        cfg = self.cfg
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = jnp.dtype(cfg.dtype)
        wq = _param(self, "q_proj", (D, N, H), ("embed", "heads", "head_dim"), cfg)
        wk = _param(self, "k_proj", (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
        wv = _param(self, "v_proj", (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
        wo = _param(self, "o_proj", (N, H, D), ("heads", "head_dim", "embed"), cfg)
        B, T = x.shape[:2]
        # plain 2-D products on the row-major weights: with einsum XLA:CPU copied q_proj and a
        # transposed o_proj every decode step (reshapes here are free bitcasts)
        q = (x @ wq.astype(dt).reshape(D, N * H)).reshape(B, T, N, H)
        k = (x @ wk.astype(dt).reshape(D, K * H)).reshape(B, T, K, H)
        v = (x @ wv.astype(dt).reshape(D, K * H)).reshape(B, T, K, H)
        if cfg.attention_bias:
            zeros = nn.initializers.zeros
            q = q + _param(self, "q_bias", (N, H), ("heads", "head_dim"), cfg, zeros).astype(dt)
            k = k + _param(self, "k_bias", (K, H), ("kv_heads", "head_dim"), cfg, zeros).astype(dt)
            v = v + _param(self, "v_bias", (K, H), ("kv_heads", "head_dim"), cfg, zeros).astype(dt)
        inv_freq = rope_inv_freq(cfg)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))

        new_kv = None
        if cache_kv is None:
            out = attention_reference(q, None, None, None, None, k, v, mask)
        else:
            ck, cv = cache_kv
            kv_dtype = jax.tree.leaves(ck)[0].dtype  # stacked, or one buffer per layer
            k, v = k.astype(kv_dtype), v.astype(kv_dtype)  # as stored (a bf16 cache rounds)
            if self.write:  # only the T new slots are written, in place (see write_chunk)
                ck, cv = write_chunk(ck, k, layer_idx, starts), write_chunk(cv, v, layer_idx, starts)
            out, ck, cv = attention(q, ck, cv, layer_idx, starts, k.astype(dt), v.astype(dt), mask,
                                    impl=cfg.attention_impl, new_in_cache=self.write)
            new_kv = (ck, cv, k, v)  # the caches, and the new K/V [B, T, K, H] each
        return out.reshape(B, T, N * H) @ wo.astype(dt).reshape(N * H, D), new_kv


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        D, F = cfg.hidden_size, cfg.intermediate_size
        wg = _param(self, "gate_proj", (D, F), ("embed", "mlp"), cfg)
        wu = _param(self, "up_proj", (D, F), ("embed", "mlp"), cfg)
        wd = _param(self, "down_proj", (F, D), ("mlp", "embed"), cfg)
        g, u = x @ wg.astype(dt), x @ wu.astype(dt)  # [B, T, F]
        if cfg.mlp_bias:
            zeros = nn.initializers.zeros
            g = g + _param(self, "gate_bias", (F,), ("mlp",), cfg, zeros).astype(dt)
            u = u + _param(self, "up_bias", (F,), ("mlp",), cfg, zeros).astype(dt)
        h = nn.with_logical_constraint(jax.nn.silu(g) * u, ("batch", "length", "mlp"))
        y = h @ wd.astype(dt)
        if cfg.mlp_bias:
            y = y + _param(self, "down_bias", (D,), ("embed",), cfg, nn.initializers.zeros).astype(dt)
        return y


class Block(nn.Module):
    """One decoder layer; ``__call__`` has the scan-carry signature ``(carry, layer_idx)``.
    With ``write=False`` the cache is left alone and the layer's new ``(k, v)`` come out as the
    scan output (stacked over layers by the caller)."""

    cfg: ModelConfig
    write: bool = True

    @nn.compact
    def __call__(self, carry, layer_idx):
        x, kc, vc, positions, mask, starts = carry
        cache_kv = None if kc is None else (kc, vc)  # [L, B, K, S, H]: updated in place
        h, new_kv = Attention(self.cfg, self.write, name="attn")(
            RMSNorm(self.cfg, name="attn_norm")(x), positions, mask, cache_kv, starts, layer_idx
        )
        x = x + h
        x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        out = None
        if new_kv is not None:
            kc, vc = new_kv[:2]
            out = None if self.write else new_kv[2:]
        return (x, kc, vc, positions, mask, starts), out


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class LlamaModel(nn.Module):
    """The decoder. ``__call__`` returns final-normed hidden states ``[B, T, D]`` and the cache;
    ``logits`` maps hidden states to ``[.., V]`` float32 logits (tied or separate head).
    ``write=False`` (Medusa verification): the cache is only read, and ``__call__`` returns
    ``(cache, (k, v))``: the cache, unchanged (go on with this one: it was threaded through the
    attention loops), and the new tokens' keys and values, each ``[L, B, T, K, H]``."""

    cfg: ModelConfig
    write: bool = True

    def setup(self):
        cfg = self.cfg
        self.embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
        )
        block = Block
        if cfg.remat_policy != "none":
            # unrolled: the layer index stays a Python int (it picks the layer's KV buffer);
            # static_argnums counts the module as argument 0
            block = nn.remat(Block, policy=_REMAT[cfg.remat_policy], prevent_cse=not cfg.scan_layers,
                             static_argnums=() if cfg.scan_layers else (2,))
        if cfg.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.write)
        else:
            self.layers = [block(cfg, self.write, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", nn.with_logical_partitioning(_INIT, ("embed", "vocab")),
                (cfg.hidden_size, cfg.vocab_size), jnp.dtype(cfg.param_dtype),
            )

    def __call__(self, tokens, positions=None, cache: KVCache | None = None, chunk_mask=None):
        """``tokens, positions: [B, T]``. Without a cache: a training forward (causal, or
        ``chunk_mask: [B, T, T]`` e.g. for packed segments). With a cache: the tokens are written
        at each row's length and attend to the committed prefix plus ``chunk_mask`` (``[T, T]``,
        causal when None) among themselves; ``cache.lengths`` is not advanced. (With
        ``write=False`` the second result is ``(cache, (k, v))``, see the class.)"""
        cfg = self.cfg
        B, T = tokens.shape
        if positions is None:
            base = cache.lengths[:, None] if cache is not None else 0
            positions = base + jnp.arange(T, dtype=jnp.int32)[None, :]
        x = self.embed(tokens)  # [B, T, D]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if cache is None:
            causal = jnp.tril(jnp.ones((T, T), bool))[None]
            mask = causal if chunk_mask is None else causal & chunk_mask
            mask = jnp.broadcast_to(mask, (B, T, T))
            kc = vc = starts = None
        else:
            mask = None if chunk_mask is None else jnp.asarray(chunk_mask, bool)  # [(B,) T, T]
            kc, vc, starts = cache.k, cache.v, cache.lengths
        carry = (x, kc, vc, positions, mask, starts)
        if cfg.scan_layers:
            carry, new_kv = self.layers(carry, jnp.arange(cfg.num_layers))
        else:
            outs = []
            for i, layer in enumerate(self.layers):
                carry, kv = layer(carry, i)
                outs.append(kv)
            new_kv = None if outs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
        x, kc, vc = carry[:3]
        if cache is not None:
            cache = cache.replace(k=kc, v=vc)
        if cache is not None and not self.write:
            return self.final_norm(x), (cache, new_kv)  # new_kv: ([L, B, T, K, H], same)
        return self.final_norm(x), cache

    def logits(self, hidden):
        """``hidden: [..., D]`` -> float32 logits ``[..., V]``."""
        if self.cfg.tie_word_embeddings:
            return self.embed.attend(hidden).astype(jnp.float32)
        return (hidden @ self.lm_head.astype(hidden.dtype)).astype(jnp.float32)

    def embed_tokens(self, tokens):
        return self.embed(tokens)


def forward(cfg: ModelConfig, params, tokens, positions=None, cache: KVCache | None = None,
            chunk_mask=None, *, write: bool = True):
    """``LlamaModel(cfg, write).__call__`` on ``params`` (the base model's parameter tree):
    ``(hidden [B, T, D], cache)``, or with ``write=False`` ``(hidden, (cache, (k, v)))``."""
    return LlamaModel(cfg, write=write).apply({"params": params}, tokens, positions, cache,
                                              chunk_mask)


def logits(cfg: ModelConfig, params, hidden) -> jax.Array:
    """Hidden states ``[..., D]`` -> float32 logits ``[..., V]`` through the model's output
    projection (tied or separate)."""
    return LlamaModel(cfg).apply({"params": params}, hidden, method=LlamaModel.logits)


def init_params(cfg: ModelConfig, rng=None) -> dict:
    """Random parameters (unboxed) for ``cfg`` — for tests and fresh models."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    model = LlamaModel(cfg)
    variables = model.init(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.meta.unbox(variables["params"])


def stack_layers(params: dict, num_layers: int) -> dict:
    """``layers_{i}`` -> one ``layers`` tree with a leading layer axis (for ``scan_layers``)."""
    if "layers" in params:
        return params
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    per = [params[f"layers_{i}"] for i in range(num_layers)]
    stack = np.stack if isinstance(jax.tree.leaves(per[0])[0], np.ndarray) else jnp.stack
    out["layers"] = jax.tree.map(lambda *xs: stack(xs), *per)
    return out


def unstack_layers(params: dict, num_layers: int) -> dict:
    """The inverse of ``stack_layers`` (numpy slices are views: no copy)."""
    if "layers" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
    return out


def convert_layout(params: dict, cfg: ModelConfig) -> dict:
    """Bring base params to the layer layout ``cfg.scan_layers`` expects."""
    if cfg.scan_layers:
        return stack_layers(params, cfg.num_layers)
    return unstack_layers(params, cfg.num_layers)


def lm_head_weight(params: dict, cfg: ModelConfig):
    """The base model's output projection as ``[D, V]`` (the transposed embedding when tied)."""
    return params["embed"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]
