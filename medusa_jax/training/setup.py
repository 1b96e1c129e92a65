"""What both trainers (:class:`~medusa_jax.training.loop.Trainer` and
:func:`~medusa_jax.training.cached.train_cached`) build and write the same way, so neither
needs the other: the run config's base model (:func:`model_config`, :func:`build_base`) and
head config (:func:`medusa_config`, with a draft vocabulary from :func:`choose_draft_ids`), the
fresh head set training starts from (:func:`fresh_heads`), the metrics log
(:class:`MetricsLog`) and the exports (:func:`export_run`).

    model_cfg, base = build_base(run_cfg)
    mcfg = medusa_config(run_cfg, model_cfg)
    heads = fresh_heads(mcfg, model_cfg, base)      # host arrays, ready to shard
"""

from __future__ import annotations

import json
import logging
import os

import flax.linen as nn
import jax
import numpy as np

from medusa_jax.config import ConfigError, MedusaConfig, ModelConfig, tiny_config
from medusa_jax.model.heads import fresh_medusa_params
from medusa_jax.model.llama import LlamaModel, lm_head_weight
from medusa_jax.training.run_config import RunConfig, RunPaths

log = logging.getLogger("medusa_jax.train")


# ------------------------------------------------------------------------------------------
# The base model and the heads' config
# ------------------------------------------------------------------------------------------


def model_settings(run_cfg: RunConfig) -> dict:
    """The ``ModelConfig`` fields a run config sets whatever the model: compute and parameter
    dtypes, the layer layout and the rematerialisation policy."""
    m = run_cfg.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                remat_policy=m.remat_policy)


def model_config(run_cfg: RunConfig) -> ModelConfig:
    """The base model's config as the run trains it, without reading any weight: the tiny
    random model's (``model.tiny``) or the one in ``model.path``'s ``config.json`` (a Hugging
    Face checkpoint directory or the file itself), with :func:`model_settings` applied. A .gguf
    file or the default model (``model.path`` None) is read with its weights by
    :func:`build_base`; here it is a ConfigError."""
    m = run_cfg.model
    if m.tiny:
        return tiny_config(
            vocab_size=m.tiny_vocab_size, hidden_size=m.tiny_hidden_size,
            intermediate_size=2 * m.tiny_hidden_size,
            max_position_embeddings=max(256, run_cfg.train.seq_len), **model_settings(run_cfg),
        )
    if m.path is None or not (os.path.isdir(m.path) or m.path.endswith(".json")):
        raise ConfigError(f"model.path={m.path!r}: the model's shape is read from a config.json "
                          "or a Hugging Face checkpoint directory")
    return ModelConfig.from_hf_config(m.path, **model_settings(run_cfg))


def _tiny_params(cfg: ModelConfig, seed: int) -> dict:
    """Random host parameters for a tiny model: N(0, 0.02) weights, unit norm scales, zero
    biases. Filled with numpy from the abstract shapes, so nothing is compiled."""
    rng = np.random.default_rng(seed)
    model = LlamaModel(cfg)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                          jax.numpy.zeros((1, 1), jax.numpy.int32))["params"])

    def one(path, x):
        name = str(path[-1].key)
        if name == "scale":
            return np.ones(x.shape, x.dtype)
        if name == "bias":
            return np.zeros(x.shape, x.dtype)
        return (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(one, shapes)


def build_base(run_cfg: RunConfig) -> tuple[ModelConfig, dict]:
    """The base model's config and host (numpy) parameters: loaded from ``model.path`` (None:
    the default model) or, with ``model.tiny``, random from ``train.seed``."""
    m = run_cfg.model
    if m.tiny:
        cfg = model_config(run_cfg)
        params = _tiny_params(cfg, run_cfg.train.seed)
    else:
        from medusa_jax.weights import load_base_model

        cfg, params = load_base_model(m.path, dtype=m.param_dtype, scan_layers=m.scan_layers)
        cfg = cfg.replace(**model_settings(run_cfg))
    if run_cfg.train.seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"train.seq_len={run_cfg.train.seq_len} exceeds the model's "
                          f"max_position_embeddings={cfg.max_position_embeddings}")
    return cfg, params


def medusa_config(run_cfg: RunConfig, model_cfg: ModelConfig,
                  draft_ids: tuple[int, ...] | None = None) -> MedusaConfig:
    """The heads the run's ``medusa`` section describes, on ``model_cfg``; ``draft_ids``: their
    draft vocabulary (:func:`choose_draft_ids` on the training targets), if any."""
    h = run_cfg.medusa
    return MedusaConfig.for_model(model_cfg, num_heads=h.num_heads, num_layers=h.num_layers,
                                  shared_lm_head=h.shared_lm_head, param_dtype=h.param_dtype,
                                  draft_ids=draft_ids, head_type=h.head_type)


