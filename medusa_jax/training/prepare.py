"""Run data preparation: the run's tokenizer (or a byte-level stand-in for tests), conversations
to fixed-length arrays with a held-out split, cached on disk keyed by a hash of the inputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import zipfile
from typing import Any

import numpy as np

from medusa_jax.errors import DataError, MissingFileError
from medusa_jax.training.data.batching import prepare_arrays
from medusa_jax.training.data.conversations import load_conversations, load_sharegpt
from medusa_jax.training.data.sources import DataReport, sharegpt_path
from medusa_jax.training.run_config import BYTES_TOKENIZER, RunConfig

log = logging.getLogger("medusa_jax.train")

_CACHE_VERSION = 2  # 2: held-out split by a hash of each conversation's id


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------


class ByteTokenizer:
    """A byte-level stand-in tokenizer with a ChatML template (tests and smoke runs): id 0 is
    ``<pad>``, 1 ``<|im_start|>``, 2 ``<|im_end|>`` (end of turn), byte b is ``b + 3``."""

    specials = ("<pad>", "<|im_start|>", "<|im_end|>")
    chat_template = "chatml (byte-level stand-in)"
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    unk_token_id = unk_token = None
    vocab_size = 259
    _split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")

    @property
    def all_special_ids(self) -> list[int]:
        return [0, 1, 2]

    @property
    def added_tokens_decoder(self) -> dict[int, str]:
        return dict(enumerate(self.specials))

    def __len__(self) -> int:
        return self.vocab_size

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        text += "<|im_start|>assistant\n" if add_generation_prompt else ""
        return self.encode(text) if tokenize else text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self.specials:
                ids.append(self.specials.index(part))
            else:
                ids.extend(b + 3 for b in part.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if int(i) >= self.vocab_size:  # a padded model vocabulary's rows: no text
                continue
            if int(i) >= 3:
                buf.append(int(i) - 3)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(self.specials[int(i)])
        return "".join(out) + buf.decode("utf-8", errors="replace")


_BYTE_TOKENIZER = ByteTokenizer()


def _tokenizer_source(run_cfg: RunConfig) -> str | None:
    m = run_cfg.model
    return m.tokenizer if m.tokenizer is not None else (None if m.tiny else m.path)


def load_run_tokenizer(run_cfg: RunConfig) -> Any:
    """The tokenizer a run trains with (see ``ModelSection.tokenizer``)."""
    source = _tokenizer_source(run_cfg)
    if source == BYTES_TOKENIZER:
        return _BYTE_TOKENIZER
    from medusa_jax.tokenizer import load_tokenizer

    return load_tokenizer(source)


def file_identity(path: str) -> list:
    """Path, size and mtime of a file (or of each file directly inside a directory): what a
    cache key records of an input, so that a changed file misses the cache."""
    if os.path.isdir(path):
        return [file_identity(os.path.join(path, n)) for n in sorted(os.listdir(path))
                if os.path.isfile(os.path.join(path, n))]
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PreparedData:
    """Tokenised fixed-length rows (``[N, seq_len]`` int32 dicts) and what happened to the
    records: ``report`` holds the read/skip counts and ``summary`` (one line)."""

    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray] | None
    report: dict
    cache_file: str | None = None


def split_key(messages: list[dict[str, str]], record_id: str | None) -> str:
    """What decides a conversation's side of the held-out split: its record id, or (for a
    record without one) its first user turn."""
    if record_id is not None:
        return f"id:{record_id}"
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    return "user:" + first


def held_out_mask(keys: list[str], fraction: float) -> np.ndarray:
    """Which conversations are held out: those whose key hashes (SHA-256) below ``fraction``
    of the hash range. A conversation's side depends on its key alone, so it stays put when
    the data file grows or is reordered. At least one conversation lands on each side (when
    ``fraction > 0`` and there are two or more): the smallest / largest hashes move."""
    n = len(keys)
    if fraction <= 0 or n < 2:
        return np.zeros(n, bool)
    u = np.array([int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") / 2.0 ** 64
                  for k in keys])
    held = u < fraction
    if not held.any():
        held[np.argmin(u)] = True
    if held.all():
        held[np.argmax(u)] = False
    return held


def _split_conversations(convs: list, fraction: float, ids: list) -> tuple[list, list]:
    """The held-out share of ``convs`` by :func:`held_out_mask` of their :func:`split_key`."""
    ids = ids if len(ids) == len(convs) else [None] * len(convs)
    held = held_out_mask([split_key(c, i) for c, i in zip(convs, ids, strict=True)], fraction)
    return ([c for c, h in zip(convs, held, strict=True) if not h],
            [c for c, h in zip(convs, held, strict=True) if h])


def prepare_data(run_cfg: RunConfig) -> PreparedData:
    """Conversations -> held-out split -> tokenised rows, from the cache when the data file,
    the tokenizer and every setting they depend on are unchanged. Malformed records are
    counted in the report; ValueError when nothing trainable remains."""
    d, t = run_cfg.data, run_cfg.train
    source = os.path.abspath(os.path.expanduser(d.path)) if d.path else sharegpt_path()
    if not os.path.isfile(source):
        raise MissingFileError(f"data file {source} does not exist")
    tok_source = _tokenizer_source(run_cfg)
    if tok_source == BYTES_TOKENIZER:
        tok_id: Any = "bytes-v1"
    else:
        from medusa_jax.tokenizer import resolve_model_path

        tok_id = file_identity(resolve_model_path(tok_source))
    key = {"version": _CACHE_VERSION, "data": file_identity(source), "tokenizer": tok_id,
           "max_records": d.max_records, "mode": d.mode, "seq_len": t.seq_len, "seed": t.seed,
           "drop_leading_assistant": d.drop_leading_assistant, "eval_fraction": d.eval_fraction}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    cache_file = os.path.join(run_cfg.paths().data_cache, f"{digest}.npz") if d.cache else None
    if cache_file and os.path.isfile(cache_file):
        cached = _read_cache(cache_file)
        if cached is not None:
            log.info("tokenised data from the cache %s", cache_file)
            return cached

    if d.path:
        convs, rep = load_conversations(source, max_records=d.max_records,
                                        drop_leading_assistant=d.drop_leading_assistant)
    else:
        convs, rep = load_sharegpt(d.max_records, drop_leading_assistant=d.drop_leading_assistant)
    train_convs, eval_convs = _split_conversations(convs, d.eval_fraction, rep.ids)
    tok = load_run_tokenizer(run_cfg)
    train = prepare_arrays(tok, train_convs, t.seq_len, d.mode, report=rep)
    evals = prepare_arrays(tok, eval_convs, t.seq_len, d.mode, report=rep) if eval_convs else None
    if evals is not None and len(evals["input_ids"]) == 0:
        evals = None
    if len(train["input_ids"]) == 0:
        raise DataError(f"no training examples left after tokenisation: {rep.summary()}")
    report = _report_dict(rep, train, evals, len(train_convs), len(eval_convs))
    if cache_file:
        flat = {f"train__{k}": v for k, v in train.items()}
        flat.update({f"eval__{k}": v for k, v in (evals or {}).items()})
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        tmp = f"{cache_file}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, report=np.asarray(json.dumps(report)), **flat)
        os.replace(tmp, cache_file)
    return PreparedData(train, evals, report, cache_file)


def _read_cache(cache_file: str) -> PreparedData | None:
    """The cached arrays, or None (with a warning) when the file is damaged: a cache is only
    a shortcut, so a truncated or foreign file is rebuilt (and replaced) from the data."""
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        report = json.loads(str(arrays.pop("report")))
        split: dict[str, dict[str, np.ndarray]] = {"train": {}, "eval": {}}
        for k, v in arrays.items():
            part, name = k.split("__", 1)
            split[part][name] = v
        if not split["train"].get("input_ids", np.empty(0)).size:
            raise DataError("no training rows")
    # a cut file is a BadZipFile (not an OSError); a cut member an EOFError or ValueError
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as e:
        log.warning("the data cache %s cannot be read (%s: %s): rebuilding it", cache_file,
                    type(e).__name__, e)
        return None
    return PreparedData(split["train"], split["eval"] or None, report, cache_file)


def _report_dict(rep: DataReport, train: dict, evals: dict | None, n_train: int,
                 n_eval: int) -> dict:
    return {
        "source": rep.source, "records_read": rep.records_read, "kept": rep.kept,
        "skipped": dict(rep.skipped), "truncated": rep.truncated, "summary": rep.summary(),
        "train_conversations": n_train, "eval_conversations": n_eval,
        "train_rows": int(len(train["input_ids"])),
        "eval_rows": int(len(evals["input_ids"])) if evals is not None else 0,
        "train_target_tokens": int(train["loss_mask"].sum()),
    }


# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------
