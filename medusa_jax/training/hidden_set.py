"""The cached training set of :mod:`medusa_jax.training.cached`: the base model's hidden states
at answer positions with each head's targets, teacher-forced path tokens and teacher rows."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from medusa_jax.errors import DataError, MissingFileError


@dataclasses.dataclass
class HiddenSet:
    """Cached positions t: ``hidden [N, D]`` float32 (the base's final-normed state at t) and
    ``targets [N, M]`` int32 (head k's training target, token t+k+2, -1 where it has none).

    ``tokens [N, M+1]`` int32: tokens t+1 .. t+M+1 (the teacher-forced path of Hydra heads; -1
    past the end of the answer or segment). Where a target exists it equals ``tokens[:, 1:]``.
    ``teacher [N, M]`` int32: the row of this set holding position t+k+1, whose LM-head
    distribution is the base's own for head k's target (-1 where head k has no target). Rows of
    one answer are contiguous and in order. A position is kept when it has a head target or is
    some target's teacher, so ``teacher`` always points inside the set."""

    hidden: np.ndarray
    targets: np.ndarray
    tokens: np.ndarray | None = None
    teacher: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    @classmethod
    def from_answers(cls, hiddens: list[np.ndarray], answers: list[np.ndarray],
                     num_heads: int) -> HiddenSet:
        """From generated answers: ``hiddens[i][j]`` (``[n_i, D]``) is the base's hidden state
        at the position whose next token is ``answers[i][j]`` (``[n_i]`` int); every answer
        token is a training target. Keeps every position (the last one of an answer has no
        head target but is the teacher row of the answer's last token)."""
        if len(hiddens) != len(answers):
            raise ValueError(f"from_answers: {len(hiddens)} hidden arrays but {len(answers)} answers")
        M = num_heads
        shapes = [np.shape(h) for h in hiddens]
        for i, (shp, a) in enumerate(zip(shapes, answers, strict=True)):
            n = np.size(a)
            if len(shp) != 2 or shp[0] != n:
                raise ValueError(f"from_answers: answer {i} has {n} tokens but hidden "
                                 f"states of shape {shp} (need [{n}, D])")
        total = sum(shp[0] for shp in shapes)
        if not total:
            raise ValueError("from_answers: no answer has any token")
        # one float32 array filled in place (the inputs may be float16 views of a sidecar:
        # converting each and concatenating held two float32 copies of the whole set at once)
        hs = np.empty((total, shapes[0][1]), np.float32)
        toks, teach, base = [], [], 0
        for h, a in zip(hiddens, answers, strict=True):
            a = np.asarray(a, np.int64).reshape(-1)
            n = a.shape[0]
            if n == 0:
                continue
            hs[base: base + n] = h
            j = np.arange(n)[:, None] + np.arange(M + 1)[None, :]  # [n, M+1]: answer index
            toks.append(np.where(j < n, a[np.minimum(j, n - 1)], -1))
            # head k's target answers[j+k+1] is predicted at row j+k+1 (its teacher)
            tj = j[:, 1:]
            teach.append(np.where(tj < n, base + tj, -1))
            base += n
        tokens = np.concatenate(toks).astype(np.int32)
        return cls(hs, tokens[:, 1:].copy(), tokens,
                   np.concatenate(teach).astype(np.int32))


def sidecar_for(data_path: str | None, mode: str) -> str | None:
    """The hidden-state sidecar (``<data>.hidden``, written by ``train.py distill --keep-hidden``)
    a cached run reads instead of running the base model: with ``data.hidden_states: auto``
    when it exists, with ``sidecar`` always (missing: an error), never with ``recompute``."""
    from medusa_jax.training.distill_refill import hidden_path  # noqa: PLC0415

    if mode == "recompute" or not data_path:
        if mode == "sidecar":
            raise DataError("data.hidden_states=sidecar needs data.path (a distilled file)")
        return None
    side = hidden_path(os.path.abspath(os.path.expanduser(data_path)))
    if os.path.isfile(side):
        return side
    if mode == "sidecar":
        raise MissingFileError(f"data.hidden_states=sidecar: {side} does not exist (distil "
                               "with --engine refill --keep-hidden)")
    return None


def sidecar_sets(data_path: str, dim: int, num_heads: int, eval_fraction: float,
                 max_records: int | None = None) -> tuple[HiddenSet, HiddenSet | None, dict]:
    """Train / held-out :class:`HiddenSet` from a distilled file and its sidecar, split like
    :func:`~medusa_jax.training.prepare.prepare_data` (a hash of each record's id), and a data
    report. The answers' own token ids are the targets (no re-tokenisation)."""
    from medusa_jax.training.distill_refill import hidden_path, read_hidden  # noqa: PLC0415
    from medusa_jax.training.prepare import held_out_mask, split_key  # noqa: PLC0415

    path = os.path.abspath(os.path.expanduser(data_path))
    side = hidden_path(path)
    size = os.path.getsize(side)
    if size % (2 * dim):
        raise DataError(f"{side} holds {size} bytes, not whole float16 rows of {dim} values: its "
                        f"hidden states come from a model of another hidden size than this "
                        f"run's ({dim})")
    recs, answers, hiddens = read_hidden(path, dim, max_records=max_records)
    owner = [i for i, r in enumerate(recs) for _ in r["answer_tokens"]]
    if not recs:
        raise DataError(f"{path}: no record has hidden states (distil with --keep-hidden)")
    keys = [split_key([{"role": "user", "content": next(
        (t.get("value", "") for t in r.get("conversations", []) if t.get("from") == "human"),
        "")}], None if r.get("id") is None else str(r["id"])) for r in recs]
    held = held_out_mask(keys, eval_fraction)

    def subset(flag: bool) -> HiddenSet | None:
        pick = [j for j, o in enumerate(owner) if held[o] == flag]
        if not pick:
            return None
        return HiddenSet.from_answers([hiddens[j] for j in pick], [answers[j] for j in pick],
                                      num_heads)

    train, ev = subset(False), subset(True)
    if train is None:
        raise DataError(f"{path}: every record is held out (data.eval_fraction={eval_fraction})")
    n_eval = int(held.sum())
    report = {
        "source": path, "records_read": len(recs), "kept": len(recs), "skipped": {},
        "truncated": False, "hidden_states": side,
        "summary": f"{path}: {len(recs)} records with hidden states in {side}",
        "train_conversations": len(recs) - n_eval, "eval_conversations": n_eval,
        "train_rows": len(recs) - n_eval, "eval_rows": n_eval,
        "train_target_tokens": int(sum(len(answers[j]) for j, o in enumerate(owner)
                                       if not held[o])),
    }
    return train, ev, report