def choose_draft_ids(tokens: np.ndarray, size: int, vocab_size: int,
                     always: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The ``size`` most frequent ids of ``tokens`` (ties to the lower id), plus ``always``
    (e.g. the end-of-turn token), sorted. Ids never seen fill up the set only if the data has
    fewer than ``size`` distinct tokens (then the set is just the seen ones plus ``always``)."""
    if size < 1:
        raise ConfigError(f"draft vocabulary size must be >= 1, got {size}")
    tokens = np.asarray(tokens).reshape(-1)
    tokens = tokens[(tokens >= 0) & (tokens < vocab_size)]
    counts = np.bincount(tokens, minlength=vocab_size)
    for a in always:
        counts[a] = np.iinfo(counts.dtype).max  # first in line
    order = np.lexsort((np.arange(vocab_size), -counts))  # count desc, id asc
    chosen = order[: min(size, vocab_size)]
    chosen = chosen[counts[chosen] > 0]
    return tuple(int(i) for i in np.sort(chosen))


def fresh_heads(mcfg: MedusaConfig, model_cfg: ModelConfig, base: dict) -> dict:
    """The head set both trainers start from, as host arrays
    (:func:`~medusa_jax.model.heads.fresh_medusa_params`): a fresh head is the base LM head;
    own LM heads start as copies of ``base``'s."""
    lm = None if mcfg.shared_lm_head else lm_head_weight(base, model_cfg)
    return fresh_medusa_params(mcfg, lm)


# ------------------------------------------------------------------------------------------
# Metrics and exports
# ------------------------------------------------------------------------------------------


class MetricsLog:
    """JSONL lines (and optional TensorBoard scalars under ``tb_dir``), written only when
    ``enabled`` (process 0). ``append=False`` starts the file afresh (a run that never
    resumes)."""

    def __init__(self, path: str, enabled: bool, tb_dir: str | None, append: bool = True):
        self.f = None
        self.tb = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.f = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 (close())
        if tb_dir:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    SummaryWriter = None
            if SummaryWriter is None:
                log.warning("log.tensorboard=true needs tensorboardX or tensorboard: skipped")
            else:
                self.tb = SummaryWriter(tb_dir)

    def write(self, record: dict) -> None:
        if self.f is None:
            return
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None:
            prefix = "eval/" if record.get("kind") == "eval" else "train/"
            for k, v in record.items():
                vals = v if isinstance(v, list) else [v]
                for i, x in enumerate(vals):
                    if isinstance(x, int | float) and not isinstance(x, bool) and k != "step":
                        name = f"{prefix}{k}" + (f"/{i}" if isinstance(v, list) else "")
                        self.tb.add_scalar(name, x, record["step"])

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def export_run(run_cfg: RunConfig, paths: RunPaths, mcfg: MedusaConfig, model_cfg: ModelConfig,
               heads: dict, base: dict, metadata: dict, *, with_base: bool = False) -> dict:
    """Write a run's exports from host arrays (on process 0 only; elsewhere returns ``{}``):
    the heads in our format with ``metadata`` (plus ``base_model``); the base as a complete
    Hugging Face checkpoint with its tokenizer when ``with_base`` (a trained base) or on a tiny
    random model (which exists nowhere else), so the run directory decodes with ``decode.py
    --model RUN``; and, with ``export.v1``, the original Medusa layout (not for Hydra heads).
    Returns the written paths by name (``heads``, ``base``, ``heads_v1``)."""
    if jax.process_index() != 0:
        return {}
    from medusa_jax.training.prepare import load_run_tokenizer
    from medusa_jax.weights import save_hf_checkpoint
    from medusa_jax.weights.medusa_io import export_v1, save_heads

    m = run_cfg.model
    base_name = "" if m.tiny else (m.path or "default")
    out = {"heads": save_heads(paths.heads, mcfg, heads, {"base_model": base_name, **metadata})}
    if with_base or m.tiny:
        save_hf_checkpoint(model_cfg, base, paths.base, tokenizer=load_run_tokenizer(run_cfg))
        out["base"] = base_name = paths.base
    if run_cfg.export.v1 and mcfg.is_hydra:
        log.info("no Medusa v1 export: that layout cannot hold Hydra heads")
    elif run_cfg.export.v1:
        lm = lm_head_weight(base, model_cfg) if mcfg.shared_lm_head else None
        out["heads_v1"] = export_v1(paths.heads_v1, mcfg, heads, base_lm_head=lm,
                                    base_model_name_or_path=base_name)
    return out
