"""The command line (``python -m medusa_jax.aot``, ``train.py compile``) and the model configs
it compiles: :func:`model_from_run_config` from a training config, with :data:`MODEL_PRESETS`
for models whose weights are not here."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax

from medusa_jax.aot.decode import compile_decode
from medusa_jax.aot.report import AOTError
from medusa_jax.aot.topology import get_topology
from medusa_jax.aot.train import compile_train
from medusa_jax.config import MedusaConfig, ModelConfig
from medusa_jax.errors import MedusaError

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Llama-2-7B / Vicuna-7B (same architecture)
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, max_position_embeddings=4096),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                       num_heads=40, num_kv_heads=40, max_position_embeddings=4096),
}
MODEL_PRESETS["vicuna-7b"] = MODEL_PRESETS["llama2-7b"]
MODEL_PRESETS["vicuna-13b"] = MODEL_PRESETS["llama2-13b"]


def model_from_run_config(run_cfg, model: str | None = None) -> tuple[ModelConfig, MedusaConfig]:
    """The ``ModelConfig`` and ``MedusaConfig`` a run config trains, with its dtypes, scan and
    remat settings, without loading any weight. ``model`` overrides ``model.path``: a preset
    (``llama2-7b``, ``vicuna-7b``, ``llama2-13b``, ``vicuna-13b``, ``tiny``), a ``config.json``
    or a Hugging Face checkpoint directory."""
    from medusa_jax.training.setup import medusa_config, model_config, model_settings

    m = run_cfg.model
    if model in MODEL_PRESETS:
        cfg = ModelConfig(**MODEL_PRESETS[model], **model_settings(run_cfg))
        return cfg, medusa_config(run_cfg, cfg)
    if model == "tiny":
        run_cfg = run_cfg.replace(model=dataclasses.replace(m, tiny=True, path=None))
    elif model is not None:
        run_cfg = run_cfg.replace(model=dataclasses.replace(m, tiny=False, path=model))
    src = run_cfg.model.path
    if not run_cfg.model.tiny:
        path = src if src is None else (
            os.path.join(src, "config.json") if os.path.isdir(src) else src)
        if path is None or not path.endswith(".json") or not os.path.isfile(path):
            raise AOTError(
                f"cannot read the model's shape from {src!r} (model.path): give --model a "
                f"preset ({', '.join([*MODEL_PRESETS, 'tiny'])}), a config.json or a Hugging "
                "Face checkpoint directory"
            )
    cfg = model_config(run_cfg)
    return cfg, medusa_config(run_cfg, cfg)


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m medusa_jax.aot",
        description="Compile the Medusa train step and decoding loop ahead of time for a TPU "
        "topology (no TPU needed: libtpu's compiler runs here) and report per-chip memory, "
        "compile time and model FLOPs.",
    )
    p.add_argument("--config", help="a training config YAML (as for train.py)")
    p.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5e:4x4, v5p:4x4x4")
    p.add_argument("--model", help="model preset (llama2-7b, vicuna-7b, llama2-13b, "
                   "vicuna-13b, tiny), config.json or HF checkpoint dir; default: the config's "
                   "model.path / model.tiny")
    p.add_argument("--what", choices=("train", "decode", "both"), default="train")
    p.add_argument("--unpacked", action="store_true",
                   help="batches without segment_ids/positions (data.mode=pad)")
    p.add_argument("--decode-batch", type=int, default=1, help="rows decoded together")
    p.add_argument("--cache-len", type=int, default=2048, help="KV cache slots per row")
    p.add_argument("--tree", help="Medusa tree (name or JSON file); default: mc_sim_7b_63 "
                   "(64 nodes), cut to the heads' depth")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--weight-layout", choices=("default", "auto"), default="default",
                   help="decode: weights row-major (default, as medusa_generate passes them) or "
                   "in layouts the compiler picks (auto)")
    p.add_argument("--json", help="also write the report(s) as JSON here")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. "
                   "mesh.tensor=4 model.remat_policy=full train.batch_size=16")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: exit 0 when everything fits, 1 when something does not fit (the
    message says what would), 2 for a bad topology, mesh or config."""
    import json

    from medusa_jax.training.run_config import load_run_config

    args = _parse_args(argv)
    if os.environ.get("JAX_PLATFORMS") is None:
        # nothing runs here, only compiles: keep JAX from trying to start a TPU runtime
        jax.config.update("jax_platforms", "cpu")
    try:
        run_cfg = load_run_config(args.config, args.overrides)
        cfg, mcfg = model_from_run_config(run_cfg, args.model)
        topo = get_topology(args.topology)
        reports = []
        if args.what in ("train", "both"):
            reports.append(compile_train(cfg, mcfg, run_cfg.train, topo, run_cfg.mesh,
                                         packed=not args.unpacked))
        if args.what in ("decode", "both"):
            reports.append(compile_decode(cfg, mcfg, topo, run_cfg.mesh,
                                          batch_size=args.decode_batch, cache_len=args.cache_len,
                                          tree=args.tree, max_new_tokens=args.max_new_tokens,
                                          weight_layout=args.weight_layout))
    except MedusaError as e:  # bad input; anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in reports:
        print(r.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in reports], f, indent=1, default=str)
    bad = [r for r in reports if not r.fits]
    for r in bad:
        print(f"error: {r.error}", file=sys.stderr)
    return 1 if bad else 0

