"""The distilled-data store (medusa_jax.training.data_store): xz shards that only grow, written
back byte for byte, and the hidden-state sidecar rebuilt from the records alone equal to the
one the distiller kept. Tiny random model, the real SmolLM2 tokenizer (as tests/test_distill.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from medusa_jax.config import tiny_config
from medusa_jax.errors import DataError
from medusa_jax.training import data_store
from medusa_jax.training.distill import Distiller
from medusa_jax.training.distill_refill import hidden_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(max_new_tokens=6, batch_size=2, max_prompt_tokens=96, progress=False)
SOURCE = [
    {"id": "a", "conversations": [
        {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "And another one?"}, {"from": "gpt", "value": "Red."}]},
    {"id": "b", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "4"},
        {"from": "human", "value": "And three plus three?"}]},
    {"id": "c", "conversations": [{"from": "human", "value": "Say hi."}]},
    {"id": "e", "conversations": [
        {"from": "human", "value": "Count to three."}, {"from": "gpt", "value": "1 2 3"},
        {"from": "human", "value": "Now backwards."}, {"from": "gpt", "value": "3 2 1"}]},
    {"id": "f", "conversations": [{"from": "human", "value": "Why is the sky blue?"}]},
]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A --keep-hidden distillation of SOURCE (two turns each) and its distiller."""
    from medusa_jax.model import init_params
    from medusa_jax.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cfg = tiny_config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256, scan_layers=False)
    dist = Distiller(cfg, init_params(cfg, jax.random.PRNGKey(3)), tok)
    d = tmp_path_factory.mktemp("distilled")
    src = d / "src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in SOURCE))
    out = d / "out.jsonl"
    dist.run(str(src), str(out), max_turns=2, engine="refill", keep_hidden=True, **KW)
    return dist, str(out)


def _rows(path, dim):
    return np.fromfile(hidden_path(path), np.float16).reshape(-1, dim).astype(np.float32)


def _copy_records(src, dst):
    shutil.copyfile(src, dst)
    return str(dst)


def test_rebuilt_hidden_states_equal_the_distillers(distilled, tmp_path):
    """Every answer's prompt (system turn, earlier turns with the model's own answers) is
    rebuilt and run teacher-forced: the rows equal those kept while generating, up to the
    float16 rounding of the sidecar, and the base's greedy choice at each row is the token."""
    dist, out = distilled
    recs = [json.loads(x) for x in open(out)]
    assert any(len(r["answer_tokens"]) == 2 for r in recs)  # later turns are covered
    assert any(r["conversations"][0]["from"] == "system" for r in recs)
    data = _copy_records(out, tmp_path / "copy.jsonl")
    s = data_store.rebuild_hidden(dist.cfg, dist.params, dist.tokenizer, data, progress=False,
                                  batch_rows=2)
    kept, rebuilt = _rows(out, dist.cfg.hidden_size), _rows(data, dist.cfg.hidden_size)
    assert rebuilt.shape == kept.shape == (s["rows"], dist.cfg.hidden_size)
    np.testing.assert_allclose(rebuilt, kept, rtol=2e-2, atol=2e-2)
    assert s["greedy_agreement"] == 1.0 and s["checked_rows"] == s["rows"]


def test_an_interrupted_rebuild_resumes_to_the_same_file(distilled, tmp_path):
    from medusa_jax.training.step import make_hidden_fn

    dist, out = distilled
    full = _copy_records(out, tmp_path / "full.jsonl")
    kw = dict(progress=False, batch_rows=2, chunk_records=2)
    data_store.rebuild_hidden(dist.cfg, dist.params, dist.tokenizer, full, **kw)
    real, calls = make_hidden_fn(dist.cfg), [0]

    def crashing(params, batch):
        calls[0] += 1
        if calls[0] > 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(params, batch)

    part = _copy_records(out, tmp_path / "part.jsonl")
    with pytest.raises(KeyboardInterrupt):
        data_store.rebuild_hidden(dist.cfg, dist.params, dist.tokenizer, part,
                                  hidden_fn=crashing, **kw)
    dim = dist.cfg.hidden_size
    have = os.path.getsize(hidden_path(part)) // (2 * dim)
    assert 0 < have < _rows(full, dim).shape[0]
    with open(hidden_path(part), "ab") as f:  # half a record's rows: cut back, recomputed
        f.write(np.ones((3, dim), np.float16).tobytes())
    s = data_store.rebuild_hidden(dist.cfg, dist.params, dist.tokenizer, part, **kw)
    assert s["kept_rows"] == have and s["computed_rows"] == s["rows"] - have
    assert open(hidden_path(part), "rb").read() == open(hidden_path(full), "rb").read()


def test_rebuild_refuses_records_it_cannot_place(distilled, tmp_path):
    dist, out = distilled
    recs = [json.loads(x) for x in open(out)]
    bad = tmp_path / "gap.jsonl"
    recs[1]["hidden"]["offset"] += 1
    bad.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(DataError, match="offset"):
        data_store.check_rebuild(str(bad), 4)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"id": "x", "conversations": []}) + "\n")
    with pytest.raises(DataError, match="without --keep-hidden"):
        data_store.check_rebuild(str(plain), 4)


def _lines(n, start=0):
    return [json.dumps({"id": f"r{i}", "conversations": [{"from": "human", "value": "q"},
                                                         {"from": "gpt", "value": f"a{i}"}],
                        "answer_tokens": [[i, i + 1]],
                        "hidden": {"offset": 2 * i, "rows": [2], "dim": 4}}) + "\n"
            for i in range(start, start + n)]


