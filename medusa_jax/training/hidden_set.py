"""The cached training set of :mod:`medusa_jax.training.cached`: the base model's hidden states
at answer positions with each head's targets, teacher-forced path tokens and teacher rows."""

from __future__ import annotations

import dataclasses

import numpy as np


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
        hs, toks, teach, base = [], [], [], 0
        for i, (h, a) in enumerate(zip(hiddens, answers, strict=True)):
            h, a = np.asarray(h), np.asarray(a, np.int64).reshape(-1)
            if h.ndim != 2 or h.shape[0] != a.shape[0]:
                raise ValueError(f"from_answers: answer {i} has {a.shape[0]} tokens but hidden "
                                 f"states of shape {h.shape} (need [{a.shape[0]}, D])")
            n = a.shape[0]
            if n == 0:
                continue
            j = np.arange(n)[:, None] + np.arange(M + 1)[None, :]  # [n, M+1]: answer index
            toks.append(np.where(j < n, a[np.minimum(j, n - 1)], -1))
            # head k's target answers[j+k+1] is predicted at row j+k+1 (its teacher)
            tj = j[:, 1:]
            teach.append(np.where(tj < n, base + tj, -1))
            hs.append(h.astype(np.float32))
            base += n
        if not hs:
            raise ValueError("from_answers: no answer has any token")
        tokens = np.concatenate(toks).astype(np.int32)
        return cls(np.concatenate(hs), tokens[:, 1:].copy(), tokens,
                   np.concatenate(teach).astype(np.int32))
