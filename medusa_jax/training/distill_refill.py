"""The distiller's refilling engine (``Distiller.run(..., engine="refill")``): every conversation
turn is one entry of a :class:`~medusa_jax.decoding.refill.RefillingGenerator` queue, so the
batch stays full whatever the answers' lengths, and a conversation's next turn is queued first
the moment its previous answer is in (with that answer in its context).

A row's answer depends only on its prompt and its seed (``SeedSequence([seed, i, turn])`` for
the ``i``-th selected conversation), so the records are those of the batch engine under greedy
decoding, a resumed run computes only the missing conversations, and the file is written in
selection order (a record waits until every earlier one is written): interrupted + resumed gives
the uninterrupted file byte for byte.

``keep_hidden``: the base model's final-normed state at every answer position is appended, as
float16 rows of ``hidden_size``, to ``<out>.hidden``; each record then carries
``"answer_tokens"`` (one id list per answer, EOS included when hit) and
``"hidden": {"offset": first row, "rows": [rows per answer], "dim": hidden size}``, which is what
:meth:`~medusa_jax.training.hidden_set.HiddenSet.from_answers` needs (:func:`read_hidden`). A resumed
run first cuts the file back to the rows its complete records account for.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import numpy as np

from medusa_jax.decoding.refill import RefillingGenerator
from medusa_jax.errors import DataError

HIDDEN_DTYPE = np.float16


def hidden_path(out_path: str) -> str:
    return f"{out_path}.hidden"


def _rows_recorded(out_path: str) -> int:
    """Hidden rows the complete records of ``out_path`` account for."""
    end = 0
    if not os.path.exists(out_path):
        return 0
    with open(out_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                h = json.loads(line).get("hidden")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(h, dict):
                end = max(end, int(h["offset"]) + sum(int(n) for n in h["rows"]))
    return end


def open_hidden(out_path: str, dim: int, resume: bool):
    """The sidecar opened for appending (cut back to the recorded rows when resuming) and the
    row count it starts at; overwriting runs write ``<sidecar>.tmp`` (renamed by the caller)."""
    path = hidden_path(out_path)
    if not resume:
        return open(f"{path}.tmp", "wb"), 0  # noqa: SIM115
    rows = _rows_recorded(out_path)
    have = os.path.getsize(path) // (dim * 2) if os.path.exists(path) else 0
    if have < rows:
        raise DataError(f"{path} holds {have} hidden rows but {out_path} records {rows}: the "
                        "hidden states are missing or damaged; rebuild them with `python "
                        f"train.py data hidden --data {out_path}` (resumable), then resume")
    f = open(path, "r+b" if os.path.exists(path) else "wb")  # noqa: SIM115
    f.truncate(rows * dim * 2)
    f.seek(0, os.SEEK_END)
    return f, rows


def read_hidden(out_path: str, dim: int, max_records: int | None = None
                ) -> tuple[list[dict[str, Any]], list[np.ndarray], list[np.ndarray]]:
    """Records of a ``keep_hidden`` distillation with their answers' token ids and hidden
    states, in file order: ``(records, answers, hiddens)``, one entry per answer (the first
    ``max_records`` records with hidden states). Each ``hiddens`` entry is a float16 ``[n, D]``
    view of the memory-mapped sidecar (nothing is copied here: :meth:`HiddenSet.from_answers`
    makes the one float32 copy). A record pointing past the sidecar or whose token and row
    counts disagree is a :class:`DataError`."""
    rows = np.memmap(hidden_path(out_path), HIDDEN_DTYPE, "r").reshape(-1, dim)
    recs, answers, hiddens = [], [], []
    with open(out_path, encoding="utf-8") as f:
        for n_line, line in enumerate(f, 1):
            if max_records is not None and len(recs) >= max_records:
                break
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a half-written last line (the distiller repairs it on resume)
            h = r.get("hidden") if isinstance(r, dict) else None
            if not isinstance(h, dict):
                continue
            if h.get("dim", dim) != dim:
                raise DataError(f"{out_path} line {n_line}: hidden states of size {h['dim']}, "
                                f"but this model's hidden size is {dim} (distilled with "
                                "another model)")
            o = int(h["offset"])
            toks = r.get("answer_tokens", [])
            if (len(toks) != len(h["rows"]) or any(len(t) != n for t, n in zip(toks, h["rows"]))
                    or o + sum(h["rows"]) > rows.shape[0]):
                raise DataError(f"{out_path} line {n_line}: its hidden rows (offset {o}, rows "
                                f"{h['rows']}) do not match its answer tokens or lie past the "
                                f"{rows.shape[0]} rows of {hidden_path(out_path)} (read as rows "
                                f"of this model's hidden size {dim}: distilled with another "
                                "model, or damaged)")
            recs.append(r)
            for t, n in zip(toks, h["rows"], strict=True):
                answers.append(np.asarray(t, np.int32))
                hiddens.append(rows[o: o + n])
                o += n
    return recs, answers, hiddens


def refill_pass(dist, convs: list, settings, out_file, *, seed: int, batch_size: int,
                max_prompt_tokens: int, stats: collections.Counter,
                skipped: collections.Counter, turns_dropped: collections.Counter, bar,
                hidden_file=None, hidden_row: int = 0) -> None:
    """Answer every turn of the conversations not yet ``done`` and write their records to
    ``out_file`` in selection order (see the module docstring)."""
    gen = RefillingGenerator(dist.cfg, dist.params, settings, batch_size=batch_size,
                             max_prompt_len=max_prompt_tokens, keep_hidden=hidden_file is not None,
                             per_layer=dist.kv_per_layer)
    todo = [i for i, c in enumerate(convs) if not c.done]
    tokens: dict[int, list] = {i: [] for i in todo}
    hidden: dict[int, list] = {i: [] for i in todo}

    def entry(i: int, turn: int, prompt: list[int]):
        s = int(np.random.SeedSequence([seed, i, turn]).generate_state(1)[0]) & 0x7FFFFFFF
        return (i, turn), prompt, s

    queue = collections.deque(entry(i, 0, dist.encode(convs[i].messages(0))) for i in todo)
    finished: set[int] = set()
    write_at = 0  # index into todo of the next record to write
    eos = dist.eos_token_ids
    for (i, turn), toks, hid in gen.run(queue):
        c = convs[i]
        stats["tokens"] += len(toks)
        hit_eos = bool(toks) and toks[-1] in eos
        text = dist.tokenizer.decode(toks[:-1] if hit_eos else toks,
                                     skip_special_tokens=True).strip()
        more = False
        if not text:
            if turn == 0:
                c.failed = "empty_answer"
            else:
                turns_dropped["empty_answer"] += 1
        else:
            c.answers.append(text)
            c.truncated |= not hit_eos
            stats["turns"] += 1
            tokens[i].append(toks)
            hidden[i].append(hid)
            if turn + 1 < len(c.users):
                prompt = dist.encode(c.messages(turn + 1))
                if len(prompt) > max_prompt_tokens:
                    turns_dropped["prompt_too_long"] += 1
                else:
                    queue.appendleft(entry(i, turn + 1, prompt))  # keep its context short-lived
                    more = True
        if more:
            continue
        finished.add(i)
        lines = []
        while write_at < len(todo) and todo[write_at] in finished:
            j = todo[write_at]
            write_at += 1
            cj = convs[j]
            if cj.failed:
                skipped[cj.failed] += 1
            else:
                rec = cj.record()
                if hidden_file is not None:
                    rows = [len(t) for t in tokens[j]]
                    rec["answer_tokens"] = tokens[j]
                    rec["hidden"] = {"offset": hidden_row, "rows": rows,
                                     "dim": dist.cfg.hidden_size}
                    for h in hidden[j]:
                        hidden_file.write(np.asarray(h, HIDDEN_DTYPE).tobytes())
                    hidden_row += sum(rows)
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                stats["truncated_answers"] += cj.truncated
            cj.answers, cj.users = [], []
            del tokens[j], hidden[j]
        if lines:
            if hidden_file is not None:  # rows first: a record never points past the file
                hidden_file.flush()
                os.fsync(hidden_file.fileno())
            out_file.write("".join(lines))
            out_file.flush()
            os.fsync(out_file.fileno())
            stats["written"] += len(lines)
        bar.update(1)
    stats["batches"] += gen.refills
    stats["decode_steps"] += gen.steps
    stats["busy_row_steps"] += gen.busy_row_steps
    if gen.queue_seconds is not None:
        stats["queue_seconds"] += gen.queue_seconds
        stats["queue_tokens"] += gen.queue_tokens
