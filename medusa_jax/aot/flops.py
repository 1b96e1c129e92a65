"""Model FLOPs of a train step and of a verification step, by the usual MFU convention
(matmuls only; backward = 2x forward; rematerialisation not counted)."""

from __future__ import annotations

from medusa_jax.config import MedusaConfig, ModelConfig


def _forward_flops_per_token(cfg: ModelConfig, context: int, logits: bool = True) -> float:
    """Matmul FLOPs of one token's base forward attending to ``context`` positions (the
    attention is counted as computed: over all ``context`` slots, masked or not)."""
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = L * (D * H * (N + 2 * K) + N * H * D + 3 * D * F)
    attn = L * 2 * context * N * H  # q.k and p.v
    return 2.0 * dense + 2.0 * attn + (2.0 * D * V if logits else 0.0)


def _heads_flops_per_token(cfg: ModelConfig, mcfg: MedusaConfig) -> float:
    D, V = cfg.hidden_size, cfg.vocab_size
    return mcfg.num_heads * (mcfg.num_layers * 2.0 * D * D + 2.0 * D * V)


def train_flops(cfg: ModelConfig, mcfg: MedusaConfig, tcfg) -> float:
    """Model FLOPs of one train step (all devices): backward = 2x forward, rematerialisation not
    counted (the usual MFU convention). Medusa-2: base and heads forward + backward, plus the
    frozen teacher's forward with ``kd``. Medusa-1: the base forward only (no logits), the heads
    forward + backward (the shared LM head's weight gets no gradient)."""
    T = tcfg.seq_len
    tokens = tcfg.batch_size * T
    heads = _heads_flops_per_token(cfg, mcfg)
    if tcfg.mode == "medusa2":
        per = 3 * _forward_flops_per_token(cfg, T) + 3 * heads
        if tcfg.kd:
            per += _forward_flops_per_token(cfg, T)
    else:
        D, V = cfg.hidden_size, cfg.vocab_size
        res = mcfg.num_heads * mcfg.num_layers * 2.0 * D * D
        proj = mcfg.num_heads * 2.0 * D * V
        per = _forward_flops_per_token(cfg, T, logits=False) + 3 * res
        per += (3 if not mcfg.shared_lm_head else 2) * proj
    return per * tokens


def decode_flops(cfg: ModelConfig, mcfg: MedusaConfig, batch: int, cache_len: int,
                 tree_nodes: int) -> float:
    """Model FLOPs of one verification step: the base over the ``tree_nodes`` tree tokens
    (attending to the whole cache, as computed) plus the heads' proposal at one position."""
    return batch * (
        tree_nodes * _forward_flops_per_token(cfg, cache_len) + _heads_flops_per_token(cfg, mcfg)
    )
