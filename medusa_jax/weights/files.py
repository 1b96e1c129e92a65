"""What the weight readers and writers share: the safetensors format (read lazily from a
memory map, written one tensor at a time), JSON files, directory listings for error messages, and
host arrays with their dtype names.

Used by the Hugging Face checkpoint loader (:mod:`.hf`) and the Medusa head formats
(:mod:`.medusa_io`); nothing here knows a model's layout.
"""

from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np

from medusa_jax.config import DTYPES, ConfigError
from medusa_jax.weights.errors import CheckpointError

# safetensors dtype tags. numpy has no bfloat16/float8: ml_dtypes (a JAX dependency) provides them.
_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_TAGS = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


# --------------------------------------------------------------------------- dtypes and arrays
def np_dtype(name: str) -> np.dtype:
    """``"float32" | "bfloat16" | "float16"`` -> the numpy dtype (bfloat16 from ml_dtypes)."""
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not supported (supported: {', '.join(DTYPES)})")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def dtype_name(dt: np.dtype) -> str | None:
    """numpy dtype -> one of ``DTYPES`` (None for anything else, e.g. float64)."""
    dt = np.dtype(dt)
    if dt == np.dtype(ml_dtypes.bfloat16):
        return "bfloat16"
    return dt.name if dt.name in DTYPES else None


def common_dtype(dtypes) -> str:
    """The one dtype name of ``DTYPES`` that all of ``dtypes`` have, else ``"float32"``."""
    names = {dtype_name(d) for d in dtypes}
    return names.pop() if len(names) == 1 and None not in names else "float32"


def to_numpy(x) -> np.ndarray:
    """A numpy view/copy of a numpy, JAX or torch array (torch bfloat16 included)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch, without importing it
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            # numpy has no bfloat16: go through float32, which is exact for bfloat16 values.
            return t.float().numpy().astype(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(x)


def cast_arrays(arrays: dict, dtype: str | None) -> tuple[dict, str]:
    """Owned copies of ``arrays`` in ``dtype`` (None: their stored dtype when it is one of ours,
    else float32), and that dtype's name."""
    if dtype is None:
        dtype = common_dtype(a.dtype for a in arrays.values())
    dt = np_dtype(dtype)
    # np.array copies: the results must not keep the file's memory map (or a torch tensor) alive.
    return {k: np.array(v, dtype=dt) for k, v in arrays.items()}, dtype


def check_finite(w, what: str) -> None:
    """CheckpointError naming ``what`` when ``w`` holds NaN or inf (a corrupt file: flipped
    bytes decode to garbage that would otherwise be generated from, silently)."""
    w = np.asarray(w)
    if w.dtype.kind in "biu":  # integer tensors (e.g. quantisation indices) cannot be NaN
        return
    with np.errstate(all="ignore"):
        bad = int(w.size - np.count_nonzero(np.isfinite(w)))
    if bad:
        raise CheckpointError(f"{what} holds {bad} NaN/inf values: the checkpoint is corrupt "
                              "(re-download or re-export it)")


# --------------------------------------------------------------------------- directories and JSON
def listing(path: str) -> str:
    """The entries of directory ``path`` (the first 20), for an error message that says what a
    directory holds instead of what it should."""
    names = sorted(os.listdir(path))
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} entries)" if len(names) > 20 else "")
    return shown or "nothing (empty directory)"


def read_json(path: str) -> dict:
    """The JSON object in ``path``; CheckpointError naming the file when it cannot be read or
    parsed, or holds something other than an object."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse {path}: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return d


def write_json(path: str, obj, default=None) -> None:
    """Write ``obj`` as indented JSON (``default`` as in ``json.dumps``) through a temporary file
    renamed into place, so a failure never leaves half a file under the final name."""
    text = json.dumps(obj, indent=2, default=default)
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
    os.replace(path + ".tmp", path)


# --------------------------------------------------------------------------- safetensors file
class SafetensorsFile:
    """One ``.safetensors`` file, opened lazily.

    The header is parsed and validated up front, so a truncated or corrupt file fails here with
    a message naming it; tensors are zero-copy, read-only views of a memory map. We parse the
    (simple, documented) format ourselves because ``safetensors.safe_open(framework="numpy")``
    cannot return bfloat16 tensors ("data type 'bfloat16' not understood"), and most
    checkpoints are bfloat16.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                raw = f.read(n) if 0 <= n <= min(size - 8, _MAX_HEADER_BYTES) else b""
        except OSError as e:
            raise CheckpointError(f"cannot read safetensors file {self.path}: {e}") from e
        if n < 0:
            raise self._bad(f"the file has only {size} bytes")
        if n > size - 8 or n > _MAX_HEADER_BYTES:
            raise self._bad(f"header length {n} does not fit in the file's {size} bytes")
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._bad(f"the header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise self._bad("the header is not a JSON object")
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for key, e in header.items():
            try:
                dtype = _ST_DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise self._bad(f"bad header entry for {key!r}: {e!r}") from err
            if end > data_size:
                raise self._bad(
                    f"tensor {key!r} ends at byte {self._data_start + end} but the file has "
                    f"only {size} bytes"
                )
            if begin < 0 or end - begin != dtype.itemsize * math.prod(shape):
                raise self._bad(
                    f"tensor {key!r}: byte range [{begin}, {end}) does not hold shape {shape} "
                    f"of {e['dtype']}"
                )
            self._entries[key] = (dtype, shape, begin)
        self._mmap: np.memmap | None = None

    def _bad(self, why: str) -> CheckpointError:
        return CheckpointError(f"truncated or corrupt safetensors file {self.path}: {why}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key][0]

    def get(self, key: str) -> np.ndarray:
        """A read-only, zero-copy view of tensor ``key`` in its stored dtype and shape."""
        dtype, shape, begin = self._entries[key]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return np.ndarray(shape, dtype, buffer=self._mmap, offset=self._data_start + begin)

    def close(self) -> None:
        """Drop this object's memory map (views already handed out keep it alive)."""
        self._mmap = None


def write_safetensors(path: str | os.PathLike, tensors, metadata: dict | None = None) -> None:
    """Write tensors to a safetensors file, holding one tensor in memory at a time.

    ``tensors`` is a dict ``key -> array`` or a list of ``(key, shape, dtype, make)`` where
    ``make()`` returns the array only when its bytes are written. Any dtype of the format
    (bfloat16 included) is written as is. The data goes to ``path + ".tmp"`` first and is renamed
    into place, so a crash never leaves a half-written file under the final name.
    """
    if isinstance(tensors, dict):
        tensors = [(k, tuple(a.shape), a.dtype, (lambda a=a: a)) for k, a in tensors.items()]
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for key, shape, dtype, _ in tensors:
        dt = np.dtype(dtype)
        if dt not in _ST_TAGS:
            raise ValueError(f"cannot write tensor {key!r} of dtype {dt} to safetensors")
        nbytes = dt.itemsize * math.prod(shape)
        header[key] = {"dtype": _ST_TAGS[dt], "shape": [int(s) for s in shape],
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format recommends 8-byte aligned tensor data
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, shape, dtype, make in tensors:
            arr = np.ascontiguousarray(np.asarray(make()), dtype=np.dtype(dtype))
            if arr.shape != tuple(shape):
                raise ValueError(f"tensor {key!r} has shape {arr.shape}, declared {tuple(shape)}")
            f.write(arr.reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)
