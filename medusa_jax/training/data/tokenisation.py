"""Conversations -> tokens: the chat template rendered and tokenised whole, with a loss mask
that is 1 exactly on the tokens the assistant produces."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from medusa_jax.errors import DataError
from medusa_jax.tokenizer import encode_text, end_of_turn_token_id, render_chat
from medusa_jax.training.data.sources import DataReport


def _assistant_char_spans(
    tokenizer: Any, messages: list[dict[str, str]], full: str
) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of ``full`` that the assistant itself produces.

    Each span runs from the end of the assistant header to the end of its end-of-turn token.
    Found by rendering growing prefixes of the conversation, which works for any template that
    renders a prefix of the conversation as a prefix of the text; otherwise the content is
    searched for in the text.
    """
    eot = end_of_turn_token_id(tokenizer)
    eot_text = tokenizer.decode([eot]) if eot is not None else None
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        turn = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if (
            len(head) >= cursor
            and len(turn) > len(head)
            and full.startswith(turn)
            and turn.startswith(head)
        ):
            start, end = len(head), len(turn)
        else:
            content = m["content"]
            start = full.find(content, cursor)
            if start < 0:  # templates often trim the content
                content = content.strip()
                start = full.find(content, cursor)
            if start < 0:
                raise DataError(f"assistant turn {i} not found in the rendered chat template")
            end = start + len(content)
            if eot_text:
                nxt = full.find(eot_text, end)
                if nxt >= 0 and not full[end:nxt].strip():
                    end = nxt + len(eot_text)
        seg = full[start:end]
        k = seg.rfind(eot_text) if eot_text else -1
        # what follows the end-of-turn token (a newline, say) is template glue, not the reply
        end = start + k + len(eot_text) if k >= 0 else start + len(seg.rstrip())
        spans.append((start, end))
        cursor = end
    return spans


def _mask_tokens(
    tokenizer: Any, full: str, spans: list[tuple[int, int]], enc: Any, max_len: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, loss_mask)`` from one encoding of ``full`` (None: no offsets available)."""
    if enc is not None:
        ids = enc.ids
        offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
        starts = offsets[:, 0]
        mask = np.zeros(len(ids), np.int32)
        for s, e in spans:
            # A token belongs to the reply iff it starts inside it: a token merging the header's
            # last characters with the reply's first ones is never produced at inference (the
            # prompt ends with the header), and the header must never be a target.
            mask[(starts >= s) & (starts < e)] = 1
    else:
        # tokenizers without offsets: count the tokens of text prefixes
        ids = encode_text(tokenizer, full)
        mask = np.zeros(len(ids), np.int32)
        for s, e in spans:
            mask[len(encode_text(tokenizer, full[:s])) : len(encode_text(tokenizer, full[:e]))] = 1
    input_ids = np.asarray(ids, np.int32)
    if max_len is not None:
        input_ids, mask = input_ids[:max_len], mask[:max_len]
    return input_ids, mask


_CUT_CHARS_PER_TOKEN = 6
_CUT_MARGIN = 1024


def _encode_batch(tokenizer: Any, texts: list[str], max_len: int | None = None) -> list[Any]:
    """Rust-side encodings (with character offsets) of ``texts``, or Nones if unavailable.

    With ``max_len`` each text is first cut well past where its ``max_len``-th token should
    end: long conversations are mostly thrown away by truncation and tokenising them in full
    dominates the cost. Texts where the cut comes too close are re-encoded in full.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [None] * len(texts)
    # special tokens are already text in the rendered template, hence add_special_tokens=False
    if max_len is None:
        return backend.encode_batch(texts, add_special_tokens=False)
    cut = _CUT_CHARS_PER_TOKEN * max_len + _CUT_MARGIN
    encs = backend.encode_batch([t[:cut] for t in texts], add_special_tokens=False)
    # tokenisation is local (pre-tokens), so tokens ending far before the cut are unaffected
    redo = [
        i
        for i, (t, e) in enumerate(zip(texts, encs, strict=True))
        if len(t) > cut and (len(e.ids) < max_len or e.offsets[max_len - 1][1] > cut - _CUT_MARGIN)
    ]
    if redo:
        for i, e in zip(redo, backend.encode_batch([texts[i] for i in redo], False), strict=True):
            encs[i] = e
    return encs


def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, str]], max_len: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of a whole conversation rendered with the chat template, and the assistant mask.

    Returns ``input_ids [T] int32`` and ``loss_mask [T] int32`` where the mask is 1 exactly on
    tokens the assistant produces: its content and its end-of-turn token, not the role header.
    The whole text is tokenised at once (as at inference) and the mask comes from character
    offsets. The first ``max_len`` tokens are kept if the conversation is longer.
    """
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    spans = _assistant_char_spans(tokenizer, messages, full)
    return _mask_tokens(
        tokenizer, full, spans, _encode_batch(tokenizer, [full], max_len)[0], max_len
    )


def tokenize_conversations(
    tokenizer: Any,
    conversations: Iterable[list[dict[str, str]]],
    max_len: int | None = None,
    report: DataReport | None = None,
    chunk_size: int = 512,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`tokenize_conversation` over many conversations, tokenising in parallel chunks.

    Conversations left without any assistant token (e.g. after truncation) or that the template
    rejects are dropped and counted in ``report`` (reasons ``no_assistant_tokens``,
    ``template_error``).
    """
    out: list[tuple[np.ndarray, np.ndarray]] = []
    pending: list[tuple[str, list[tuple[int, int]]]] = []

    def flush() -> None:
        encs = _encode_batch(tokenizer, [full for full, _ in pending], max_len)
        for (full, spans), enc in zip(pending, encs, strict=True):
            ids, mask = _mask_tokens(tokenizer, full, spans, enc, max_len)
            if mask.any():
                out.append((ids, mask))
            elif report is not None:
                report.skip("no_assistant_tokens")
        pending.clear()

    for messages in conversations:
        try:
            full = render_chat(tokenizer, messages, add_generation_prompt=False)
            spans = _assistant_char_spans(tokenizer, messages, full)
        except Exception:  # a template may raise on unusual input; one record must not stop us
            if report is not None:
                report.skip("template_error")
            continue
        pending.append((full, spans))
        if len(pending) >= chunk_size:
            flush()
    if pending:
        flush()
    return out
