"""Bad input and faults on the decoding side: each gets one clear error (exit 2 in decode.py),
made before the model's weights load where it can be, and nothing generated is lost."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import decode  # noqa: E402  (the CLI module, called in-process where no model is needed)


def _main(monkeypatch, capsys, *argv, stdin: bytes | None = None):
    """decode.main in this process, failing the test if the weights would be loaded."""
    import medusa_jax.api as api

    def no_load(*a, **k):
        raise AssertionError("the model's weights were loaded before the check")

    monkeypatch.setattr(api.MedusaLM, "load", no_load)
    if stdin is not None:
        import io

        class _In(io.BytesIO):
            def isatty(self):
                return False

        raw = _In(stdin)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw))
    rc = decode.main(list(argv))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "-2", "--batch-size: must be >= 1"),
    ("--batch-size", "0", "--batch-size: must be >= 1"),
    ("--repeats", "0", "--repeats: must be >= 1"),
    ("--max-new-tokens", "0", "--max-new-tokens: must be >= 1"),
    ("--temperature", "inf", "--temperature: 'inf' is not a finite number"),
    ("--temperature", "nan", "--temperature: 'nan' is not a finite number"),
    ("--top-p", "nan", "--top-p: 'nan' is not a finite number"),
    ("--posterior-alpha", "-inf", "is not a finite number"),
])
def test_bad_numbers_are_refused_by_the_parser(flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        decode.parse_args(["--prompt", "hi", f"{flag}={value}"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_tree_without_nodes_is_an_error(tmp_path, monkeypatch, capsys):
    tree = tmp_path / "empty.json"
    tree.write_text("[]")
    rc, err = _main(monkeypatch, capsys, "--prompt", "hi", "--tree", str(tree))
    assert rc == 2 and "the tree has no nodes" in err


def test_a_tree_without_heads_is_an_error(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc, err = _main(monkeypatch, capsys, "--prompt", "hi", "--medusa", "none", "--tree", str(bad))
    assert rc == 2 and "--tree needs Medusa heads" in err


def test_a_malformed_tree_file_is_an_error(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc, err = _main(monkeypatch, capsys, "--prompt", "hi", "--tree", str(bad))
    assert rc == 2 and "not valid JSON" in err


def test_prompts_file_that_is_a_directory(tmp_path, monkeypatch, capsys):
    rc, err = _main(monkeypatch, capsys, "--prompts-file", str(tmp_path))
    assert rc == 2 and f"--prompts-file {tmp_path} is a directory" in err


def test_prompts_file_that_is_not_utf8(tmp_path, monkeypatch, capsys):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes('"caf\xe9"\n'.encode("latin-1"))
    rc, err = _main(monkeypatch, capsys, "--prompts-file", str(f))
    assert rc == 2 and str(f) in err and "not UTF-8" in err


def test_binary_standard_input(monkeypatch, capsys):
    rc, err = _main(monkeypatch, capsys, stdin=b"\x7fELF\x02\x01\x01\x00\x00\x00\xff\xfe")
    assert rc == 2 and "standard input" in err


def test_greedy_acceptance_with_a_temperature_is_refused(monkeypatch, capsys):
    rc, err = _main(monkeypatch, capsys, "--prompt", "hi", "--temperature", "0.7",
                    "--acceptance", "greedy")
    assert rc == 2 and "would ignore temperature=0.7" in err


def test_context_is_checked_before_the_weights_load(monkeypatch, capsys):
    rc, err = _main(monkeypatch, capsys, "--prompt", "hi", "--max-new-tokens", "100000")
    assert rc == 2 and "exceeds the model's context" in err


def test_sampling_with_heads_uses_lossless_acceptance(monkeypatch, capsys):
    args = decode.parse_args(["--prompt", "hi", "--temperature", "0.7"])
    prompts, ids, (model, heads, tok), acceptance = decode.check_inputs(args)
    assert heads is not None and acceptance == "lossless"
    args = decode.parse_args(["--prompt", "hi"])
    assert decode.check_inputs(args)[3] == "greedy"
    args = decode.parse_args(["--prompt", "hi", "--acceptance", "lossless"])  # allowed at T = 0
    assert decode.check_inputs(args)[3] == "lossless"


@pytest.mark.parametrize("flags, words", [
    (["--acceptance", "typical", "--temperature", "0.7", "--posterior-threshold", "1.5"],
     "threshold"),
    (["--acceptance", "typical", "--temperature", "0.7", "--posterior-threshold", "0"],
     "threshold"),
    (["--acceptance", "typical", "--temperature", "0.7", "--posterior-alpha", "-1"], "alpha"),
])
def test_typical_parameters_out_of_range(monkeypatch, capsys, flags, words):
    rc, err = _main(monkeypatch, capsys, "--prompt", "hi", *flags)
    assert rc == 2 and words in err and err.count("error:") == 1


def test_unknown_acceptance_rule(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        decode.parse_args(["--prompt", "hi", "--acceptance", "nucleus"])
    assert e.value.code == 2 and "nucleus" in capsys.readouterr().err
    from medusa_jax.decoding.acceptance import AcceptanceError, get_rule

    with pytest.raises(AcceptanceError, match="unknown acceptance rule 'nucleus'"):
        get_rule("nucleus")


def test_the_default_model_named_explicitly_keeps_its_shipped_heads(real_gguf_path):
    from medusa_jax.api import default_heads_path, is_default_model

    assert is_default_model(None) and is_default_model(real_gguf_path)
    args = decode.parse_args(["--prompt", "hi", "--model", real_gguf_path])
    assert decode.check_inputs(args)[2][1] == default_heads_path() is not None


# ------------------------------------------------------------------------- the notebook API
@pytest.fixture(scope="module")
def tiny_lm():
    import jax

    from medusa_jax.api import MedusaLM
    from medusa_jax.config import MedusaConfig, tiny_config
    from medusa_jax.model import init_params
    from medusa_jax.model.heads import init_medusa_params

    cfg = tiny_config(scan_layers=False, max_position_embeddings=4096)
    lm = MedusaLM(cfg, init_params(cfg, jax.random.PRNGKey(0)), eos_token_ids=())
    mcfg = MedusaConfig.for_model(cfg, num_heads=2, draft_ids=tuple(range(16)))
    lm.set_heads(mcfg, init_medusa_params(mcfg))
    return lm


@pytest.mark.parametrize("prompts, message", [
    ([b"Hi"], "prompt 0 is bytes"),
    (b"Hi", "got bytes"),
    ([[999999, 5, 6]], "token id 999999 is outside the vocabulary [0, 128)"),
    ([[3, -1]], "token id -1 is outside"),
    ([[3, 4], 123], "prompt 1 is int"),
    ([[3, 4.5]], "token ids must be integers"),
    (42, "got int"),
])
def test_api_names_the_bad_prompt(tiny_lm, prompts, message):
    from medusa_jax.decoding.common import GenerationError

    with pytest.raises(GenerationError) as e:
        tiny_lm.generate(prompts, max_new_tokens=2, medusa=False)
    assert message in str(e.value)


def test_api_takes_one_string_as_one_prompt(real_hf_tokenizer):
    from medusa_jax.api import MedusaLM
    from medusa_jax.config import tiny_config

    lm = MedusaLM.__new__(MedusaLM)
    lm.tokenizer, lm.cfg = real_hf_tokenizer, tiny_config(vocab_size=49152)
    assert lm.encode("Hi") == lm.encode(["Hi"]) and len(lm.encode("Hi")) == 1


def test_api_refuses_greedy_acceptance_with_a_temperature(tiny_lm):
    from medusa_jax.decoding.common import GenerationError

    with pytest.raises(GenerationError, match="would ignore temperature"):
        tiny_lm.generate([[3, 4]], max_new_tokens=2, temperature=0.8, acceptance="greedy")
    out = tiny_lm.generate([[3, 4]], max_new_tokens=2, temperature=0.8)  # lossless, chosen
    assert out[0].num_new_tokens >= 1


def test_tree_rank_beyond_the_draft_vocabulary(tiny_lm):
    from medusa_jax.tree import TreeError

    with pytest.raises(TreeError, match="rank 20, but the heads rank only 16 tokens"):
        tiny_lm.generate([[3, 4]], max_new_tokens=2, tree=[[0], [20]])


def test_prefill_and_decode_are_timed_apart(tiny_lm):
    out = tiny_lm.generate([[3, 4, 5]], max_new_tokens=8, medusa=False)[0]
    assert 0 < out.prefill_seconds < out.seconds
    assert out.tokens_per_second == pytest.approx(
        out.num_new_tokens / (out.seconds - out.prefill_seconds))


@pytest.mark.parametrize("medusa", [False, True])
def test_ctrl_c_stops_an_unstreamed_run_and_keeps_its_tokens(tiny_lm, medusa, monkeypatch):
    """Without streaming the loop still returns to the host in chunks, so a SIGINT ends it
    within a chunk and what was generated comes back, marked interrupted. The SIGINT is sent
    as the loop starts (once its handler is in place), not after a fixed delay: on a fast
    machine the tiny model finished all 3000 tokens within 0.3 s and the test raced it."""
    from medusa_jax.decoding import common

    enter = common._InterruptLatch.__enter__

    def enter_then_ctrl_c(latch):
        latch = enter(latch)
        os.kill(os.getpid(), signal.SIGINT)
        return latch

    kw = dict(max_new_tokens=3000, medusa=medusa)
    monkeypatch.setattr(common._InterruptLatch, "__enter__", enter_then_ctrl_c)
    out = tiny_lm.generate([[3, 4, 5]], **kw)[0]
    assert out.interrupted
    assert 0 < out.num_new_tokens < 3000 and len(out.token_ids) == out.num_new_tokens


def test_ctrl_c_while_streaming(tiny_lm):
    seen = []

    def stream(row, text):
        seen.append(text)

    def kill(*a):
        os.kill(os.getpid(), signal.SIGINT)

    tiny_lm.tokenizer = type("T", (), {"decode": lambda self, t, **k: "x" * len(t)})()
    try:
        out = tiny_lm.generate([[3, 4]], max_new_tokens=400, medusa=False, stream=stream,
                               stream_every=4)
        assert not out[0].interrupted  # no signal: runs to the end
        out = tiny_lm.generate([[3, 4]], max_new_tokens=400, medusa=False,
                               stream=lambda r, s: (seen.append(s), kill()), stream_every=4)
    finally:
        tiny_lm.tokenizer = None
    assert out[0].interrupted and 0 < out[0].num_new_tokens < 400


# ------------------------------------------------------------------------- corrupt weights
def test_nan_in_a_safetensors_weight_names_the_tensor(tmp_path):
    import jax

    from medusa_jax.config import tiny_config
    from medusa_jax.model import init_params
    from medusa_jax.weights import CheckpointError, load_base_model, save_hf_checkpoint
    from medusa_jax.weights.files import SafetensorsFile, write_safetensors

    cfg = tiny_config()
    save_hf_checkpoint(cfg, jax.device_get(init_params(cfg, jax.random.PRNGKey(0))), tmp_path)
    path = tmp_path / "model.safetensors"
    f = SafetensorsFile(str(path))
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    f.close()
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.inf
    write_safetensors(str(path), tensors)
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight'.*1 NaN/inf"):
        load_base_model(str(tmp_path))


@pytest.mark.slow
def test_flipped_bytes_in_a_gguf_weight_name_the_tensor(real_gguf_path, tmp_path):
    import shutil

    import gguf

    from medusa_jax.weights import CheckpointError, load_base_model

    bad = tmp_path / "corrupt.gguf"
    shutil.copyfile(real_gguf_path, bad)
    t = next(t for t in gguf.GGUFReader(real_gguf_path).tensors if t.name == "blk.7.ffn_up.weight")
    with open(bad, "r+b") as f:  # 4 KiB of 0xff: the blocks' f16 scales become NaN
        f.seek(int(t.data_offset) + 8192)
        f.write(b"\xff" * 4096)
    with pytest.raises(CheckpointError, match=r"'blk.7.ffn_up.weight'.*NaN/inf"):
        load_base_model(str(bad))


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly():
    """`decode.py --json | head -n 1`: the reader leaves after one line; no traceback."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    cmd = (f"{sys.executable} {os.path.join(REPO, 'decode.py')} --medusa none --json "
           "--max-new-tokens 2 --prompt one --prompt two --prompt three | head -n 1")
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr


