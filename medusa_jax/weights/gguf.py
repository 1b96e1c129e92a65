"""GGUF (llama.cpp) checkpoints -> our parameter tree (numpy).

A GGUF file holds the model's metadata (architecture, sizes, tokenizer, chat template) and its
tensors, possibly quantized. ``load_gguf`` dequantizes each tensor to float32 with
``gguf.quants.dequantize``, brings it into the Hugging Face layout (GGUF lists dimensions
innermost-first, but the reader already hands out numpy arrays in ``[rows, cols]`` =
``[out, in]`` order; llama.cpp stores the Q/K rows of Llama models permuted for interleaved
rotary, which we undo) and then reuses the HF layout mapping (:mod:`.layout`) into our tree.
"""

from __future__ import annotations

import functools
import os
import re
import warnings

import numpy as np

from medusa_jax.config import ModelConfig
from medusa_jax.model.llama import convert_layout
from medusa_jax.weights.errors import CheckpointError
from medusa_jax.weights.files import np_dtype
from medusa_jax.weights.layout import assemble_params, config_kwargs

# Architectures whose Q/K rows llama.cpp's converter permutes (its LlamaModel.permute);
# qwen2 and others keep HF's rotate-half row order.
_PERMUTED_ARCHS = ("llama", "mistral")
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")


def gguf_tensor_name(hf_name: str) -> str:
    """HF-relative name (``layers.3.self_attn.q_proj.weight``) -> GGUF name
    (``blk.3.attn_q.weight``)."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise KeyError(hf_name)
    return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved -> rotate-half rotary layout).

    ``w: [n_heads * H, ...]`` (a weight ``[rows, cols]`` or a bias ``[rows]``); ``n_heads`` is the
    query head count for Q and the kv head count for K.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field_value(field):
    """A ``gguf.ReaderField`` as a plain Python value (str, int, float, bool or list)."""
    if hasattr(field, "contents"):
        return field.contents()
    import gguf  # older gguf-py without ReaderField.contents

    def one(part, vtype):
        if vtype == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        return part.tolist()[0]

    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [one(field.parts[i], field.types[-1]) for i in field.data]
    return one(field.parts[field.data[0]], field.types[0])


def file_identity(path: str) -> tuple[int, int]:
    """``(mtime_ns, size)`` of ``path``: what the header cache and the tokenizer cache key on."""
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=2)
def _parse(path: str, mtime_ns: int, size: int) -> tuple[dict, list]:
    """``(metadata, tensors)``, one parse per file version (the config, the tokenizer and the
    weights all read the header). Our own reader first (:mod:`.gguf_header`, ~0.1 s for the
    default model's header where gguf-py's takes ~2.5 s); gguf-py for the files it does not
    read (big-endian, other versions, damaged ones: gguf-py's error is then the one reported)."""
    from medusa_jax.weights.gguf_header import Unsupported, read_header

    try:
        header = read_header(path)
        return header.metadata, header.tensors
    except Unsupported:
        pass
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: _field_value(f) for k, f in reader.fields.items()}, list(reader.tensors)


