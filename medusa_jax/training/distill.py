"""Self-distillation: the base model answers the user turns of a conversation set.

Medusa heads learn best from the base model's own outputs. This module takes the prompts (user
turns, plus a leading system turn) of a ShareGPT-style file, has the model answer them with the
batched jitted decoding loop, and writes JSONL in the same form::

    {"id": "QWJhYvA_0", "conversations": [{"from": "human", "value": "..."},
                                          {"from": "gpt", "value": "<the model's answer>"}],
     "truncated": false}

Multi-turn conversations are answered turn by turn with the model's own earlier answers in the
context (the original assistant answers are discarded). ``truncated`` is true when an answer
stopped at ``max_new_tokens`` without an end-of-turn token.

The run is resumable: finished conversations are appended (and flushed) batch by batch, and a
rerun skips the ids already in the output, ignoring a half-written last line. A run that
overwrites (``resume=False``) writes a temporary file and renames it over the output only when
it completes, and a source without one usable conversation is refused before the output (or,
in :func:`distill`, the model) is touched: an existing output is never lost to a bad run.

Batches are planned from the source alone (the first ``max_conversations`` usable conversations,
sorted by prompt length within windows, cut into groups of ``batch_size``), so an interrupted
and resumed run computes exactly the batches an uninterrupted one would; with greedy decoding
(or a fixed seed) the final file is the same byte for byte.

    summary = distill(None, None, "distilled.jsonl", max_conversations=1000)
    # or, with a model already in memory:
    Distiller(cfg, params, tokenizer).run(path_or_records, "out.jsonl", batch_size=16)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from medusa_jax.config import ConfigError, ModelConfig
from medusa_jax.decoding.common import GenerationSettings
from medusa_jax.decoding.sampling import SamplingConfig
from medusa_jax.decoding.vanilla import generate as vanilla_generate
from medusa_jax.errors import DataError
from medusa_jax.model.llama import convert_layout
from medusa_jax.tokenizer import apply_chat_template
from medusa_jax.tokenizer import eos_token_ids as tokenizer_eos_ids
from medusa_jax.training.data.conversations import normalize_conversation
from medusa_jax.training.data.sources import DataReport, iter_raw_records, sharegpt_path
from medusa_jax.training.distill_refill import hidden_path, open_hidden, refill_pass
from medusa_jax.training.files import check_output_file, read_done_ids, replace_file

_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}
DEFAULT_MAX_PROMPT_TOKENS = 512
OUT_WHAT = "the distillation output (--out)"  # how path errors name the output


@dataclasses.dataclass
class _Conv:
    """One conversation on its way through the model."""

    id: str
    system: list[dict[str, str]]  # [] or the one leading system message
    users: list[str]  # the user turns to answer (at most max_turns)
    first_len: int  # tokens of the first prompt (for sorting)
    done: bool = False  # already in the output file: computed only to reproduce its batch
    answers: list[str] = dataclasses.field(default_factory=list)
    truncated: bool = False
    active: bool = True  # more turns to answer
    failed: str | None = None  # skip reason when even the first turn could not be answered

    def messages(self, turn: int) -> list[dict[str, str]]:
        """The chat up to and including user turn ``turn``, with our own earlier answers."""
        msgs = list(self.system)
        for user, answer in zip(self.users[:turn], self.answers[:turn], strict=True):
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return msgs + [{"role": "user", "content": self.users[turn]}]

    def record(self) -> dict[str, Any]:
        turns = [{"from": "system", "value": m["content"]} for m in self.system]
        for user, answer in zip(self.users, self.answers, strict=False):
            turns += [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
        return {"id": self.id, "conversations": turns, "truncated": self.truncated}


class Distiller:
    """A loaded base model + tokenizer that answers conversation prompts in fixed-size batches.

    ``params`` are the base parameters (any layer layout; moved to the device once).
    ``eos_token_ids`` default to the model's plus the tokenizer's end-of-turn tokens."""

    def __init__(self, cfg: ModelConfig, params, tokenizer, *,
                 eos_token_ids: Sequence[int] | None = None, pad_token_id: int | None = None):
        self.cfg = cfg
        self.params = jax.device_put(convert_layout(params, cfg))
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            eos_token_ids = tokenizer_eos_ids(tokenizer, cfg.eos_token_ids)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        if pad_token_id is None:
            pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self.pad_token_id = int(pad_token_id)
        # the refill engine's KV cache layout (None: KVCache.init's default, a buffer per layer
        # for unrolled layers; False: one stack, the layout before, for side-by-side benchmarks)
        self.kv_per_layer: bool | None = None

    @classmethod
    def from_lm(cls, lm) -> Distiller:
        """Reuse a loaded :class:`medusa_jax.api.MedusaLM` (its base model and tokenizer)."""
        return cls(lm.cfg, lm.params["base"], lm.tokenizer, eos_token_ids=lm.eos_token_ids,
                   pad_token_id=lm.pad_token_id)

    # ---------------------------------------------------------------------------- generation
    def generate_batch(self, prompts: list[list[int]], settings: GenerationSettings,
                       batch_size: int, seed: int,
                       counts: collections.Counter | None = None) -> list[list[int]]:
        """New tokens (EOS included when hit) for up to ``batch_size`` token-id prompts.
        ``counts`` (optional) gains the call's ``decode_steps`` and ``busy_row_steps`` (decode
        steps of the real rows that produced one of their tokens: the first comes from the
        prefill).

        The batch is filled up to ``batch_size`` rows with copies of the shortest prompt so
        every call has the same batch shape (one compilation per prompt-length bucket) and
        the filler neither raises the length bucket nor, under greedy decoding, runs longer
        than a real row."""
        n = len(prompts)
        if not 0 < n <= batch_size:
            raise ValueError(f"got {n} prompts for a batch of {batch_size}")
        filler = min(prompts, key=len)
        rows = list(prompts) + [filler] * (batch_size - n)
        out = vanilla_generate(self.cfg, self.params, rows, settings, seed=seed)
        if counts is not None:
            counts["decode_steps"] += out["steps"] - 1
            counts["busy_row_steps"] += sum(max(len(t) - 1, 0) for t in out["tokens"][:n])
        return out["tokens"][:n]

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat ending in a user turn, plus the assistant generation prompt."""
        return apply_chat_template(self.tokenizer, messages)

    # ----------------------------------------------------------------------------------- run
    def run(self, source: str | os.PathLike | Iterable[Mapping] | None, out_path: str | os.PathLike,
            *, max_conversations: int | None = None, max_turns: int = 1,
            max_new_tokens: int = 256, max_prompt_tokens: int | None = None,
            temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
            sort_window: int = 1024, resume: bool = True, progress: bool = True,
            engine: str = "batch", keep_hidden: bool = False) -> dict:
        """Answer the conversations of ``source`` (a JSON/JSONL/parquet path, raw records, or
        None for the packaged ShareGPT) and append them to ``out_path`` (JSONL).

        ``max_conversations``: how many usable conversations of the source make up the run
        (those already in ``out_path`` count). ``max_turns``: user turns answered per
        conversation. ``max_prompt_tokens`` (default ``min(512, context - max_new_tokens)``): a
        conversation whose first prompt is longer is skipped; a later turn that is longer ends
        the conversation before it. ``temperature=0`` is greedy. ``sort_window``: conversations
        are sorted by prompt length within windows of this many, so batches have similar
        lengths. ``resume=False`` overwrites ``out_path`` (through a temporary file renamed over
        it at the end: an interrupted run leaves the old file as it was). ``engine="refill"``
        keeps the batch full (continuous batching, :mod:`medusa_jax.training.distill_refill`);
        ``keep_hidden`` (refill only) also writes the base's hidden states for cached training.

        ValueError (before ``out_path`` is touched) for a source without a usable conversation
        and for an ``out_path`` that is a directory.

        Returns a summary: ``written``, ``skipped`` (reason -> count; ``already_done`` for
        resumed ids), ``turns_dropped`` (reason -> count), ``turns_answered``,
        ``truncated_answers``, ``tokens_generated``, ``seconds``, ``conversations_per_second``,
        ``tokens_per_second``, ``batches``, ``row_occupancy`` (of the batch rows the decode steps
        computed, the share that held a live answer; None when no step ran),
        ``queue_tokens_per_second`` and ``queue_token_share`` (refill engine: the rate until its
        queue first ran empty, every row busy, and the share of the tokens drawn by then; None
        for the batch engine) and ``source`` (the input's read report)."""
        t_start = time.perf_counter()
        ctx = self.cfg.max_position_embeddings
        out_path = check_output_file(out_path, OUT_WHAT)
        for name, v in (("max_turns", max_turns), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size), ("sort_window", sort_window)):
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        # 0 would select nothing: with resume=False, an emptied output and nothing else
        if max_conversations is not None and not (
                isinstance(max_conversations, int) and max_conversations >= 1):
            raise ConfigError(f"max_conversations must be an integer >= 1 or None, got "
                              f"{max_conversations!r}")
        if engine not in ("batch", "refill"):
            raise ConfigError(f"engine must be 'batch' or 'refill', got {engine!r}")
        if keep_hidden and engine != "refill":
            raise ConfigError("keep_hidden needs engine='refill'")
        if max_prompt_tokens is None:
            max_prompt_tokens = min(DEFAULT_MAX_PROMPT_TOKENS, ctx - max_new_tokens)
        if max_prompt_tokens < 1 or max_prompt_tokens + max_new_tokens > ctx:
            raise ConfigError(
                f"max_prompt_tokens ({max_prompt_tokens}) + max_new_tokens ({max_new_tokens}) "
                f"must fit the model's context of {ctx} tokens"
            )
        settings = GenerationSettings(
            max_new_tokens, SamplingConfig(float(temperature), float(top_p)),
            self.eos_token_ids, self.pad_token_id,
        )

        skipped: collections.Counter = collections.Counter()
        report = DataReport(source="<records>")
        convs = self._select(source, report, skipped, max_conversations, max_turns,
                             max_prompt_tokens)
        if not convs:  # before the output is opened: a bad source must not cost its records
            every = DataReport(report.source, report.records_read, 0,
                               skipped + report.skipped, report.truncated)
            raise DataError(f"no usable conversations in {every.summary()}")
        done_ids: set[str] = set()
        if resume:
            done_ids, bad = read_done_ids(out_path)
            if bad:
                skipped["malformed_output_line"] += bad
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        for c in convs:
            c.done = c.id in done_ids
        skipped["already_done"] += sum(c.done for c in convs)
        groups = _plan(convs, batch_size, sort_window)
        # a group is computed if any member is missing; members already written are still run
        # so the batch (and with it every row's result) is the one an uninterrupted run made
        todo = [(gi, g) for gi, g in enumerate(groups) if not all(convs[i].done for i in g)]

        stats = collections.Counter()
        turns_dropped: collections.Counter = collections.Counter()
        n_todo = sum(not convs[i].done for _, g in todo for i in g)
        bar = _progress_bar(n_todo, progress)
        # appending resumes; overwriting goes through a temporary file renamed over the old
        # one at the end, so neither a crash nor an interruption leaves an emptied output
        opener = (open(out_path, "a", encoding="utf-8") if resume  # noqa: SIM115
                  else replace_file(out_path))
        try:
            with opener as f:
                if engine == "refill":
                    self._run_refill(convs, settings, f, seed, batch_size, max_prompt_tokens,
                                     stats, skipped, turns_dropped, bar, keep_hidden, resume,
                                     out_path)
                    todo = []
                for gi, group in todo:
                    members = [convs[i] for i in group]
                    self._run_group(members, settings, batch_size, seed, gi, max_prompt_tokens,
                                    stats, turns_dropped)
                    records = []
                    for c in members:
                        if c.done:
                            continue
                        if c.failed:
                            skipped[c.failed] += 1
                        else:
                            records.append(c.record())
                            stats["truncated_answers"] += c.truncated
                    # one write per group + fsync: a crash loses at most the group in flight
                    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                    f.flush()
                    os.fsync(f.fileno())
                    stats["written"] += len(records)
                    bar.update(sum(not c.done for c in members))
                    elapsed = max(time.perf_counter() - t_start, 1e-9)
                    bar.set_postfix(tok_s=f"{stats['tokens'] / elapsed:.0f}", refresh=False)
                    for c in members:  # free the answers of finished groups
                        c.answers, c.users = [], []
        finally:
            bar.close()

        for reason, n in report.skipped.items():
            skipped[reason] += n
        seconds = time.perf_counter() - t_start
        return {
            "output": out_path,
            "written": stats["written"],
            "skipped": dict(skipped),
            "turns_dropped": dict(turns_dropped),
            "turns_answered": stats["turns"],
            "truncated_answers": stats["truncated_answers"],
            "tokens_generated": stats["tokens"],
            "batches": stats["batches"],
            # the share of the decode steps' batch rows that computed a token of a real answer
            "row_occupancy": (stats["busy_row_steps"] / (stats["decode_steps"] * batch_size)
                              if stats["decode_steps"] else None),
            # refill engine: the rate while its queue lasted (every row busy: what a long run
            # sees), and the share of the run's tokens drawn by then
            "queue_tokens_per_second": (stats["queue_tokens"] / stats["queue_seconds"]
                                        if stats["queue_seconds"] else None),
            "queue_token_share": (stats["queue_tokens"] / stats["tokens"]
                                  if stats["queue_seconds"] and stats["tokens"] else None),
            "seconds": seconds,
            "conversations_per_second": stats["written"] / seconds if seconds > 0 else 0.0,
            "tokens_per_second": stats["tokens"] / seconds if seconds > 0 else 0.0,
            "source": report.summary(),
        }

    def _run_refill(self, convs, settings, f, seed, batch_size, max_prompt_tokens, stats,
                    skipped, turns_dropped, bar, keep_hidden, resume, out_path) -> None:
        hf, row = (open_hidden(out_path, self.cfg.hidden_size, resume) if keep_hidden
                   else (None, 0))
        try:
            refill_pass(self, convs, settings, f, seed=seed, batch_size=batch_size,
                        max_prompt_tokens=max_prompt_tokens, stats=stats, skipped=skipped,
                        turns_dropped=turns_dropped, bar=bar, hidden_file=hf, hidden_row=row)
        finally:
            if hf is not None:
                hf.close()
        if hf is not None and not resume:
            os.replace(hf.name, hidden_path(out_path))

    def _select(self, source, report: DataReport, skipped: collections.Counter,
                max_conversations: int | None, max_turns: int,
                max_prompt_tokens: int) -> list[_Conv]:
        """The first ``max_conversations`` usable conversations of the source, in source order."""
        if source is None:
            source = sharegpt_path()
        if isinstance(source, str | os.PathLike):
            report.source = os.fspath(source)
            records: Iterable[Any] = iter_raw_records(source, report)
        else:
            records = _count_records(source, report)
        convs: list[_Conv] = []
        seen: set[str] = set()
        if max_conversations is not None and max_conversations <= 0:
            return convs
        for record in records:
            msgs, reason = normalize_conversation(record, require_assistant=False,
                                                  drop_leading_assistant=True)
            if msgs is None:
                skipped[reason or "invalid"] += 1
                continue
            # records without an id get their position, stable across reruns on the same file
            rid = record.get("id")
            rid = f"#{report.records_read - 1}" if rid is None else str(rid)
            if rid in seen:
                skipped["duplicate_id"] += 1
                continue
            system = [m for m in msgs[:1] if m["role"] == "system"]
            users = [m["content"] for m in msgs if m["role"] == "user"][:max_turns]
            conv = _Conv(rid, system, users, first_len=0)
            try:
                conv.first_len = len(self.encode(conv.messages(0)))
            except Exception:  # a template may reject unusual input; one record must not stop us
                skipped["template_error"] += 1
                continue
            if conv.first_len > max_prompt_tokens:
                skipped["prompt_too_long"] += 1
                continue
            seen.add(rid)
            convs.append(conv)
            if max_conversations is not None and len(convs) >= max_conversations:
                break  # stop reading: the rest of the file is never touched
        if hasattr(records, "close"):
            records.close()
        report.kept = len(convs)
        return convs

    def _run_group(self, members: list[_Conv], settings: GenerationSettings, batch_size: int,
                   seed: int, group_index: int, max_prompt_tokens: int,
                   stats: collections.Counter, turns_dropped: collections.Counter) -> None:
        """Answer every turn of one group, batching the members that are at the same turn."""
        for turn in range(max(len(c.users) for c in members)):
            rows, prompts = [], []
            for c in members:
                if not c.active:
                    continue
                if turn >= len(c.users):
                    c.active = False
                    continue
                prompt = self.encode(c.messages(turn))
                if len(prompt) > max_prompt_tokens:
                    c.active = False
                    if not c.done:
                        turns_dropped["prompt_too_long"] += 1
                    continue
                rows.append(c)
                prompts.append(prompt)
            if not rows:
                break
            # the seed depends only on the group's place in the plan, so a resumed run samples
            # exactly what the uninterrupted run would have
            sub_seed = int(np.random.SeedSequence([seed, group_index, turn]).generate_state(1)[0])
            outs = self.generate_batch(prompts, settings, batch_size, sub_seed & 0x7FFFFFFF,
                                       counts=stats)
            stats["batches"] += 1
            for c, toks in zip(rows, outs, strict=True):
                hit_eos = bool(toks) and toks[-1] in self.eos_token_ids
                text = self.tokenizer.decode(toks[:-1] if hit_eos else toks,
                                             skip_special_tokens=True).strip()
                if not c.done:
                    stats["tokens"] += len(toks)
                if not text:  # an empty answer is no training data and no context to build on
                    c.active = False
                    if turn == 0:
                        c.failed = "empty_answer"
                    elif not c.done:
                        turns_dropped["empty_answer"] += 1
                    continue
                c.answers.append(text)
                c.truncated |= not hit_eos
                if not c.done:
                    stats["turns"] += 1


