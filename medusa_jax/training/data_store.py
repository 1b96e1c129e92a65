"""A distilled data file kept in the repository: append-only xz shards plus a manifest, and the
hidden-state sidecar rebuilt from the records by one teacher-forced pass of the base model.

Self-distillation is the slow part of training heads on a CPU (hours for a million answer
tokens), and ``data/`` is not versioned, so a file that took several sessions to grow would be
lost with the checkout. The records themselves are small once compressed (a million answer
tokens is ~10 MB of JSONL, ~3 MB as xz); their float16 hidden states (``<data>.hidden``, 1.15 GB
for a million rows) are not, and are a pure function of the records and the base model::

    pack("data/distilled.jsonl", "datasets/smollm2-135m-instruct")    # new records -> new shard
    unpack("datasets/smollm2-135m-instruct", "data/distilled.jsonl")  # the JSONL, byte for byte
    rebuild_hidden(distiller, "data/distilled.jsonl")                 # <data>.hidden, resumable

A store is a directory with ``MANIFEST.json`` and ``part-NNNNN.jsonl.xz`` files. Each shard
holds whole JSONL lines exactly as the distiller wrote them; the manifest lists the shards in
order with their record counts, first/last ids and the SHA-256 of each compressed file, and the
totals. :func:`pack` only ever adds shards: the data file must begin with every record the store
already holds (a distillation that was resumed and grew), so a store's history is the history of
its data. The rows of the rebuilt sidecar are the distiller's own up to float rounding (a
different batch shape and computation order; see ``tests/test_data_store.py``), and
:func:`rebuild_hidden` reports how often the base model's greedy choice at a rebuilt row agrees
with the recorded token (it is 1 for a greedy distillation up to near-ties).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from medusa_jax.errors import DataError
from medusa_jax.training.distill_refill import HIDDEN_DTYPE, hidden_path
from medusa_jax.training.files import check_output_file, replace_file

MANIFEST = "MANIFEST.json"
FORMAT = "medusa_jax-distilled-store/1"
SHARD = "part-{:05d}.jsonl.xz"


# ------------------------------------------------------------------------------------ records
def _complete_records(path: str) -> tuple[list[bytes], int]:
    """The lines of a distilled JSONL that are whole records (a JSON object with an id, newline
    terminated), in order, and how many lines were not (a half-written last line, damage)."""
    lines, bad = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                r = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                r = None
            ok = line.endswith(b"\n") and isinstance(r, dict) and r.get("id") is not None
            if ok:
                lines.append(line)
            else:
                bad += 1
    return lines, bad


def _stats(lines: list[bytes]) -> dict[str, int]:
    tokens = rows = answers = 0
    for line in lines:
        r = json.loads(line)
        toks = r.get("answer_tokens") or []
        answers += sum(1 for t in r.get("conversations", []) if t.get("from") == "gpt")
        tokens += sum(len(t) for t in toks)
        h = r.get("hidden")
        rows += sum(int(n) for n in h["rows"]) if isinstance(h, dict) else 0
    return {"records": len(lines), "answers": answers, "answer_tokens": tokens,
            "hidden_rows": rows}


# ---------------------------------------------------------------------------------- manifest
def read_manifest(store: str) -> dict[str, Any]:
    """The store's manifest (an empty one where the directory or manifest does not exist)."""
    path = os.path.join(store, MANIFEST)
    if not os.path.exists(path):
        if os.path.exists(store) and not os.path.isdir(store):
            raise DataError(f"{store} is a file, not a data store directory")
        return {"format": FORMAT, "records": 0, "answers": 0, "answer_tokens": 0,
                "hidden_rows": 0, "shards": []}
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a readable data store manifest: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"{path} is not a medusa_jax data store manifest (format "
                        f"{m.get('format') if isinstance(m, dict) else None!r}, "
                        f"expected {FORMAT!r})")
    return m


def read_store(store: str) -> list[bytes]:
    """Every record line of the store, in order; a shard whose bytes or record count differ
    from the manifest is a :class:`DataError` (damaged or edited)."""
    m = read_manifest(store)
    lines: list[bytes] = []
    for s in m["shards"]:
        path = os.path.join(store, s["file"])
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise DataError(f"data store {store}: shard {s['file']} cannot be read ({e})") from None
        if hashlib.sha256(raw).hexdigest() != s["sha256"]:
            raise DataError(f"data store {store}: {s['file']} does not match its SHA-256 in "
                            f"{MANIFEST} (damaged or replaced)")
        part = lzma.decompress(raw).splitlines(keepends=True)
        if len(part) != s["records"]:
            raise DataError(f"data store {store}: {s['file']} holds {len(part)} records, its "
                            f"manifest entry {s['records']}")
        lines += part
    return lines


