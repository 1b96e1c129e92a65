"""The notebook-level API: load a model (and optionally Medusa heads) once, generate text.

    lm = MedusaLM.load()                       # default SmolLM2-135M-Instruct (+ shipped heads)
    out = lm.generate(["Tell me a joke."], max_new_tokens=64)
    out = lm.generate(["..."], medusa=False)   # plain decoding, same weights
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np

from medusa_jax.config import MedusaConfig, ModelConfig
from medusa_jax.decoding.common import (
    HOST_CHUNK_STEPS,
    GenerationError,
    GenerationSettings,
)
from medusa_jax.decoding.medusa import (
    check_tree,
    make_settings,
    medusa_generate,
    with_decode_projections,
)
from medusa_jax.decoding.sampling import SamplingConfig
from medusa_jax.decoding.vanilla import generate as vanilla_generate
from medusa_jax.defaults import default_dtype, default_heads_path
from medusa_jax.model.llama import convert_layout


@dataclasses.dataclass
class Generation:
    """One prompt's result."""

    text: str
    token_ids: list[int]
    num_new_tokens: int
    seconds: float
    tokens_per_second: float
    prompt_tokens: int
    compile_seconds: float = 0.0
    prefill_seconds: float = 0.0
    interrupted: bool = False
    steps: int | None = None
    mean_accepted: float | None = None
    accept_hist: list[int] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class MedusaLM:
    """A base model, its tokenizer and (optionally) Medusa heads, ready to generate."""

    def __init__(self, cfg: ModelConfig, base_params, tokenizer=None,
                 mcfg: MedusaConfig | None = None, medusa_params=None,
                 eos_token_ids: tuple[int, ...] | None = None):
        self.cfg = cfg
        self.params = {"base": jax.device_put(convert_layout(base_params, cfg))}
        self.tokenizer = tokenizer
        self.mcfg = None
        self.heads_trees: dict = {}
        if mcfg is not None:
            self.set_heads(mcfg, medusa_params)
        self.eos_token_ids = tuple(eos_token_ids if eos_token_ids is not None else cfg.eos_token_ids)
        if tokenizer is not None and eos_token_ids is None:
            from medusa_jax.tokenizer import eos_token_ids as tok_eos

            self.eos_token_ids = tok_eos(tokenizer, cfg.eos_token_ids)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self.pad_token_id = int(pad)

    @classmethod
    def load(cls, model: str | None = None, medusa: str | None = "default",
             dtype: str | None = None, scan_layers: bool = True,
             tokenizer: str | None = None) -> MedusaLM:
        """``model``: HF checkpoint dir or .gguf file (None = the default model). ``medusa``: a head
        checkpoint (any supported layout), ``"default"`` (the heads shipped for the default
        model, if any) or None. ``tokenizer``: where to take the tokenizer from when not from
        ``model`` (a checkpoint saved without tokenizer files)."""
        from medusa_jax.tokenizer import load_tokenizer
        from medusa_jax.weights import load_base_model

        model, medusa, tokenizer = resolve_sources(model, medusa, tokenizer)
        dtype = dtype or default_dtype()
        cfg, base = load_base_model(model, dtype=dtype, scan_layers=scan_layers)
        cfg = cfg.replace(dtype=dtype)  # compute in the dtype the weights were loaded in
        tok = load_tokenizer(tokenizer or model)
        lm = cls(cfg, base, tok)
        if medusa is not None:
            from medusa_jax.weights.medusa_io import load_heads

            mcfg, mp = load_heads(medusa, base_cfg=cfg)
            lm.set_heads(mcfg, mp, trees=heads_trees(medusa))
        return lm

    @classmethod
    def from_preset(cls, preset: str, medusa: str | None = "default", dtype: str | None = None,
                    scan_layers: bool = True, seed: int = 0) -> MedusaLM:
        """Random weights of a named shape (:mod:`medusa_jax.presets`), built on the device, for
        speed measurements: no EOS (nothing ends random text), the byte-level stand-in tokenizer
        (text prompts work; the output is noise). ``medusa="default"``: the heads shipped for
        the preset's shape, if any (SmolLM2's); a path; or None."""
        from medusa_jax.presets import preset_config, preset_heads, random_params
        from medusa_jax.tokenizer import byte_tokenizer_hf

        cfg = preset_config(preset, dtype, scan_layers=scan_layers)
        lm = cls(cfg, random_params(cfg, seed), byte_tokenizer_hf(), eos_token_ids=())
        if medusa == "default":
            medusa = preset_heads(preset)
        if medusa not in (None, "none", ""):
            from medusa_jax.weights.medusa_io import load_heads

            mcfg, mp = load_heads(medusa, base_cfg=cfg)
            lm.set_heads(mcfg, mp, trees=heads_trees(medusa))
        return lm

    def set_heads(self, mcfg: MedusaConfig | None, medusa_params=None,
                  trees: dict | None = None) -> None:
        """Attach (or with None, detach) Medusa heads. ``trees``: the trees chosen for these
        heads per backend (``{"cpu": ..., "gpu": ...}``, see :func:`default_tree`)."""
        self.heads_trees = dict(trees or {})
        if mcfg is None:
            self.mcfg = None
            self.params.pop("medusa", None)
            return
        mcfg.check_compatible(self.cfg)
        self.mcfg = mcfg
        self.params["medusa"] = jax.device_put(medusa_params)

    def _decode_params(self) -> dict:
        """``self.params`` with the decode loop's projections, made once per base and heads
        (a new ``params["base"]`` or new heads make them again)."""
        key = (id(self.params.get("base")), id(self.params.get("medusa")), self.mcfg)
        if getattr(self, "_decode_key", None) != key:
            self._decode_cache = with_decode_projections(self.cfg, self.mcfg, self.params)
            self._decode_key = key
        return self._decode_cache

    @property
    def has_heads(self) -> bool:
        return self.mcfg is not None

    def encode(self, prompts: str | Sequence[str | Sequence[int]], chat: bool = True
               ) -> list[list[int]]:
        """Token ids of each prompt: a text (through the chat template unless ``chat=False``)
        or a list of token ids in ``[0, vocab_size)``. A single string is one prompt."""
        from medusa_jax.tokenizer import encode_prompt

        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, bytes | bytearray) or not isinstance(prompts, Sequence):
            raise GenerationError(
                f"prompts must be a list of strings or of token-id lists, got "
                f"{type(prompts).__name__}")
        V = self.cfg.vocab_size
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise GenerationError("text prompts need a tokenizer; pass token ids instead")
                try:
                    out.append(encode_prompt(self.tokenizer, p, chat=chat))
                except ValueError as e:
                    raise GenerationError(f"prompt {i}: {e}") from None
                continue
            if isinstance(p, bytes | bytearray) or not isinstance(p, Sequence | np.ndarray):
                raise GenerationError(
                    f"prompt {i} is {type(p).__name__}: give a string or a list of token ids"
                    + (" (decode bytes to str first)" if isinstance(p, bytes | bytearray) else ""))
            ids = list(p)
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int | np.integer)]
            if bad:
                raise GenerationError(f"prompt {i}: token ids must be integers, got {bad[0]!r}")
            bad = [int(t) for t in ids if not 0 <= t < V]
            if bad:
                raise GenerationError(
                    f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {V})")
            out.append([int(t) for t in ids])
        return out

    def generate(self, prompts: str | Sequence[str | Sequence[int]], max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 medusa: bool | None = None, tree="default", acceptance=None,
                 posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
                 chat: bool = True, stream: Callable[[int, str], None] | None = None,
                 stream_every: int = 8) -> list[Generation]:
        """Generate for a batch of prompts (texts, or token-id lists; a single string is one
        prompt). ``medusa=None`` uses the heads when attached. ``acceptance`` is a rule of
        :mod:`medusa_jax.decoding.acceptance` or its name (``greedy``, ``typical``,
        ``lossless``); ``None`` is greedy at ``temperature=0`` and lossless above it (output
        distributed exactly as sampling from the model); ``"greedy"`` with ``temperature > 0``
        is refused.
        ``stream(row, new_text)`` is called as text is produced. A Ctrl-C (or a notebook's
        interrupt) stops within a few steps and returns what was generated, marked
        ``interrupted``. ``seconds`` is prefill + decode, ``tokens_per_second`` the decode rate."""
        ids = self.encode(prompts, chat=chat)
        sampling = SamplingConfig(temperature, top_p, top_k)
        gen = GenerationSettings(max_new_tokens, sampling, self.eos_token_ids, self.pad_token_id)
        use_medusa = self.has_heads if medusa is None else medusa
        if use_medusa and not self.has_heads:
            raise GenerationError("medusa=True but no Medusa heads are attached")
        acceptance = resolve_acceptance(acceptance, temperature)
        on_chunk, streamed = None, [0] * len(ids)
        if stream is not None:
            on_chunk = self._streamer(stream, streamed)
        chunk = stream_every if stream is not None else HOST_CHUNK_STEPS
        if use_medusa:
            tree = check_tree(self.default_tree(len(ids)) if tree == "default" else tree,
                              self.mcfg.num_heads, self.proposal_size)
            st = make_settings(tree, self.mcfg.num_heads, gen, proposal_size=self.proposal_size,
                               acceptance=acceptance, posterior_threshold=posterior_threshold,
                               posterior_alpha=posterior_alpha)
            res = medusa_generate(self.cfg, self.mcfg, self._decode_params(), ids, st, seed=seed,
                                  stream_every=chunk, on_chunk=on_chunk)
        else:
            res = vanilla_generate(self.cfg, self.params["base"], ids, gen, seed=seed,
                                   stream_every=chunk, on_chunk=on_chunk)
        compile_s = res["compile_seconds"]
        pre, dec = res["prefill_seconds"], res["decode_seconds"]
        if stream is not None:  # flush what the last chunk did not show
            on_chunk(None, None, final=res["tokens"])
        n_total = sum(len(t) for t in res["tokens"])
        outs = []
        for b, toks in enumerate(res["tokens"]):
            g = Generation(
                text=self.decode(toks), token_ids=toks, num_new_tokens=len(toks),
                seconds=pre + dec, tokens_per_second=n_total / dec if dec > 0 else 0.0,
                prompt_tokens=len(ids[b]), compile_seconds=round(compile_s, 3),
                prefill_seconds=pre, interrupted=bool(res["interrupted"]),
            )
            if use_medusa:
                g.steps = int(res["steps"][b])
                g.mean_accepted = float(res["mean_accepted"][b])
                g.accept_hist = np.asarray(res["accept_hist"][b]).tolist()
            outs.append(g)
        return outs

    @property
    def proposal_size(self) -> int | None:
        """How many tokens each head ranks (the draft vocabulary's size), None without heads."""
        if self.mcfg is None:
            return None
        return len(self.mcfg.draft_ids) if self.mcfg.draft_ids else self.mcfg.vocab_size

    def default_tree(self, batch: int = 1):
        """The tree the heads were shipped with for this backend (and, on accelerators, cut for
        ``batch`` rows), else a generic default (:func:`default_tree`)."""
        return default_tree(self.mcfg, self.heads_trees, batch=batch)

    def decode(self, toks: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(toks), skip_special_tokens=True)

    def _streamer(self, stream, shown):
        def on_chunk(out, n_out, final=None):
            rows = final if final is not None else [out[b, : n_out[b]].tolist() for b in range(len(shown))]
            for b, toks in enumerate(rows):
                text = self.decode(toks)
                if len(text) > shown[b]:
                    stream(b, text[shown[b]:])
                    shown[b] = len(text)

        return on_chunk