def test_pack_appends_shards_and_unpack_writes_the_file_back(tmp_path):
    store, data = str(tmp_path / "store"), tmp_path / "d.jsonl"
    data.write_text("".join(_lines(5)))
    s = data_store.pack(str(data), store, shard_records=3, source={"command": "distil"})
    assert (s["added"], s["shards"], s["records"]) == (5, ["part-00000.jsonl.xz",
                                                           "part-00001.jsonl.xz"], 5)
    data.write_text("".join(_lines(7)) + '{"id": "half')  # grown by a resumed run, torn tail
    s = data_store.pack(str(data), store)
    assert (s["added"], s["shards"], s["skipped_lines"]) == (2, ["part-00002.jsonl.xz"], 1)
    assert (s["answer_tokens"], s["hidden_rows"], s["answers"]) == (14, 14, 7)
    assert data_store.pack(str(data), store)["added"] == 0
    m = data_store.read_manifest(store)
    assert [x["records"] for x in m["shards"]] == [3, 2, 2]
    assert m["shards"][0]["source"] == {"command": "distil"} and m["hidden_dim"] == 4
    back = tmp_path / "back.jsonl"
    assert data_store.unpack(store, str(back))["written"]
    assert back.read_text() == "".join(_lines(7))
    assert not data_store.unpack(store, str(data))["written"]  # already holds them: untouched
    short = tmp_path / "short.jsonl"
    short.write_text("".join(_lines(4)))
    assert data_store.unpack(store, str(short))["written"]  # a prefix of the store: replaced
    assert short.read_text() == "".join(_lines(7))


def test_a_store_only_grows_by_appending(tmp_path):
    store, data = str(tmp_path / "store"), tmp_path / "d.jsonl"
    data.write_text("".join(_lines(4)))
    data_store.pack(str(data), store)
    before = {f: open(os.path.join(store, f), "rb").read() for f in os.listdir(store)}
    other = tmp_path / "other.jsonl"
    other.write_text("".join(_lines(3, start=1)) + "".join(_lines(3, start=9)))
    with pytest.raises(DataError, match="record 1 is id 'r1', the store's 'r0'"):
        data_store.pack(str(other), store)
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(_lines(4)).replace('"a2"', '"A2"'))
    with pytest.raises(DataError, match=r"record 3 \(id 'r2'\) differs"):
        data_store.pack(str(edited), store)
    with pytest.raises(DataError, match="not the store's data"):
        data_store.unpack(store, str(edited))
    assert edited.read_text() == "".join(_lines(4)).replace('"a2"', '"A2"')
    after = {f: open(os.path.join(store, f), "rb").read() for f in os.listdir(store)}
    assert after == before


def test_a_damaged_shard_is_refused(tmp_path):
    store, data = str(tmp_path / "store"), tmp_path / "d.jsonl"
    data.write_text("".join(_lines(4)))
    data_store.pack(str(data), store)
    shard = os.path.join(store, "part-00000.jsonl.xz")
    raw = bytearray(open(shard, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(raw))
    with pytest.raises(DataError, match="does not match its SHA-256"):
        data_store.unpack(store, str(tmp_path / "out.jsonl"))
    assert not os.path.exists(tmp_path / "out.jsonl")
    with open(os.path.join(store, "MANIFEST.json"), "w") as f:
        f.write('{"format": "something else"}')
    with pytest.raises(DataError, match="not a medusa_jax data store manifest"):
        data_store.read_manifest(store)


@pytest.mark.parametrize("argv, message", [
    (["pack", "--data", "{tmp}/missing.jsonl", "--store", "{tmp}/s"], "no such distilled data"),
    (["unpack", "--store", "{tmp}/empty", "--out", "{tmp}/o.jsonl"], "holds no records"),
    (["hidden", "--data", "{tmp}/plain.jsonl"], "without --keep-hidden"),
    (["hidden", "--data", "{tmp}/plain.jsonl", "--batch-rows", "0"], "batch_rows must be >= 1"),
])
def test_the_data_command_refuses_bad_input_with_status_2(tmp_path, argv, message):
    (tmp_path / "plain.jsonl").write_text(json.dumps({"id": "x", "conversations": []}) + "\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    p = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "data", *argv],
                       capture_output=True, text=True, cwd=REPO, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("error:") == 1 and message in p.stderr


def test_a_distillation_resumes_on_an_unpacked_file_once_its_hidden_states_are_rebuilt(
        distilled, tmp_path):
    """The workflow of a fresh checkout: unpack the store (records only), rebuild the sidecar,
    resume distilling. Without the sidecar the resume is refused with the rebuild command."""
    dist, out = distilled
    store = str(tmp_path / "store")
    data_store.pack(out, store)
    data = str(tmp_path / "data.jsonl")
    data_store.unpack(store, data)
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in SOURCE))
    with pytest.raises(DataError, match="train.py data hidden --data"):
        dist.run(str(src), data, max_turns=2, engine="refill", keep_hidden=True, **KW)
    data_store.rebuild_hidden(dist.cfg, dist.params, dist.tokenizer, data, progress=False)
    s = dist.run(str(src), data, max_turns=2, engine="refill", keep_hidden=True, **KW)
    assert s["skipped"]["already_done"] == len(SOURCE)
    assert open(data, "rb").read() == open(out, "rb").read()
