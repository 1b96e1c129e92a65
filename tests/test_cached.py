"""Medusa-1 from cached hidden states and draft vocabularies (training/cached.py): the cached
loss equals the trainer's, a cached run learns and exports heads that decode exactly like
vanilla greedy, and the draft vocabulary is chosen and validated as documented."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from medusa_jax.config import ConfigError, MedusaConfig
from medusa_jax.decoding.common import GenerationSettings
from medusa_jax.decoding.medusa import heads_proposer, make_settings, medusa_generate
from medusa_jax.decoding.vanilla import generate
from medusa_jax.model.heads import init_medusa_params
from medusa_jax.training.cached import (
    HiddenSet,
    _base_logits,
    _heads_stats,
    _load_hidden,
    _save_hidden,
    choose_draft_ids,
    collect_hidden,
    draft_coverage,
    evaluate_cached,
    minibatch,
    train_cached,
)
from medusa_jax.training.loop import Trainer, _eval_fn
from medusa_jax.training.run_config import load_run_config
from medusa_jax.weights.medusa_io import load_heads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def config(run_dir, data_file, *overrides):
    return load_run_config(TINY, [
        f"data.path={data_file}", f"data.cache_dir={run_dir}/cache", f"checkpoint.dir={run_dir}",
        "log.progress=false", "devices=1", *overrides])


def test_choose_draft_ids_by_frequency_with_forced_ids():
    toks = np.array([5, 5, 5, 3, 3, 9, 1, -1, 7, 7])
    assert choose_draft_ids(toks, 2, 10) == (3, 5)  # 5 x3, then 3 and 7 tie at 2: lower id
    assert choose_draft_ids(toks, 2, 10, always=(2,)) == (2, 5)  # forced even when unseen
    assert choose_draft_ids(toks, 100, 10) == (1, 3, 5, 7, 9)  # never pads with unseen ids
    with pytest.raises(ValueError, match=">= 1"):
        choose_draft_ids(toks, 0, 10)
    t = np.array([[5, 1], [3, 1], [8, -1], [-1, 2]])
    assert draft_coverage(t, (3, 5)) == pytest.approx(2 / 3)


def test_draft_ids_are_validated_and_survive_a_save(tmp_path):
    with pytest.raises(ConfigError, match="sorted and unique"):
        MedusaConfig(vocab_size=10, draft_ids=(3, 2))
    with pytest.raises(ConfigError, match=r"\[0, 10\)"):
        MedusaConfig(vocab_size=10, draft_ids=(3, 10))
    with pytest.raises(ConfigError, match="shared_lm_head"):
        MedusaConfig(vocab_size=10, draft_ids=(1, 2), shared_lm_head=False)
    from medusa_jax.weights.medusa_io import save_heads

    mcfg = MedusaConfig(num_heads=2, hidden_size=8, vocab_size=10, draft_ids=[1, 4, 6])
    assert mcfg.draft_size == 3 and "draft_ids" not in repr(mcfg)
    save_heads(tmp_path, mcfg, init_medusa_params(mcfg, scale=0.1))
    loaded, _ = load_heads(tmp_path)
    assert loaded == mcfg and loaded.draft_ids == (1, 4, 6)


@pytest.mark.parametrize("head_type,draft", [("medusa", 0), ("medusa", 8), ("hydra", 0),
                                             ("hydra", 8)],
                         ids=["full_vocab", "draft8", "hydra", "hydra_draft8"])
def test_cached_loss_equals_the_trainer_loss(tmp_path, data_file, head_type, draft):
    tr = Trainer(config(tmp_path, data_file, f"medusa.draft_vocab_size={draft}",
                        f"medusa.head_type={head_type}"))
    mcfg, tcfg = tr.medusa_cfg, tr.tcfg
    assert mcfg.head_type == head_type
    assert (mcfg.draft_ids is None) == (draft == 0)
    if draft:  # chosen from the training targets, end-of-turn forced in
        assert len(mcfg.draft_ids) <= draft and set(tr.model_cfg.eos_token_ids) <= set(mcfg.draft_ids)
    heads = init_medusa_params(mcfg, rng=jax.random.PRNGKey(1), scale=0.3)
    if mcfg.is_hydra:  # the tiny embeddings are ~0.02: make the path inputs weigh something
        heads = dict(heads, in_embed=heads["in_embed"] * 40.0)
    bs = tcfg.batch_size
    batch = {k: v[:bs] for k, v in tr.data.train.items()}
    ref = jax.device_get(_eval_fn(tr.model_cfg, mcfg, tcfg)({"base": tr.base_host, "medusa": heads},
                                                          batch))
    cached = collect_hidden(tr.model_cfg, tr.base_host, batch, mcfg.num_heads, bs)
    lm = tr.base_host["lm_head"]
    emb = tr.base_host["embed"]["embedding"]
    stats, missed = _heads_stats(mcfg, tcfg, heads, lm, cached.hidden, cached.targets,
                                 cached.tokens, emb)
    ce, top1, _, count = (np.array([float(s[i]) for s in stats]) for i in range(4))
    np.testing.assert_array_equal(count, ref["count"])
    np.testing.assert_allclose(ce, ref["ce"], rtol=2e-5)
    np.testing.assert_allclose(top1, ref["top1"], atol=0.5)
    # Every target of the batch is either trained on or counted as outside the draft vocab.
    all_targets = (cached.targets >= 0).sum(0)
    np.testing.assert_array_equal(count + np.asarray(missed), all_targets)
    assert (np.asarray(missed).sum() > 0) == bool(draft)


def test_cached_run_learns_exports_and_decodes_like_vanilla(tmp_path, data_file):
    cfg = config(tmp_path, data_file, "train.cache_hidden=true", "medusa.draft_vocab_size=48",
                 "train.steps=40", "train.token_batch=64", "train.heads_lr=0.05", "log.every_steps=5")
    summary = train_cached(cfg)
    assert summary["hidden_cache"]["status"] == "saved"
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == list(range(5, 41, 5))
    assert lines[-1]["loss"] < 0.8 * lines[0]["loss"]
    assert summary["draft_vocab_size"] <= 48 and 0 < summary["draft_coverage_train"] <= 1

    mcfg, heads = load_heads(summary["exports"]["heads"])
    assert mcfg.draft_ids is not None and len(mcfg.draft_ids) == summary["draft_vocab_size"]
    tr = Trainer(config(tmp_path / "ref", data_file))  # same base weights and eval split
    ev = summary["eval"]
    fresh = evaluate_cached(mcfg, cfg.train, init_medusa_params(mcfg), tr.base_host["lm_head"],
                            collect_hidden(tr.model_cfg, tr.base_host, tr.data.eval,
                                           mcfg.num_heads, cfg.train.batch_size))
    assert ev["head_count"] == fresh["head_count"]
    assert ev["head_top1"][0] > fresh["head_top1"][0] + 0.04
    assert all(a < b for a, b in zip(ev["head_loss"], fresh["head_loss"]))
    ranks = np.asarray(ev["head_rank_acc"])  # per-rank accuracies add up to top-1 / top-5
    assert ranks.shape == (3, 10)
    np.testing.assert_allclose(ranks[:, 0], ev["head_top1"], atol=1e-4)
    np.testing.assert_allclose(ranks[:, :5].sum(1), ev["head_top5"], atol=1e-4)

    params = {"base": tr.base_host, "medusa": heads}
    propose = heads_proposer(mcfg, tr.model_cfg, 3)
    hidden = np.random.default_rng(0).standard_normal((2, tr.model_cfg.hidden_size), np.float32)
    cand = np.asarray(propose(params, hidden, None))
    assert cand.shape == (2, mcfg.num_heads, 3) and np.isin(cand, mcfg.draft_ids).all()
    shallow = np.asarray(heads_proposer(mcfg, tr.model_cfg, 3, 2)(params, hidden, None))
    np.testing.assert_array_equal(shallow, cand[:, :2])  # a depth-2 tree runs 2 heads only

    gen = GenerationSettings(max_new_tokens=24, eos_token_ids=tuple(tr.model_cfg.eos_token_ids))
    prompts = [list(b"count from 7"), list(b"count from 31 please")]
    want = generate(tr.model_cfg, tr.base_host, prompts, gen)["tokens"]
    settings = make_settings([[0], [1], [0, 0], [0, 1], [0, 0, 0]], mcfg.num_heads, gen)
    got = medusa_generate(tr.model_cfg, mcfg, params, prompts, settings)
    assert got["tokens"] == want


def test_trees_shipped_with_heads_are_the_default_per_backend(tmp_path):
    from medusa_jax.api import default_tree, heads_trees
    from medusa_jax.weights.medusa_io import save_heads

    mcfg = MedusaConfig(num_heads=4, hidden_size=8, vocab_size=10)
    cpu_tree = [[0], [0, 0], [1]]
    save_heads(tmp_path, mcfg, init_medusa_params(mcfg), {"trees": {"cpu": cpu_tree}})
    trees = heads_trees(str(tmp_path))
    assert default_tree(mcfg, trees, backend="cpu") == cpu_tree
    assert default_tree(mcfg, trees, backend="gpu") == "mc_sim_7b_63"  # none shipped for GPUs
    assert default_tree(mcfg, {}, backend="cpu") == [[0], [1], [0, 0], [0, 0, 0]]
    assert heads_trees(str(tmp_path / "nowhere")) == {}


def test_a_rerun_reuses_the_hidden_states(tmp_path, data_file):
    args = ("train.cache_hidden=true", "train.steps=6", "train.token_batch=64")
    first = train_cached(config(tmp_path, data_file, *args))
    again = train_cached(config(tmp_path, data_file, *args))
    assert (first["hidden_cache"]["status"], again["hidden_cache"]["status"]) == ("saved", "loaded")
    assert again["eval"] == first["eval"] and again["train_positions"] == first["train_positions"]
    # other heads need other targets: a new cache entry
    other = train_cached(config(tmp_path, data_file, *args, "medusa.num_heads=2"))
    assert other["hidden_cache"]["status"] == "saved"
    assert other["hidden_cache"]["path"] != first["hidden_cache"]["path"]
    with open(first["hidden_cache"]["path"], "wb") as f:  # damaged: recomputed, not fatal
        f.write(b"garbage")
    assert train_cached(config(tmp_path, data_file, *args))["hidden_cache"]["status"] == "saved"


def test_a_truncated_hidden_state_cache_is_recomputed(tmp_path, caplog):
    path = str(tmp_path / "hidden-x.npz")
    h = HiddenSet(np.ones((4, 8), np.float32), np.zeros((4, 2), np.int32))
    _save_hidden(path, h, None)
    assert _load_hidden(path)[1] is None
    with open(path, "r+b") as f:  # a copy or a write cut short: no longer a zip archive
        f.truncate(os.path.getsize(path) // 2)
    assert _load_hidden(path) is None
    assert "damaged hidden-state cache" in caplog.text and "BadZipFile" in caplog.text


def _check_rows(hs: HiddenSet):
    """The documented links between the fields: targets are the path's later tokens, a teacher
    row's next token is the target it teaches, and it is the row k+1 places further on."""
    n, M = hs.targets.shape
    assert hs.tokens.shape == (n, M + 1) and hs.teacher.shape == (n, M)
    has = hs.targets >= 0
    np.testing.assert_array_equal(hs.targets[has], hs.tokens[:, 1:][has])
    np.testing.assert_array_equal(hs.teacher >= 0, has)
    r, k = np.nonzero(has)
    np.testing.assert_array_equal(hs.tokens[hs.teacher[r, k], 0], hs.targets[r, k])
    # one answer's rows in order: the teacher is further on, by k + 1 rows unless a position
    # in between was no target's (a turn that is not the model's)
    assert np.all((hs.teacher[r, k] > r) & (hs.teacher[r, k] <= r + k + 1))
    return has


