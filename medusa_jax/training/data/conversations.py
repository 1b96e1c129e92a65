"""Raw records -> validated conversations: ``[{"role", "content"}]`` message lists.

Records are in ShareGPT form (``{"conversations": [{"from": "human"|"gpt"|"system", "value":
...}]}``) or messages form (``{"messages": [{"role": ..., "content": ...}]}``). Malformed records
are counted per reason in the :class:`~medusa_jax.training.data.sources.DataReport` and skipped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from medusa_jax.errors import DataError
from medusa_jax.training.data.sources import DataReport, iter_raw_records, sharegpt_path

ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
}


# --------------------------------------------------------------------------------------------
# Validation / normalisation
# --------------------------------------------------------------------------------------------


def normalize_conversation(
    record: Any, require_assistant: bool = True, drop_leading_assistant: bool = False
) -> tuple[list[dict[str, str]] | None, str | None]:
    """Validate one raw record and normalise it to ``[{"role", "content"}]``.

    Accepts ShareGPT (``conversations`` of ``from``/``value``) and messages (``messages`` of
    ``role``/``content``) records. Returns ``(messages, None)`` or ``(None, reason)``. Roles
    become ``system``/``user``/``assistant``; a single leading system turn is allowed, after it
    turns must alternate starting with the user. ``drop_leading_assistant`` removes assistant
    turns before the first user turn instead of rejecting the record (ShareGPT's split
    conversations often start mid-dialogue).
    """
    if not isinstance(record, Mapping):
        return None, "not_a_dict"
    turns = record.get("messages")
    if turns is None:
        turns = record.get("conversations")
    if turns is None:
        return None, "no_conversation_field"
    if not isinstance(turns, list | tuple):
        return None, "conversation_not_a_list"
    if not turns:
        return None, "empty_conversation"
    out: list[dict[str, str]] = []
    for turn in turns:
        if not isinstance(turn, Mapping):
            return None, "turn_not_a_dict"
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role is None:
            return None, "missing_role"
        if content is None:
            return None, "missing_content"
        if not isinstance(role, str) or role.strip().lower() not in ROLE_ALIASES:
            return None, "unknown_role"
        if not isinstance(content, str):
            return None, "non_string_content"
        if not content.strip():
            return None, "empty_content"
        out.append({"role": ROLE_ALIASES[role.strip().lower()], "content": content})
    system, body = (out[:1], out[1:]) if out[0]["role"] == "system" else ([], out)
    if drop_leading_assistant:
        while body and body[0]["role"] == "assistant":
            body = body[1:]
        out = system + body
    if not body:
        return None, "no_user_turn"
    if any(m["role"] == "system" for m in body):
        return None, "misplaced_system"
    if body[0]["role"] == "assistant":
        return None, "starts_with_assistant"
    for prev, cur in zip(body, body[1:], strict=False):
        if prev["role"] == cur["role"]:
            return None, f"consecutive_{cur['role']}"
    if require_assistant and not any(m["role"] == "assistant" for m in body):
        return None, "no_assistant_turn"
    return out, None


def load_conversations(
    path: str | os.PathLike,
    *,
    max_records: int | None = None,
    require_assistant: bool = True,
    drop_leading_assistant: bool = False,
) -> tuple[list[list[dict[str, str]]], DataReport]:
    """Load and validate the conversations of a JSON-list / JSONL / parquet file.

    Returns ``(conversations, report)``; malformed records are skipped and counted by reason
    (see :func:`normalize_conversation` for the options). ``max_records`` limits the raw
    records read (the file is streamed, so the rest is never read). Raises ValueError naming
    the file and the skip reasons if nothing usable remains.
    """
    path = os.fspath(path)
    report = DataReport(source=path)
    convs: list[list[dict[str, str]]] = []
    for record in iter_raw_records(path, report, max_records=max_records):
        messages, reason = normalize_conversation(
            record,
            require_assistant=require_assistant,
            drop_leading_assistant=drop_leading_assistant,
        )
        if messages is None:
            report.skip(reason or "unknown")
        else:
            convs.append(messages)
            rid = record.get("id")
            report.ids.append(None if rid is None else str(rid))
    report.kept = len(convs)
    if not convs:
        raise DataError(f"no usable conversations in {report.summary()}")  # names the file
    return convs, report


def load_sharegpt(
    max_records: int | None = None,
    require_assistant: bool = True,
    drop_leading_assistant: bool = False,
) -> tuple[list[list[dict[str, str]]], DataReport]:
    """:func:`load_conversations` on the packaged ShareGPT V3 file."""
    return load_conversations(
        sharegpt_path(),
        max_records=max_records,
        require_assistant=require_assistant,
        drop_leading_assistant=drop_leading_assistant,
    )
