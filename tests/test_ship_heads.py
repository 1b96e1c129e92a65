"""scripts/ship_heads.py: the card it writes and the weights it ships, on tiny fake runs."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from medusa_jax.config import MedusaConfig
from medusa_jax.model.heads import init_medusa_params
from medusa_jax.weights.medusa_io import load_heads, read_heads_metadata, save_heads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ship_heads():
    spec = importlib.util.spec_from_file_location(
        "ship_heads", os.path.join(REPO, "scripts", "ship_heads.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_run(root, name, head_type, steps, top1, init_heads=None, seed=0):
    """A run directory as ``train.py medusa1`` with ``cache_hidden`` leaves it."""
    run = root / name
    mcfg = MedusaConfig(num_heads=2, hidden_size=8, vocab_size=16, draft_ids=[1, 4, 6, 9],
                        head_type=head_type)
    params = init_medusa_params(mcfg, scale=0.3, rng=jax.random.PRNGKey(seed))
    ev = {"head_top1": top1, "head_top5": [0.9, 0.8], "head_cond_top1": [top1[0], 0.5],
          "head_loss": [1.5, 2.0], "head_count": [100, 99], "draft_coverage": 0.9}
    meta = {"steps": steps, "head_type": head_type, "train_positions": 1000, "epochs": 1.5,
            "wall_time_s": 120.0, "init_heads": init_heads, "eval": ev}
    save_heads(run / "heads", mcfg, params, metadata=meta)
    summary = {"head_type": head_type, "head_target": "base", "steps": steps,
               "token_batch": 64, "epochs": 1.5 if steps > 1 else 0.0,
               "train_positions": 5000, "eval_positions": 300, "train_s": 60.0,
               "wall_time_s": 90.0, "draft_coverage_train": 0.95, "eval": ev,
               "data": {"summary": f"{REPO}{os.sep}data/x.jsonl: 3 records",
                        "eval_conversations": 1},
               "exports": {"heads": str(run / "heads")}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run, params


def test_card_columns_float16_and_commands(tmp_path):
    ship = _ship_heads()
    hydra, params = _fake_run(tmp_path, "hydra", "hydra", 3000, [0.6, 0.5])
    medusa, _ = _fake_run(tmp_path, "medusa", "medusa", 3000, [0.4, 0.3], seed=1)
    # the previous heads, trained 1500 steps elsewhere, then only scored (1 step, lr 0)
    prev, _ = _fake_run(tmp_path, "prev_train", "hydra", 1500, [0.55, 0.45], seed=2)
    scored, _ = _fake_run(tmp_path, "prev_scored", "hydra", 1, [0.52, 0.42], seed=2,
                          init_heads=str(prev / "heads"))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "truncated": True, "answer_tokens": [[1, 2, 3]],
                                "conversations": [{"from": "human", "value": "hi"},
                                                  {"from": "gpt", "value": "yo"}]}) + "\n")
    dest = tmp_path / "dest"
    rc = ship.main(["--run", str(hydra), "--other", str(medusa), "--extra",
                    f"previous={scored}", "--data", str(data), "--float16", "--dest", str(dest),
                    "--train-command", "python train.py medusa1 --config h.yaml train.steps=3000",
                    "--prompt-limit", "256 or 512", "--distill-note", "made in 3 sessions"])
    assert rc == 0
    card = (dest / "TRAINING.md").read_text()
    header = next(line for line in card.splitlines() if line.startswith("| | hydra"))
    assert header == "| | hydra (shipped) | medusa | previous |"
    steps_row = next(line for line in card.splitlines() if line.startswith("| steps x positions"))
    # the scoring-only column shows the saved heads' own training, not the 1-step scoring run
    assert steps_row == "| steps x positions (epochs) | 3000 x 64 (1.5) | 3000 x 64 (1.5) | 1500 x 64 (1.5) |"
    assert "| train / held-out positions | 5,000 / 300 | 5,000 / 300 | 1,000 / 300 |" in card
    assert "0.520 / 0.420" in card and "Columns of saved heads" in card
    assert "python train.py medusa1 --config h.yaml train.steps=3000" in card
    assert "prompts of at most 256 or 512 tokens" in card and "made in 3 sessions" in card
    assert REPO + os.sep not in card  # paths on the card are the repository's, not this machine's
    assert "stored in\nfloat16" in card
    mcfg, shipped = load_heads(dest)
    assert mcfg.param_dtype == "float16" and mcfg.head_type == "hydra"
    assert mcfg.draft_ids == (1, 4, 6, 9)
    assert read_heads_metadata(dest)["steps"] == 3000
    for k, v in shipped.items():
        assert v.dtype == np.float16
        np.testing.assert_allclose(v.astype(np.float32), np.asarray(params[k], np.float32),
                                   rtol=2e-3, atol=1e-4)


def test_malformed_extra_is_refused(tmp_path, capsys):
    ship = _ship_heads()
    hydra, _ = _fake_run(tmp_path, "hydra", "hydra", 10, [0.6, 0.5])
    with pytest.raises(SystemExit) as e:
        ship.main(["--run", str(hydra), "--extra", "no-equals-sign", "--data", "x",
                   "--dest", str(tmp_path / "d")])
    assert e.value.code == 2
    assert "expected LABEL=RUN" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