def resolve_acceptance(acceptance, temperature: float):
    """The acceptance rule to use (a name or a rule object): ``None`` picks greedy at
    temperature 0 and lossless above it (exactly the model's sampling distribution); greedy
    with a temperature is refused (it would silently decode greedily)."""
    if acceptance is None:
        return "greedy" if temperature == 0 else "lossless"
    if getattr(acceptance, "name", acceptance) == "greedy" and temperature > 0:
        raise GenerationError(
            f"greedy acceptance takes the argmax and would ignore temperature={temperature}: use "
            "acceptance='lossless' (--acceptance lossless, the default with a temperature), "
            "'typical', or temperature 0")
    return acceptance


def resolve_sources(model: str | None, medusa: str | None = "default",
                    tokenizer: str | None = None) -> tuple[str | None, str | None, str | None]:
    """``(model, heads, tokenizer)`` to load. ``medusa="default"`` means the heads that go with
    ``model``: the shipped ones for the default model (named or not), a training run's own
    heads when ``model`` is a run directory (``checkpoint.dir`` of ``train.py``: its exported
    ``base/`` if it trained one, else the base it started from), otherwise none."""
    if medusa in ("none", ""):
        medusa = None
    run = read_run_dir(model) if model is not None else None
    if run is not None:
        model = run["model"]
        tokenizer = tokenizer or run["tokenizer"]
        if medusa == "default":
            medusa = run["heads"]
    if medusa == "default":
        medusa = default_heads_path() if is_default_model(model) else None
    return model, medusa, tokenizer