def check_source(source: str | os.PathLike | None) -> DataReport:
    """Refuse a conversation file (None: the packaged ShareGPT) without one usable
    conversation, reading it only up to the first one: the check :meth:`Distiller.run` makes
    after tokenising, made before a model is loaded. Returns the partial read report; raises
    FileNotFoundError for a missing file and ValueError "no usable conversations" (with the
    skip reasons) like the training commands' data loader."""
    path = os.fspath(sharegpt_path() if source is None else source)
    report = DataReport(source=path)
    records = iter_raw_records(path, report)
    try:
        for record in records:
            msgs, reason = normalize_conversation(record, require_assistant=False,
                                                  drop_leading_assistant=True)
            if msgs is not None:
                report.kept = 1
                return report
            report.skip(reason or "invalid")
    finally:
        records.close()
    raise DataError(f"no usable conversations in {report.summary()}")


def _count_records(records: Iterable[Any], report: DataReport):
    for r in records:
        report.records_read += 1
        yield r


def _plan(convs: list[_Conv], batch_size: int, sort_window: int) -> list[list[int]]:
    """Groups of conversation indices, ``batch_size`` each (the last of a window may be short).

    Within each window, conversations with more turns come first (so multi-turn ones share
    batches instead of leaving most rows of later turns to filler), then longer first prompts
    (so the largest shapes compile, and any memory problem shows, at the start)."""
    window = -(-sort_window // batch_size) * batch_size
    groups = []
    for lo in range(0, len(convs), window):
        idx = sorted(range(lo, min(lo + window, len(convs))),
                     key=lambda i: (-len(convs[i].users), -convs[i].first_len, i))
        groups += [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]
    return groups


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="conv", desc="distill", disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)