def test_hidden_set_from_answers_and_collected_rows(tmp_path, data_file):
    hid = [np.arange(8, dtype=np.float32).reshape(4, 2), np.ones((2, 2), np.float32)]
    hs = HiddenSet.from_answers(hid, [np.array([5, 6, 7, 8]), np.array([9, 10])], num_heads=2)
    assert len(hs) == 6
    np.testing.assert_array_equal(hs.tokens[0], [5, 6, 7])
    np.testing.assert_array_equal(hs.targets[:, 0], [6, 7, 8, -1, 10, -1])
    np.testing.assert_array_equal(hs.teacher[:, 1], [2, 3, -1, -1, -1, -1])
    _check_rows(hs)
    with pytest.raises(ValueError, match="answer 1 has 3 tokens"):
        HiddenSet.from_answers(hid, [np.array([5, 6, 7, 8]), np.array([9, 10, 11])], 2)

    tr = Trainer(config(tmp_path, data_file))
    bs = tr.tcfg.batch_size
    batch = {k: v[:bs] for k, v in tr.data.train.items()}
    cached = collect_hidden(tr.model_cfg, tr.base_host, batch, 3, bs)
    has = _check_rows(cached)
    assert has.any(0).all()
    np.testing.assert_array_equal(hs.teacher[:, 0], np.where(hs.targets[:, 0] >= 0,
                                                             np.arange(6) + 1, -1))
    b = minibatch(cached, np.arange(5), tr.medusa_cfg, "base")
    assert b["teacher_hidden"].shape == (5, 3, tr.model_cfg.hidden_size) and "tokens" not in b