@pytest.mark.parametrize("tree, message", [
    ("heads:tpu", "store no 'tpu' tree (they store: cpu, gpu)"),
    ("no-such-tree", "unknown tree 'no-such-tree'"),
])
def test_bench_mtbench_refuses_a_tree_it_cannot_have(tree, message, monkeypatch, capsys):
    """The MT-bench benchmark: a --tree that cannot be had is one error, exit 2, before the base
    model loads (it had exited 1 for heads:<backend>, after loading the model)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import bench_mtbench

    import medusa_jax.weights as weights

    def no_load(*a, **k):
        raise AssertionError("the base model was loaded before the check")

    monkeypatch.setattr(weights, "load_base_model", no_load)
    rc = bench_mtbench.main(["--tree", tree, "--questions", "1", "--out", os.devnull])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("error:") == 1


def test_bench_sampling_refuses_a_tree_it_cannot_have(monkeypatch, capsys):
    """The sampling benchmark checks its --tree as the MT-bench one does: one error, exit 2,
    before the base model loads."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import bench_sampling

    import medusa_jax.weights as weights

    def no_load(*a, **k):
        raise AssertionError("the base model was loaded before the check")

    monkeypatch.setattr(weights, "load_base_model", no_load)
    rc = bench_sampling.main(["--tree", "heads:tpu", "--questions", "1", "--out", os.devnull])
    err = capsys.readouterr().err
    assert rc == 2 and "store no 'tpu' tree" in err and err.count("error:") == 1


def test_bench_sampling_runs_on_the_shipped_heads(tmp_path):
    """One MT-bench question, a few tokens: the sampling benchmark runs end to end and writes
    its files (it had broken silently when a helper it shares with bench_mtbench changed)."""
    out = tmp_path / "sampling"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_sampling.py"),
                        "--questions", "1", "--max-new-tokens", "8", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "sampling.md").is_file()
    res = json.loads((tmp_path / "sampling.json").read_text())
    from medusa_jax.defaults import default_heads_path
    from medusa_jax.weights.medusa_io import read_heads_metadata

    cpu_tree = read_heads_metadata(default_heads_path())["trees"]["cpu"]
    # the heads' own CPU tree, root included (not a count fixed when other heads were shipped)
    assert res["tree"]["name"] == "shipped with the heads"
    assert res["tree"]["nodes"] == len(cpu_tree) + 1
    for v in ("vanilla", "lossless", "typical"):
        assert res["summary"][v]["tokens"] == 8  # EOS is honoured, but not within 8 tokens here
    for v in ("lossless", "typical"):
        assert 1 <= res["summary"][v]["accepted_per_step"] <= res["tree"]["depth"] + 1