def load_distiller(model_path: str | os.PathLike | None = None, *, dtype: str = "float32",
                   scan_layers: bool = False) -> Distiller:
    """The distiller ``train.py distill`` runs: a base model (None = the default
    SmolLM2-135M-Instruct) with its layers unrolled unless ``scan_layers`` (a distillation
    compiles its loops once and then decodes for hours, and a scanned step copies every layer's
    weights out of the stack, over one stacked KV cache; benchmarks/results/refill_step.md)."""
    from medusa_jax.api import MedusaLM

    lm = MedusaLM.load(model_path, medusa=None, dtype=dtype, scan_layers=scan_layers)
    return Distiller.from_lm(lm)


def distill(model_path: str | os.PathLike | None = None,
            data_path: str | os.PathLike | None = None,
            out_path: str | os.PathLike = "distilled.jsonl", *,
            max_conversations: int | None = None, max_turns: int = 1,
            max_new_tokens: int = 256, max_prompt_tokens: int | None = None,
            temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
            sort_window: int = 1024, resume: bool = True, progress: bool = True,
            dtype: str = "float32", engine: str = "batch", keep_hidden: bool = False,
            scan_layers: bool = False) -> dict:
    """Load a base model (None = the default SmolLM2-135M-Instruct) and self-distill
    ``data_path`` (None = the packaged ShareGPT) into ``out_path``; see :meth:`Distiller.run`
    for the options and the returned summary. The output path and the source are checked
    before the (slow) model load (:func:`load_distiller`: layers unrolled unless
    ``scan_layers``)."""
    check_output_file(out_path, OUT_WHAT)
    check_source(data_path)
    return load_distiller(model_path, dtype=dtype, scan_layers=scan_layers).run(
        data_path, out_path, max_conversations=max_conversations, max_turns=max_turns,
        max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
        temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
        sort_window=sort_window, resume=resume, progress=progress, engine=engine,
        keep_hidden=keep_hidden,
    )