def read_run_dir(path: str) -> dict | None:
    """What a training run directory holds for decoding (``model``, ``heads``, ``tokenizer``),
    or None when ``path`` is not one (no ``config.yaml`` beside its exports)."""
    import yaml

    from medusa_jax.tokenizer import has_tokenizer_files

    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    cfg_file, heads = os.path.join(path, "config.yaml"), os.path.join(path, "heads")
    if not (os.path.isfile(cfg_file) and os.path.isdir(heads)):
        return None
    try:
        with open(cfg_file) as f:
            run = yaml.safe_load(f) or {}
        m = dict(run.get("model") or {})
    except (OSError, yaml.YAMLError, TypeError, ValueError) as e:
        raise GenerationError(f"cannot read the run config {cfg_file}: {e}") from None
    base = os.path.join(path, "base")
    trained_base = os.path.isfile(os.path.join(base, "config.json"))
    if not trained_base and m.get("tiny"):
        raise GenerationError(
            f"{path} trained heads on a random tiny model that it did not export: nothing to "
            "decode (rerun it with this version, which exports base/)")
    model = base if trained_base else m.get("path")
    tok = m.get("tokenizer")
    if trained_base and has_tokenizer_files(base):
        tok = None
    elif tok is None or tok == "bytes":
        tok = m.get("path")
    return {"model": model, "heads": heads, "tokenizer": tok}