def test_base_target_is_the_base_distribution(tmp_path, data_file):
    """``head_target: base``: each head's CE is against softmax(LM head(teacher state)), over
    every position with a target; a head that reproduces the teacher's logits has the lowest."""
    tr = Trainer(config(tmp_path, data_file, "medusa.draft_vocab_size=8"))
    mcfg, tcfg = tr.medusa_cfg, tr.tcfg
    bs = tcfg.batch_size
    batch = {k: v[:bs] for k, v in tr.data.train.items()}
    cached = collect_hidden(tr.model_cfg, tr.base_host, batch, mcfg.num_heads, bs)
    b = minibatch(cached, np.arange(len(cached)), mcfg, "base")
    lm = tr.base_host["lm_head"]
    heads = init_medusa_params(mcfg, rng=jax.random.PRNGKey(1), scale=0.3)
    stats, _ = _heads_stats(mcfg, tcfg, heads, lm, b["hidden"], b["targets"],
                            teacher_hidden=b["teacher_hidden"])
    from medusa_jax.training.cached import _logits_and_targets

    logits = np.asarray(_logits_and_targets(mcfg, heads, lm, b["hidden"], b["targets"])[0], np.float64)
    t = np.asarray(_base_logits(mcfg, lm, b["teacher_hidden"]), np.float64)  # [n, M, V']
    p = np.exp(t - t.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    logq = logits - logits.max(-1, keepdims=True)
    logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
    has = b["targets"] >= 0
    for k in range(mcfg.num_heads):
        want = -(p[:, k] * logq[:, k]).sum(-1)[has[:, k]].sum()
        np.testing.assert_allclose(float(stats[k][0]), want, rtol=1e-4)
        assert float(stats[k][3]) == has[:, k].sum()
    # logits equal to the teacher's: the CE is the teacher's entropy, below the random heads'
    ent = -(p * np.log(np.maximum(p, 1e-30))).sum(-1)
    assert all((ent[:, k][has[:, k]].sum() < float(stats[k][0])) for k in range(mcfg.num_heads))


def test_cached_hydra_run_with_base_targets(tmp_path, data_file):
    cfg = config(tmp_path, data_file, "train.cache_hidden=true", "medusa.head_type=hydra",
                 "train.head_target=base", "medusa.draft_vocab_size=48", "train.steps=30",
                 "train.token_batch=64", "train.heads_lr=0.05", "log.every_steps=5")
    summary = train_cached(cfg)
    assert summary["head_type"] == "hydra" and summary["head_target"] == "base"
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert "heads_v1" not in summary["exports"]  # that layout cannot hold Hydra heads
    mcfg, heads = load_heads(summary["exports"]["heads"])
    assert mcfg.is_hydra and "in_embed" in heads
    ev = summary["eval"]
    cond, count = np.asarray(ev["head_cond_top1"]), np.asarray(ev["head_cond_count"])
    assert cond.shape == (3,) and np.all((cond >= 0) & (cond <= 1))
    assert count[0] == ev["head_count"][0]
    for k in range(1, 3):  # head k is counted only where every earlier head was right
        assert count[k] <= cond[k - 1] * count[k - 1] + 1e-6
    np.testing.assert_allclose(cond[0], ev["head_top1"][0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(ev["head_cond_rank_acc"])[:, 0], cond, atol=1e-4)
    meta = json.loads(open(os.path.join(summary["exports"]["heads"], "medusa_config.json")).read())
    assert meta["metadata"]["eval"]["head_cond_top1"] == ev["head_cond_top1"]

    tr = Trainer(config(tmp_path / "ref", data_file))
    params = {"base": tr.base_host, "medusa": heads}
    gen = GenerationSettings(max_new_tokens=24, eos_token_ids=tuple(tr.model_cfg.eos_token_ids))
    prompts = [list(b"count from 7"), list(b"count from 31 please")]
    want = generate(tr.model_cfg, tr.base_host, prompts, gen)["tokens"]
    settings = make_settings([[0], [1], [0, 0], [0, 1], [0, 0, 0]], mcfg.num_heads, gen)
    assert medusa_generate(tr.model_cfg, mcfg, params, prompts, settings)["tokens"] == want


def test_training_goes_on_from_saved_heads(tmp_path, data_file, monkeypatch):
    """train.init_heads starts from a saved head set (its weights and its draft vocabulary, not
    fresh heads and one chosen anew); heads the medusa section does not describe are refused."""
    args = ("train.cache_hidden=true", "medusa.head_type=hydra", "train.head_target=base",
            "medusa.draft_vocab_size=48", "train.token_batch=64", "log.every_steps=5")
    first = train_cached(config(tmp_path / "a", data_file, *args, "train.steps=20",
                                "train.heads_lr=0.05"))
    saved = first["exports"]["heads"]
    smcfg, sheads = load_heads(saved)
    # lr 0: the run must export exactly the heads it started from
    again = train_cached(config(tmp_path / "b", data_file, *args, "train.steps=5",
                                "train.heads_lr=0.0", f"train.init_heads={saved}"))
    mcfg, heads = load_heads(again["exports"]["heads"])
    assert mcfg.draft_ids == smcfg.draft_ids
    meta = json.loads(open(os.path.join(again["exports"]["heads"], "medusa_config.json")).read())
    assert meta["metadata"]["init_heads"] == saved  # the card says where training started
    assert set(heads) == set(sheads)
    for k in heads:
        np.testing.assert_array_equal(heads[k], sheads[k])
    np.testing.assert_allclose(again["eval"]["head_top1"], first["eval"]["head_top1"], atol=1e-6)
    # and trained on, it starts where the saved heads left off, below a fresh start's loss
    fresh = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    go_on = train_cached(config(tmp_path / "c", data_file, *args, "train.steps=5",
                                "train.heads_lr=0.01", f"train.init_heads={saved}"))
    assert go_on["step"] == 5
    cont = [json.loads(x) for x in open(tmp_path / "c" / "metrics.jsonl")]
    assert cont[0]["loss"] < fresh[0]["loss"]
    # refused before any data is read (on a real data set that is minutes)
    import medusa_jax.training.prepare as prepare  # noqa: PLC0415

    def no_data(_cfg):
        raise AssertionError("the data was read before the saved heads were checked")

    monkeypatch.setattr(prepare, "prepare_data", no_data)
    with pytest.raises(ConfigError, match=r"num_heads 2 \(heads: 3\)"):
        train_cached(config(tmp_path / "d", data_file, *args, "medusa.num_heads=2",
                            f"train.init_heads={saved}"))
    with pytest.raises(ConfigError, match="init_heads needs cache_hidden=True"):
        config(tmp_path / "e", data_file, f"train.init_heads={saved}")


def test_head_target_base_needs_cached_states():
    from medusa_jax.training.run_config import TrainConfig

    with pytest.raises(ConfigError, match="head_target='base' needs cache_hidden=True"):
        TrainConfig(head_target="base")
    with pytest.raises(ConfigError, match="head_target='logits' must be one of"):
        TrainConfig(head_target="logits", cache_hidden=True)


def test_cached_run_reads_the_distillers_hidden_states(tmp_path, data_file, monkeypatch):
    """train.cache_hidden on a file distilled with --keep-hidden trains on the sidecar's states
    (the base never runs over the data), held out by the same id hash as prepare_data, and a
    sidecar from a model of another width is refused by name."""
    from medusa_jax.errors import DataError
    from medusa_jax.training import cached
    from medusa_jax.training.distill import Distiller
    from medusa_jax.training.distill_refill import hidden_path, read_hidden
    from medusa_jax.training.prepare import held_out_mask, load_run_tokenizer
    from medusa_jax.training.setup import build_base

    out = str(tmp_path / "distilled.jsonl")
    args = ("train.cache_hidden=true", "train.steps=3", "train.token_batch=32",
            "data.eval_fraction=0.25")
    cfg = config(tmp_path / "run", out, *args)
    model_cfg, base = build_base(cfg)
    Distiller(model_cfg, base, load_run_tokenizer(cfg)).run(
        data_file, out, max_conversations=24, max_new_tokens=8, batch_size=4,
        max_prompt_tokens=48, engine="refill", keep_hidden=True, progress=False)

    def refuse(*a, **k):
        raise AssertionError("the base model ran over the data")

    monkeypatch.setattr(cached, "collect_hidden", refuse)
    monkeypatch.setattr("medusa_jax.training.prepare.prepare_data", refuse)
    s = cached.train_cached(cfg)
    assert s["hidden_states"] == hidden_path(out)
    recs, answers, hiddens = read_hidden(out, model_cfg.hidden_size)
    held = held_out_mask([f"id:{r['id']}" for r in recs], 0.25)
    owner = [i for i, r in enumerate(recs) for _ in r["answer_tokens"]]
    n_eval = sum(len(a) for a, o in zip(answers, owner, strict=True) if held[o])
    assert 0 < n_eval < sum(map(len, answers))
    assert s["eval_positions"] == n_eval
    assert s["train_positions"] == sum(map(len, answers)) - n_eval
    assert s["data"]["eval_conversations"] == int(held.sum())
    assert s["eval"]["head_count"][0] > 0

    wide = config(tmp_path / "wide", out, *args, "model.tiny_hidden_size=48")
    with pytest.raises(DataError, match="hidden size"):
        cached.train_cached(wide)
    strict = config(tmp_path / "strict", data_file, *args, "data.hidden_states=sidecar")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cached.train_cached(strict)
