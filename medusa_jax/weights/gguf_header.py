"""A fast reader of a GGUF file's header: its key/value metadata and its tensor table.

gguf-py's ``GGUFReader`` builds a numpy view per value, and the default model's header holds two
arrays of ~49k strings (the vocabulary and the merges): about 2.5 s per parse on this CPU, paid
by every ``decode.py`` start. This reader walks the same header with ``struct`` over one
memory map (~0.1 s) and hands out each tensor as a read-only view of the mapped file, typed
as gguf-py types it (float32/float16/ints; raw bytes for quantized and bf16 tensors), so
``gguf.quants.dequantize`` still does the dequantizing.

Only little-endian files of GGUF version 2 or 3 are read here; for anything else
(:class:`Unsupported`) the caller falls back to gguf-py, which also reports damaged files.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct

import numpy as np

from medusa_jax.weights.errors import CheckpointError

# GGUF value types (gguf-py's GGUFValueType)
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, \
    _INT64, _FLOAT64 = range(13)
_SCALAR = {_UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i",
           _FLOAT32: "<f", _BOOL: "<?", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d"}
_NUMPY = {_UINT8: "<u1", _INT8: "<i1", _UINT16: "<u2", _INT16: "<i2", _UINT32: "<u4",
          _INT32: "<i4", _FLOAT32: "<f4", _BOOL: "?", _UINT64: "<u8", _INT64: "<i8",
          _FLOAT64: "<f8"}
# ggml tensor types gguf-py hands out as typed arrays (the rest as raw bytes per row)
_TYPED = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64,
          28: np.float64}


class Unsupported(CheckpointError):
    """Not a header this reader handles (big-endian, another version, or damaged). Caught by
    :mod:`.gguf`, which then asks gguf-py; a CheckpointError like every package error."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of the table, with the attributes of gguf-py's ``ReaderTensor`` we use."""

    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: np.ndarray  # GGUF's ne[] (innermost first)
    n_bytes: int
    data: np.ndarray  # a read-only view of the mapped file


@dataclasses.dataclass
class Header:
    version: int
    metadata: dict
    tensors: list[TensorInfo]


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as e:
            raise Unsupported(f"header ends at byte {self.pos}") from e
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise Unsupported(f"a string of {n} bytes runs past the end at byte {self.pos}")
        s = self.buf[self.pos:end].decode("utf-8", errors="replace")  # an mmap slice is bytes
        self.pos = end
        return s

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.take("<I"), self.take("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(n)]
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                end = self.pos + n * dt.itemsize
                if end > len(self.buf):
                    raise Unsupported(f"an array of {n} values runs past the end")
                out = np.frombuffer(self.buf, dt, n, self.pos).tolist()
                self.pos = end
                return out
            return [self.value(etype) for _ in range(n)]  # arrays of arrays
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        raise Unsupported(f"unknown value type {vtype} at byte {self.pos}")


def read_header(path: str) -> Header:
    """The metadata (plain Python values, as gguf-py's ``ReaderField.contents()`` gives them)
    and the tensor table of the GGUF file ``path``, tensors as views of a memory map that stays
    open while any of them is referenced. Raises :class:`Unsupported` for what it does not read
    (the caller then asks gguf-py)."""
    import gguf

    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # an empty file cannot be mapped
            raise Unsupported(str(e)) from e
    cur = _Cursor(buf)
    if buf[:4] != b"GGUF":
        raise Unsupported("no GGUF magic")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):  # a byte-swapped (big-endian) file reads as a huge version
        raise Unsupported(f"GGUF version {version}")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    # gguf-py lists the header's own counts as fields too; kept, so both readers agree
    metadata: dict = {"GGUF.version": version, "GGUF.tensor_count": n_tensors,
                      "GGUF.kv_count": n_kv}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
    align = int(metadata.get("general.alignment", 32))
    start = cur.pos + (-cur.pos) % align
    size = len(buf)
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for name, dims, raw_type, offset in infos:
        if name in seen:
            raise Unsupported(f"duplicated tensor {name!r}")
        seen.add(name)
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
        except ValueError as e:
            raise Unsupported(f"tensor {name!r} has unknown type {raw_type}") from e
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_elems = int(np.prod(dims)) if dims else 1
        n_bytes = n_elems * type_size // block
        np_dims = tuple(reversed(dims))
        at = start + offset
        if raw_type in _TYPED:
            dt = np.dtype(_TYPED[raw_type])
            count, shape = n_elems, np_dims
        else:
            dt = np.dtype(np.uint8)
            count = n_bytes
            shape = (*np_dims[:-1], np_dims[-1] // block * type_size)
        # a table entry past the file's end keeps what is there (the caller checks n_bytes)
        avail = max(0, min(count, (size - at) // dt.itemsize)) if at <= size else 0
        data = np.frombuffer(buf, dt, avail, min(at, size))
        if avail == count:
            data = data.reshape(shape)
        tensors.append(TensorInfo(name, qtype, np.asarray(dims, np.uint64), n_bytes, data))
    return Header(version, metadata, tensors)
