"""Our GGUF header reader (medusa_jax/weights/gguf_header.py) reads what gguf-py's GGUFReader
reads, value for value and tensor for tensor, and hands the files it does not read (big-endian)
back to gguf-py."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from medusa_jax.weights.gguf import GGUFCheckpoint, _field_value  # noqa: E402
from medusa_jax.weights.gguf_header import Unsupported, read_header  # noqa: E402


def _gguf_py(path):
    r = gguf.GGUFReader(path)
    return {k: _field_value(f) for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def _assert_same(path):
    h = read_header(str(path))
    meta, tensors = _gguf_py(str(path))
    assert h.metadata.keys() == meta.keys()
    for k, v in meta.items():
        assert h.metadata[k] == v and type(h.metadata[k]) is type(v), k
        if isinstance(v, list):
            assert [type(x) for x in h.metadata[k]] == [type(x) for x in v], k
    assert [t.name for t in h.tensors] == list(tensors)
    for t in h.tensors:
        ref = tensors[t.name]
        assert t.tensor_type == ref.tensor_type and t.n_bytes == ref.n_bytes, t.name
        assert np.array_equal(t.shape, ref.shape), t.name
        assert t.data.dtype == ref.data.dtype and t.data.shape == ref.data.shape, t.name
        assert np.array_equal(t.data, ref.data), t.name


def _write(path, endian=None):
    kw = {} if endian is None else {"endianess": endian}
    w = gguf.GGUFWriter(str(path), "llama", **kw)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -3)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1e-5)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo <|im_end|>")
    w.add_array("t.strs", ["a", "", "ü", "Ġthe"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.bools", [True, False])
    w.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 2)).astype(np.float16))
    w.add_tensor("i32", np.arange(7, dtype=np.int32))
    q = rng.standard_normal((2, 64)).astype(np.float32)
    for name, qt in (("q8", gguf.GGMLQuantizationType.Q8_0),
                     ("bf16", gguf.GGMLQuantizationType.BF16)):
        w.add_tensor(name, gguf.quants.quantize(q, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_value_and_tensor_type_reads_as_gguf_py_reads_it(tmp_path):
    _assert_same(_write(tmp_path / "all.gguf"))


def test_the_default_model_reads_as_gguf_py_reads_it(real_gguf_path):
    _assert_same(real_gguf_path)


def test_a_big_endian_file_goes_to_gguf_py(tmp_path):
    path = _write(tmp_path / "be.gguf", gguf.GGUFEndian.BIG)
    with pytest.raises(Unsupported, match="GGUF version"):
        read_header(str(path))
    ck = GGUFCheckpoint(path)  # the fallback reads it
    assert ck.metadata["t.str"] == "héllo <|im_end|>" and ck.metadata["t.ints"] == [1, -2, 3]
    assert np.array_equal(ck.tensors["i32"].data, np.arange(7))