class GGUFCheckpoint:
    """A GGUF file opened for reading: plain-Python ``metadata`` and lazily dequantized tensors.

    Opening parses the whole header (metadata + tensor table); a file that is not GGUF, or is
    truncated, raises CheckpointError naming it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if not os.path.exists(self.path):
            raise CheckpointError(f"GGUF file {self.path} does not exist")
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path} is not a file (expected a .gguf file)")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(
                f"{self.path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')"
            )
        try:
            metadata, tensors = _parse(self.path, *file_identity(self.path))
        except Exception as e:  # the reader fails in many ways on a cut file (numpy, struct)
            raise CheckpointError(
                f"truncated or corrupt GGUF file {self.path}: {type(e).__name__}: {e}"
            ) from e
        self.tensors = {t.name: t for t in tensors}
        for t in tensors:
            if t.data.nbytes != t.n_bytes:  # a memory-mapped slice cut short by the file's end
                raise CheckpointError(
                    f"truncated GGUF file {self.path}: tensor {t.name!r} has {t.data.nbytes} of "
                    f"its {t.n_bytes} bytes"
                )
        self.metadata: dict = {k: list(v) if isinstance(v, list) else v for k, v in metadata.items()}
        self.metadata["_tied_embeddings"] = "output.weight" not in self.tensors
        self._used: set[str] | None = None

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def model_config(self, **overrides) -> ModelConfig:
        """``ModelConfig.from_gguf_metadata`` (ConfigError for an unsupported architecture)."""
        return ModelConfig.from_gguf_metadata(self.metadata, **overrides)

    def read(self, name: str) -> np.ndarray:
        """GGUF tensor ``name`` dequantized to float32, in numpy ``[rows, cols]`` order, exactly
        as stored (no Q/K un-permutation)."""
        import gguf

        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"missing tensor {name!r} in GGUF file {self.path}")
        try:
            with np.errstate(all="ignore"):  # corrupt scales overflow: load_base names the tensor
                w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(
                f"tensor {name!r} in {self.path} uses quantization {t.tensor_type.name}, which "
                f"gguf-py cannot dequantize: {e}"
            ) from e
        # t.shape lists GGUF's ne[] (innermost first); the numpy shape is its reverse.
        return w.reshape(tuple(int(d) for d in reversed(t.shape)))

    def load_base(self, dtype: str = "float32", scan_layers: bool = True,
                  **overrides) -> tuple[ModelConfig, dict]:
        """``(cfg, params)`` of the model as numpy arrays of ``dtype`` in the layout
        ``scan_layers`` selects."""
        cfg = self.model_config(**config_kwargs(dtype, scan_layers, overrides))
        if "rope_freqs.weight" in self.tensors and cfg.rope_scaling.rope_type == "default":
            warnings.warn(
                f"{self.path} has a rope_freqs tensor (Llama-3.1-style rope scaling factors); it "
                "is not applied. Pass rope_scaling=RopeScaling('llama3', ...) to match.",
                stacklevel=2,
            )
        src = _GGUFSource(self, cfg)
        params = assemble_params(cfg, src, np_dtype(dtype))
        self._used = set(src.used)
        return cfg, convert_layout(params, cfg)

    @property
    def unused_keys(self) -> list[str]:
        """Tensor names ``load_base`` did not consume (all of them before it ran)."""
        used = self._used or set()
        return sorted(k for k in self.tensors if k not in used)


class _GGUFSource:
    """``TensorSource`` over a ``GGUFCheckpoint``: HF-layout float32 arrays by HF name."""

    def __init__(self, ckpt: GGUFCheckpoint, cfg: ModelConfig):
        self.ckpt, self.cfg = ckpt, cfg
        self.permuted = ckpt.architecture in _PERMUTED_ARCHS
        self.used: list[str] = []

    def has(self, name: str) -> bool:
        return gguf_tensor_name(name) in self.ckpt.tensors

    def get(self, name: str) -> np.ndarray:
        gname = gguf_tensor_name(name)
        w = self.ckpt.read(gname)
        self.used.append(gname)
        if self.permuted and (".attn_q." in gname or ".attn_k." in gname):
            n = self.cfg.num_heads if ".attn_q." in gname else self.cfg.num_kv_heads
            if w.shape[0] % (2 * n):
                raise CheckpointError(
                    f"shape mismatch for {self.describe(name)}: {w.shape[0]} rows are not "
                    f"{n} heads of an even head_dim"
                )
            w = unpermute_rows(w, n)
        return w

    def describe(self, name: str) -> str:
        return f"tensor {gguf_tensor_name(name)!r} in {self.ckpt.path}"


def read_gguf_metadata(path: str | os.PathLike) -> dict:
    """The key/value metadata of a GGUF file as plain Python values (plus ``_tied_embeddings``)."""
    return GGUFCheckpoint(path).metadata


def load_gguf(path: str | os.PathLike, dtype: str = "float32", scan_layers: bool = True,
              **overrides) -> tuple[ModelConfig, dict]:
    """Load a GGUF file as ``(ModelConfig, numpy params)`` (dequantized to ``dtype``).

    Raises CheckpointError for a missing, non-GGUF or truncated file and ConfigError for an
    unsupported architecture.
    """
    return GGUFCheckpoint(path).load_base(dtype, scan_layers, **overrides)