def _first_difference(a: list[bytes], b: list[bytes]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _record_id(line: bytes) -> str:
    return str(json.loads(line).get("id"))


# ---------------------------------------------------------------------------------- pack / unpack
def pack(data_path: str, store: str, *, shard_records: int = 2000,
         source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add the records of ``data_path`` that the store does not hold yet as new shards (at most
    ``shard_records`` each) and rewrite the manifest. ``source`` (e.g. the distillation command,
    commit, date, machine) is recorded with the new shards. Returns a summary: ``added`` records
    and the store's totals.

    The file must begin with the store's records, byte for byte (it is the store's data, grown
    by a resumed distillation): anything else is a :class:`DataError` naming the first record
    that differs, and the store is left as it was."""
    if shard_records < 1:
        raise DataError(f"shard_records must be >= 1, got {shard_records}")
    if not os.path.isfile(data_path):
        raise DataError(f"{data_path}: no such distilled data file")
    m = read_manifest(store)
    have = read_store(store)
    lines, bad = _complete_records(data_path)
    diff = _first_difference(have, lines[: len(have)])
    if diff is not None:
        what = (f"it has {len(lines)} records, the store {len(have)}" if diff >= len(lines) else
                f"record {diff + 1} is id {_record_id(lines[diff])!r}, the store's "
                f"{_record_id(have[diff])!r}" if _record_id(lines[diff]) != _record_id(have[diff])
                else f"record {diff + 1} (id {_record_id(lines[diff])!r}) differs from the store's")
        raise DataError(f"{data_path} does not extend the data store {store}: {what}. A store "
                        "only grows by appending; pack into a new store directory instead")
    new = lines[len(have):]
    added_shards = []
    if new:
        os.makedirs(store, exist_ok=True)
        for start in range(0, len(new), shard_records):
            part = new[start: start + shard_records]
            name = SHARD.format(len(m["shards"]))
            raw = lzma.compress(b"".join(part), preset=9)
            with replace_file(os.path.join(store, name), "wb") as f:
                f.write(raw)
            entry = {"file": name, **_stats(part), "first_id": _record_id(part[0]),
                     "last_id": _record_id(part[-1]), "sha256": hashlib.sha256(raw).hexdigest(),
                     "bytes": len(raw)}
            if source:
                entry["source"] = source
            m["shards"].append(entry)
            added_shards.append(name)
        for k in ("records", "answers", "answer_tokens", "hidden_rows"):
            m[k] = sum(s[k] for s in m["shards"])
        first = next((json.loads(x).get("hidden") for x in lines), None)
        if isinstance(first, dict):
            m["hidden_dim"] = int(first["dim"])
        with replace_file(os.path.join(store, MANIFEST), "w") as f:
            json.dump(m, f, indent=1)
            f.write("\n")
    return {"added": len(new), "shards": added_shards, "skipped_lines": bad,
            **{k: m[k] for k in ("records", "answers", "answer_tokens", "hidden_rows")}}


def unpack(store: str, out_path: str) -> dict[str, Any]:
    """Write the store's records to ``out_path`` (the distiller's JSONL, byte for byte).

    An existing ``out_path`` is never lost: if it already begins with the store's records (the
    same data, perhaps grown since) it is left alone (``written: False``); if it is a shorter
    prefix of the store it is replaced by the longer file; anything else is a
    :class:`DataError` naming the first record that differs."""
    out_path = check_output_file(out_path, "the unpacked data file")
    lines = read_store(store)
    if not lines:
        raise DataError(f"data store {store} holds no records (no {MANIFEST} or no shards)")
    stats = _stats(lines)
    if os.path.exists(out_path):
        local, _ = _complete_records(out_path)
        diff = _first_difference(lines[: len(local)], local[: len(lines)])
        if diff is not None:
            raise DataError(f"{out_path} exists and is not the store's data (record {diff + 1} "
                            f"differs): move it away or unpack elsewhere")
        if len(local) >= len(lines):
            return {"written": False, "local_records": len(local), **stats}
    with replace_file(out_path, "wb") as f:
        f.write(b"".join(lines))
    return {"written": True, "local_records": len(lines), **stats}


# ------------------------------------------------------------------------------ hidden states
def _answer_sequences(record: dict, encode: Callable[[list], list[int]]
                      ) -> list[tuple[list[int], int]]:
    """``(tokens, n)`` per answer of a record: the prompt the distiller gave the model (system,
    earlier turns with the model's own answers, the user turn, the generation prompt) followed
    by the answer's tokens but its last, and the answer's length ``n``. The hidden rows of the
    answer are the base's states at the last ``n`` positions of ``tokens``."""
    system, pairs, user = [], [], None
    for t in record.get("conversations", []):
        role, text = t.get("from"), t.get("value", "")
        if role == "system" and not pairs and user is None:
            system.append({"role": "system", "content": text})
        elif role == "human":
            user = text
        elif role == "gpt" and user is not None:
            pairs.append((user, text))
            user = None
    answers = record["answer_tokens"]
    if len(answers) != len(pairs):
        raise DataError(f"record {record.get('id')!r}: {len(answers)} answer token lists for "
                        f"{len(pairs)} answered turns")
    out, msgs = [], list(system)
    for (user, text), toks in zip(pairs, answers, strict=True):
        msgs.append({"role": "user", "content": user})
        prompt = encode(msgs)
        out.append(([*prompt, *toks[:-1]], len(toks)))
        msgs.append({"role": "assistant", "content": text})
    return out


def _pack_rows(seqs: list[list[int]], row_len: int) -> list[list[int]]:
    """First-fit-decreasing packing of sequences (indices into ``seqs``) into rows of
    ``row_len`` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda j: -len(seqs[j])):
        n = len(seqs[i])
        for r, f in enumerate(free):
            if f >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(row_len - n)
    return rows


def _records_with_hidden(data_path: str) -> list[dict]:
    recs = []
    with open(data_path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and isinstance(r.get("hidden"), dict):
                recs.append(r)
    expect = 0
    for r in recs:
        h = r["hidden"]
        if int(h["offset"]) != expect:
            raise DataError(f"{data_path}: record {r.get('id')!r} has its hidden rows at offset "
                            f"{h['offset']}, expected {expect} (the records do not cover the "
                            "sidecar in file order, as the distiller writes them)")
        if [len(t) for t in r.get("answer_tokens", [])] != [int(n) for n in h["rows"]]:
            raise DataError(f"{data_path}: record {r.get('id')!r}: its answer tokens and hidden "
                            "row counts disagree")
        expect += sum(int(n) for n in h["rows"])
    return recs


def check_rebuild(data_path: str, batch_rows: int) -> list[dict]:
    """What :func:`rebuild_hidden` refuses, checked before a model is loaded; returns the
    records with hidden-row offsets."""
    if batch_rows < 1:
        raise DataError(f"batch_rows must be >= 1, got {batch_rows}")
    if not os.path.isfile(data_path):
        raise DataError(f"{data_path}: no such distilled data file")
    recs = _records_with_hidden(data_path)
    if not recs:
        raise DataError(f"{data_path}: no record carries answer tokens and hidden row offsets "
                        "(it was distilled without --keep-hidden)")
    return recs


def rebuild_hidden(cfg, params, tokenizer, data_path: str, *, batch_rows: int = 4,
                   row_len: int | None = None, chunk_records: int = 64, progress: bool = True,
                   hidden_fn=None) -> dict[str, Any]:
    """Write ``<data_path>.hidden``, the distiller's ``--keep-hidden`` sidecar, from the records
    alone: each answer's prompt is rebuilt with the chat template, prompt + answer are run
    through the base (teacher forcing, ``batch_rows`` packed rows of ``row_len`` tokens per
    call, one compiled shape) and the final-normed states at the answer positions are stored as
    float16 rows at the records' offsets.

    Resumable: rows are written in file order, a chunk of records at a time, and a rerun keeps
    the rows of the records already complete. Returns a summary with ``rows``, ``positions_per_s``
    and ``greedy_agreement`` (the share of rebuilt rows whose LM-head argmax is the recorded
    token)."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from medusa_jax.model.llama import convert_layout, lm_head_weight
    from medusa_jax.tokenizer import apply_chat_template
    from medusa_jax.training.step import make_hidden_fn

    recs = check_rebuild(data_path, batch_rows)
    dim = cfg.hidden_size
    dims = {int(r["hidden"].get("dim", dim)) for r in recs}
    if dims != {dim}:
        raise DataError(f"{data_path}: hidden states of size {sorted(dims)}, but this model's "
                        f"hidden size is {dim} (distilled with another model)")
    ends = np.cumsum([sum(int(n) for n in r["hidden"]["rows"]) for r in recs])
    total = int(ends[-1])
    side = hidden_path(data_path)
    have = os.path.getsize(side) // (2 * dim) if os.path.exists(side) else 0
    done = int(np.searchsorted(ends, min(have, total), side="right"))  # complete records
    keep = int(ends[done - 1]) if done else 0
    with open(side, "r+b" if os.path.exists(side) else "wb") as f:
        f.truncate(keep * dim * 2)

    encode = lambda msgs: apply_chat_template(tokenizer, msgs)  # noqa: E731
    todo = recs[done:]
    if row_len is None:  # one shape for the whole file: its longest sequence, rounded up
        longest = max(len(s) for r in recs[done:] or recs[-1:] for s, _ in
                      _answer_sequences(r, encode))
        row_len = max(128, -(-longest // 128) * 128)
    params = jax.device_put(convert_layout(params, cfg))
    hidden_fn = hidden_fn or make_hidden_fn(cfg)
    lm = lm_head_weight(params, cfg)
    argmax = jax.jit(lambda x: jnp.argmax(x @ lm.astype(x.dtype), -1))

    t0, rows_done, agree, checked = time.perf_counter(), 0, 0, 0
    bar = tqdm(total=total - keep, unit="row", desc="hidden states", disable=not progress,
               dynamic_ncols=True)
    with open(side, "ab") as out:
        for c in range(0, len(todo), chunk_records):
            chunk = todo[c: c + chunk_records]
            seqs, ns, tokens = [], [], []
            for r in chunk:
                for (s, n), toks in zip(_answer_sequences(r, encode), r["answer_tokens"],
                                        strict=True):
                    if len(s) > row_len:
                        raise DataError(f"record {r.get('id')!r}: prompt + answer of {len(s)} "
                                        f"tokens is longer than the packed rows ({row_len})")
                    seqs.append(s)
                    ns.append(n)
                    tokens.append(toks)
            result: list[np.ndarray | None] = [None] * len(seqs)
            packed = _pack_rows(seqs, row_len)
            for b in range(0, len(packed), batch_rows):
                group = packed[b: b + batch_rows]
                ids = np.zeros((batch_rows, row_len), np.int32)
                pos = np.zeros((batch_rows, row_len), np.int32)
                seg = np.full((batch_rows, row_len), -1, np.int32)  # padding: its own segment
                where = []
                for r, members in enumerate(group):
                    o = 0
                    for k, i in enumerate(members):
                        n = len(seqs[i])
                        ids[r, o: o + n] = seqs[i]
                        pos[r, o: o + n] = np.arange(n)
                        seg[r, o: o + n] = k
                        where.append((i, r, o + n - ns[i], o + n))
                        o += n
                h = np.asarray(hidden_fn(params, {"input_ids": ids, "positions": pos,
                                                  "segment_ids": seg}))
                for i, r, lo, hi in where:
                    result[i] = h[r, lo:hi]
            states = np.concatenate(result)
            sample = slice(0, min(256, states.shape[0]))  # the check costs an LM-head product
            got = np.asarray(argmax(jnp.asarray(states[sample], jnp.float32)))
            rows = states.astype(HIDDEN_DTYPE)
            want = np.concatenate([np.asarray(t, np.int64) for t in tokens])[sample]
            agree += int((got == want).sum())
            checked += int(got.shape[0])
            out.write(rows.tobytes())
            out.flush()
            os.fsync(out.fileno())
            rows_done += rows.shape[0]
            bar.update(rows.shape[0])
    bar.close()
    wall = time.perf_counter() - t0
    return {"data": data_path, "sidecar": side, "records": len(recs), "rows": total,
            "kept_rows": keep, "computed_rows": rows_done, "row_len": row_len,
            "wall_s": round(wall, 1),
            "positions_per_s": round(rows_done / wall, 1) if rows_done else None,
            "greedy_agreement": round(agree / checked, 4) if checked else None,
            "checked_rows": checked}