def is_default_model(model: str | None) -> bool:
    """Whether ``model`` (None = default) is the default model's file (the shipped heads fit)."""
    if model is None:
        return True
    from medusa_jax.tokenizer import default_model_path

    try:
        default = default_model_path()
    except FileNotFoundError:
        return False
    path = os.path.expanduser(os.fspath(model))
    return os.path.exists(path) and os.path.samefile(path, default)


def heads_trees(path: str) -> dict:
    """The per-backend trees stored with heads in our format (metadata ``"trees"``), else {}."""
    from medusa_jax.weights.errors import CheckpointError
    from medusa_jax.weights.medusa_io import read_heads_metadata

    try:
        trees = read_heads_metadata(path).get("trees")
    except CheckpointError:  # another layout (v1, HF): no metadata
        return {}
    return dict(trees) if isinstance(trees, dict) else {}


# Tree tokens x batch rows an accelerator verifies at about the cost of a plain step: a 7B
# decoder step stays memory-bound (it reads each weight once) up to about peak FLOP/s over
# bandwidth, ~240 rows on a v5e, ~166 on a v5p, ~184 on an H200 (bf16), less the attention's
# share (benchmarks/results/step_cost.md).
ACCELERATOR_ROWS = 128


def default_tree(mcfg: MedusaConfig, trees: dict | None = None, backend: str | None = None,
                 batch: int = 1):
    """The tree to decode with: ``trees["cpu"]`` on a CPU and ``trees["gpu"]`` elsewhere when
    the heads came with them (chosen for the hardware, e.g. by ``benchmarks/choose_tree.py``);
    otherwise a 4-node tree on a CPU, where a verification forward over many nodes costs several
    plain steps, and ``mc_sim_7b_63`` on accelerators, where it costs about one. On
    accelerators the tree is cut for the batch so that nodes x rows stay within
    :data:`ACCELERATOR_ROWS` (a 64-node tree at batch 8 would be compute-bound)."""
    from medusa_jax.tree import chain_tree, get_tree, trim_tree

    backend = backend or jax.default_backend()
    key = "cpu" if backend == "cpu" else "gpu"
    if trees and trees.get(key):
        tree = trees[key]
    elif key == "cpu":
        tree = [[0], [1], [0, 0], [0, 0, 0]] if mcfg.num_heads >= 3 else chain_tree(mcfg.num_heads)
    else:
        tree = "mc_sim_7b_63" if mcfg.num_heads >= 4 else chain_tree(mcfg.num_heads)
    if key == "cpu":
        return tree
    full = get_tree(tree)
    paths = [p for p in full if len(p) <= mcfg.num_heads]
    budget = max(2, ACCELERATOR_ROWS // max(batch, 1))
    if len(paths) == len(full) and 1 + len(paths) <= budget:
        return tree  # nothing to cut: keep the name
    return trim_tree(paths, budget)
