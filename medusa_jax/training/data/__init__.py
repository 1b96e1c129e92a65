"""Conversation data for Medusa training, one module per stage of the pipeline::

    convs, report = load_conversations(path, max_records=...)     # list[list[{"role", "content"}]]
    examples = tokenize_conversations(tokenizer, convs, max_len)   # [(input_ids, loss_mask)]
    arrays = pack_or_pad(examples, seq_len, mode="pad" | "pack")  # dict of [N, seq_len] int32
    for batch in BatchIterator(arrays, batch_size, seed, jax.process_index(), jax.process_count()):
        ...

- :mod:`.sources`: record files (JSON list, JSONL, parquet) -> raw records, the
  :class:`DataReport` that counts what was skipped, the packaged ShareGPT file, JSONL writing;
- :mod:`.conversations`: raw records -> validated ``[{"role", "content"}]`` conversations;
- :mod:`.tokenisation`: conversations -> ``(input_ids, loss_mask)`` via the chat template;
- :mod:`.batching`: examples -> padded or packed ``[N, seq_len]`` rows and their batches.

Each module imports only those before it. The names below are re-exported here so that
``from medusa_jax.training.data import X`` keeps working.
"""

from medusa_jax.training.data.batching import (
    BatchIterator,
    choose_seq_len,
    pack_or_pad,
    prepare_arrays,
)
from medusa_jax.training.data.conversations import (
    ROLE_ALIASES,
    load_conversations,
    load_sharegpt,
    normalize_conversation,
)
from medusa_jax.training.data.sources import (
    SHAREGPT_FILE,
    SHAREGPT_PACKAGE,
    DataReport,
    append_jsonl,
    iter_raw_records,
    sharegpt_path,
    write_jsonl,
)
from medusa_jax.training.data.tokenisation import tokenize_conversation, tokenize_conversations

__all__ = [
    "ROLE_ALIASES",
    "SHAREGPT_FILE",
    "SHAREGPT_PACKAGE",
    "BatchIterator",
    "DataReport",
    "append_jsonl",
    "choose_seq_len",
    "iter_raw_records",
    "load_conversations",
    "load_sharegpt",
    "normalize_conversation",
    "pack_or_pad",
    "prepare_arrays",
    "sharegpt_path",
    "tokenize_conversation",
    "tokenize_conversations",
    "write_jsonl",
]
