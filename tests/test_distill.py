"""Self-distillation (medusa_jax.training.distill) with a tiny random model and the real
SmolLM2 tokenizer (the tiny config takes its 49152-token vocabulary)."""

from __future__ import annotations

import collections
import json

import jax
import pytest

from medusa_jax.config import tiny_config
from medusa_jax.decoding.common import GenerationSettings
from medusa_jax.training.distill import Distiller, read_done_ids

MAX_NEW = 6
BATCH = 4
KW = dict(max_new_tokens=MAX_NEW, batch_size=BATCH, max_prompt_tokens=96, progress=False)

GOOD = [
    {"id": "a", "conversations": [
        {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "And another one?"}, {"from": "gpt", "value": "Red."}]},
    {"id": "b", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "4"}]},
    {"id": "c", "conversations": [{"from": "human", "value": "Say hi."}]},
    # ShareGPT splits often start with the assistant: that turn is dropped
    {"id": "d", "messages": [
        {"role": "assistant", "content": "(cut)"}, {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Rayleigh."}]},
    {"id": "e", "conversations": [
        {"from": "human", "value": "Count to three."}, {"from": "gpt", "value": "1 2 3"},
        {"from": "human", "value": "Now backwards."}, {"from": "gpt", "value": "3 2 1"}]},
]
MALFORMED = [
    {"id": "bad1", "conversations": [{"from": "robot", "value": "x"}]},  # unknown_role
    {"id": "bad2", "conversations": [{"from": "gpt", "value": "only me"}]},  # no_user_turn
    {"id": "long", "conversations": [{"from": "human", "value": "word " * 200}]},
    {"id": "a", "conversations": [{"from": "human", "value": "duplicate id"}]},
]


@pytest.fixture(scope="module")
def distiller():
    from medusa_jax.model import init_params
    from medusa_jax.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cfg = tiny_config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256, scan_layers=False)
    return Distiller(cfg, init_params(cfg, jax.random.PRNGKey(3)), tok)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src.jsonl"
    lines = [json.dumps(r) for r in GOOD[:2]] + ["{not json"]
    lines += [json.dumps(r) for r in MALFORMED] + [json.dumps(r) for r in GOOD[2:]]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class Recorder:
    """Wraps ``Distiller.generate_batch`` to capture prompts and optionally crash."""

    def __init__(self, distiller, monkeypatch, fail_on_call: int | None = None):
        self.calls = []
        real = distiller.generate_batch

        def wrapped(prompts, settings, batch_size, seed, **kw):
            if fail_on_call is not None and len(self.calls) + 1 == fail_on_call:
                raise KeyboardInterrupt("simulated interruption")
            outs = real(prompts, settings, batch_size, seed, **kw)
            self.calls.append((prompts, outs))
            return outs

        monkeypatch.setattr(distiller, "generate_batch", wrapped)


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_output_format_and_summary(distiller, source, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = distiller.run(source, out, max_turns=2, **KW)
    recs = {r["id"]: r for r in _records(out)}
    assert set(recs) == {"a", "b", "c", "d", "e"}
    assert summary["written"] == 5
    assert summary["skipped"] == {"invalid_json": 1, "unknown_role": 1, "no_user_turn": 1,
                                  "prompt_too_long": 1, "duplicate_id": 1, "already_done": 0}
    assert summary["turns_answered"] == 7 and summary["batches"] == 3
    assert summary["tokens_generated"] <= 7 * MAX_NEW and summary["tokens_generated"] > 0
    b = recs["b"]["conversations"]
    assert [t["from"] for t in b] == ["system", "human", "gpt"]
    assert b[0]["value"] == "Be brief." and b[1]["value"] == "What is two plus two?"
    a = recs["a"]["conversations"]
    assert [t["from"] for t in a] == ["human", "gpt", "human", "gpt"]
    assert [a[0]["value"], a[2]["value"]] == ["Name a colour.", "And another one?"]
    assert a[1]["value"] != "Blue." and a[3]["value"] != "Red."  # originals discarded
    assert [t["from"] for t in recs["d"]["conversations"]] == ["human", "gpt"]
    for r in recs.values():
        assert isinstance(r["truncated"], bool)
        assert all(t["value"].strip() for t in r["conversations"])
    # the random model (almost) never emits EOS: answers run to max_new_tokens
    assert summary["truncated_answers"] == sum(r["truncated"] for r in recs.values()) >= 4
    # max_turns=1 answers only the first user turn
    out1 = tmp_path / "out1.jsonl"
    distiller.run(source, out1, max_turns=1, max_conversations=2, **KW)
    assert [len(r["conversations"]) for r in _records(out1)] == [2, 3]


def test_multi_turn_feeds_own_answers(distiller, source, tmp_path, monkeypatch):
    rec = Recorder(distiller, monkeypatch)
    out = tmp_path / "out.jsonl"
    distiller.run(source, out, max_turns=2, **KW)
    recs = {r["id"]: r for r in _records(out)}
    # the plan puts the two-turn conversations first: call 0 is their turn 0, call 1 turn 1
    turn2_prompts = [distiller.tokenizer.decode(p) for p in rec.calls[1][0]]
    assert len(turn2_prompts) == 2
    for cid in ("a", "e"):
        conv = recs[cid]["conversations"]
        own, original, second = conv[1]["value"], GOOD[0 if cid == "a" else 4], conv[2]["value"]
        matching = [p for p in turn2_prompts if second in p]
        assert len(matching) == 1
        assert own in matching[0]
        assert original["conversations"][1]["value"] not in matching[0]


def test_resume_after_interruption_matches_uninterrupted(distiller, source, tmp_path,
                                                         monkeypatch):
    full = tmp_path / "full.jsonl"
    distiller.run(source, full, max_turns=2, **KW)
    expected = full.read_text()

    out = tmp_path / "resumed.jsonl"
    with monkeypatch.context() as m:
        Recorder(distiller, m, fail_on_call=3)  # dies in the second group
        with pytest.raises(KeyboardInterrupt):
            distiller.run(source, out, max_turns=2, **KW)
    first_group = _records(out)
    assert len(first_group) == BATCH  # the finished group was written before the crash

    rec = Recorder(distiller, monkeypatch)
    summary = distiller.run(source, out, max_turns=2, **KW)
    assert summary["skipped"]["already_done"] == BATCH and summary["written"] == 1
    assert len(rec.calls) == 1  # only the unfinished group was generated
    assert out.read_text() == expected
    # a third run has nothing left to do
    summary = distiller.run(source, out, max_turns=2, **KW)
    assert summary["written"] == 0 and summary["batches"] == 0
    assert out.read_text() == expected


def test_half_written_last_line_is_recovered(distiller, source, tmp_path):
    full = tmp_path / "full.jsonl"
    distiller.run(source, full, max_turns=2, **KW)
    expected = full.read_text()
    lines = expected.splitlines(keepends=True)
    out = tmp_path / "cut.jsonl"
    # a crash in the middle of the first group's write: one full line and half of the next
    out.write_text(lines[0] + lines[1][: len(lines[1]) // 2])
    assert read_done_ids(out, repair=False) == ({json.loads(lines[0])["id"]}, 0)
    summary = distiller.run(source, out, max_turns=2, **KW)
    assert summary["skipped"]["already_done"] == 1 and summary["written"] == 4
    assert out.read_text() == expected
    # a complete last record that only lost its newline is kept
    out.write_text(lines[0].rstrip("\n"))
    assert read_done_ids(out) == ({json.loads(lines[0])["id"]}, 0)
    assert out.read_text() == lines[0]


def test_malformed_output_lines_are_counted(distiller, source, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('garbage\n{"no_id": 1}\n')
    summary = distiller.run(source, out, max_turns=1, max_conversations=1, **KW)
    assert summary["skipped"]["malformed_output_line"] == 2
    assert summary["written"] == 1
    assert out.read_text().startswith('garbage\n{"no_id": 1}\n')  # left in place
    # resume=False starts over
    summary = distiller.run(source, out, max_turns=1, max_conversations=1, resume=False, **KW)
    assert len(_records(out)) == 1 and "malformed_output_line" not in summary["skipped"]


def test_greedy_is_deterministic_and_sampling_follows_the_seed(distiller, tmp_path):
    records = GOOD[1:4]
    texts = []
    for i, kw in enumerate([{}, {}, {"temperature": 1.0, "seed": 1},
                            {"temperature": 1.0, "seed": 1}, {"temperature": 1.0, "seed": 2}]):
        out = tmp_path / f"o{i}.jsonl"
        distiller.run(records, out, **kw, **KW)
        texts.append(out.read_text())
    assert texts[0] == texts[1]
    assert texts[2] == texts[3] and texts[2] != texts[4]


def test_argument_checks(distiller, tmp_path):
    with pytest.raises(ValueError, match="must fit the model's context"):
        distiller.run(GOOD, tmp_path / "x.jsonl", max_new_tokens=200, max_prompt_tokens=100)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        distiller.run(GOOD, tmp_path / "x.jsonl", batch_size=0)


def test_a_bad_run_never_costs_the_output_its_records(distiller, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    old = json.dumps({"id": "old", "conversations": [{"from": "human", "value": "x"}]}) + "\n"
    out.write_text(old)
    # nothing usable: refused before the output is opened, resuming or not
    for resume in (False, True):
        with pytest.raises(ValueError, match="no usable conversations.*unknown_role=1"):
            distiller.run(MALFORMED[:2], out, resume=resume, **KW)
        assert out.read_text() == old
    # an overwrite interrupted before its first batch is written leaves the old file whole
    with monkeypatch.context() as m:
        Recorder(distiller, m, fail_on_call=1)
        with pytest.raises(KeyboardInterrupt):
            distiller.run(GOOD, out, resume=False, **KW)
    assert out.read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temporary left
    with pytest.raises(ValueError, match="is a directory"):
        distiller.run(GOOD, tmp_path, **KW)
    with pytest.raises(ValueError, match="max_conversations must be an integer >= 1"):
        distiller.run(GOOD, out, max_conversations=0, resume=False, **KW)
    assert out.read_text() == old


# ------------------------------------------------------------ the refilling engine (issue 14)


def _crash_after(monkeypatch, calls: int):
    """Make the refilling engine's decode loop raise KeyboardInterrupt on call ``calls + 1``."""
    import medusa_jax.decoding.refill as refill

    real, n = refill.decode_until_free, [0]

    def wrapped(*a, **k):
        n[0] += 1
        if n[0] > calls:
            raise KeyboardInterrupt("simulated interruption")
        return real(*a, **k)

    monkeypatch.setattr(refill, "decode_until_free", wrapped)


def test_refill_engine_writes_the_batch_engines_records(distiller, source, tmp_path):
    """Greedy: each answer is the prompt decoded alone, so both engines write the same records
    (the batch engine in its plan's order, the refill engine in the source's); malformed
    records are counted the same way."""
    a, b = tmp_path / "batch.jsonl", tmp_path / "refill.jsonl"
    sa = distiller.run(source, a, max_turns=2, **KW)
    sb = distiller.run(source, b, max_turns=2, engine="refill", **KW)
    by_id = lambda p: sorted(_records(p), key=lambda r: r["id"])  # noqa: E731
    assert by_id(b) == by_id(a)
    assert [r["id"] for r in _records(b)] == ["a", "b", "c", "d", "e"]
    assert sb["skipped"] == sa["skipped"] and sb["turns_answered"] == sa["turns_answered"] == 7
    assert sb["tokens_generated"] == sa["tokens_generated"]
    for summary in (sa, sb):
        assert 0 < summary["row_occupancy"] <= 1
    assert sa["queue_tokens_per_second"] is None and sa["queue_token_share"] is None
    assert sb["queue_tokens_per_second"] > 0 and 0 < sb["queue_token_share"] < 1


def test_batch_engine_counts_its_busy_rows(distiller):
    """A static batch decodes until its longest answer ends: its decode steps are that answer's
    length - 1 (the first token comes from the prefill), and only the real rows' other tokens
    are busy row-steps (the filler rows and the rows done early are not)."""
    texts = ("Hi.", "Count to three.", "Why is the sky blue?")
    prompts = [distiller.encode([{"role": "user", "content": t}]) for t in texts]
    free = distiller.generate_batch(prompts, GenerationSettings(12), 4, 0)
    # an EOS the random model hits at different depths, so the rows finish apart
    eos = collections.Counter(t for a in free for t in a[1:10]).most_common(1)[0][0]
    counts = collections.Counter()
    outs = distiller.generate_batch(prompts, GenerationSettings(12, eos_token_ids=(eos,)), 4, 0,
                                    counts=counts)
    assert len({len(t) for t in outs}) > 1, "the test needs answers of different lengths"
    assert counts["decode_steps"] == max(len(t) for t in outs) - 1
    assert counts["busy_row_steps"] == sum(len(t) - 1 for t in outs)


def test_refill_interrupted_and_resumed_gives_the_same_files(distiller, source, tmp_path,
                                                             monkeypatch):
    from medusa_jax.training.cached import HiddenSet
    from medusa_jax.training.distill_refill import hidden_path, read_hidden

    kw = dict(KW, batch_size=2)
    full = tmp_path / "full.jsonl"
    distiller.run(source, full, max_turns=2, engine="refill", keep_hidden=True, **kw)
    out = tmp_path / "resumed.jsonl"
    with monkeypatch.context() as m:
        _crash_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            distiller.run(source, out, max_turns=2, engine="refill", keep_hidden=True, **kw)
    partial = _records(out)
    assert 0 < len(partial) < 5
    with open(hidden_path(str(out)), "ab") as f:  # rows of a record that was never written
        f.write(b"\0" * 64)
    summary = distiller.run(source, out, max_turns=2, engine="refill", keep_hidden=True, **kw)
    assert summary["skipped"]["already_done"] == len(partial)
    assert out.read_text() == full.read_text()
    assert (open(hidden_path(str(out)), "rb").read()
            == open(hidden_path(str(full)), "rb").read())
    recs, answers, hiddens = read_hidden(str(out), distiller.cfg.hidden_size)
    assert len(recs) == 5 and len(answers) == 7
    for r in recs:
        gpt = [t for t in r["conversations"] if t["from"] == "gpt"]
        assert len(r["answer_tokens"]) == len(gpt) == len(r["hidden"]["rows"])
    assert [h.shape[0] for h in hiddens] == [len(a) for a in answers]
    hs = HiddenSet.from_answers(hiddens, answers, num_heads=2)
    assert len(hs) == sum(len(a) for a in answers)


def test_keep_hidden_needs_the_refill_engine(distiller, source, tmp_path):
    from medusa_jax.config import ConfigError

    with pytest.raises(ConfigError, match="keep_hidden needs engine='refill'"):
        distiller.run(source, tmp_path / "x.jsonl", keep_hidden=True, **KW)
    with pytest.raises(ConfigError, match="engine must be"):
        distiller.run(source, tmp_path / "x.jsonl", engine="fast", **KW)
