"""Read a PyTorch state dict saved in the legacy (pre-1.6, non-zip) format into numpy arrays,
with the standard library and numpy only: mdfer never depends on PyTorch to read one file.

The format (torch/serialization.py, `_legacy_save`) is five pickles and raw bytes in one stream:

    pickle(MAGIC_NUMBER), pickle(PROTOCOL_VERSION), pickle(sys_info),
    pickle(state dict)      tensors inside refer to storages by persistent id
                            ("storage", <dtype class>, key, location, numel, view)
    pickle([storage keys])  the order of the raw blocks that follow
    for each key: int64 little-endian element count, then numel * itemsize raw bytes

A tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`: a strided view
into its storage, which numpy's `as_strided` gives exactly.
"""

from __future__ import annotations

import collections
import pickle
import struct
from typing import IO, Any

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
STORAGE_DTYPES = {  # torch's legacy storage classes -> numpy dtypes (little-endian, as saved)
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
    "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?",
}


class LegacyFormatError(ValueError):
    """The file is not a legacy PyTorch state dict this reader understands."""


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _TensorRef:
    """A tensor before its storage's bytes are read: which storage, and the view into it."""

    def __init__(self, storage: tuple, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _rebuild_tensor(storage, offset, size, stride, *_ignored) -> _TensorRef:
    return _TensorRef(storage, offset, size, stride)


class _Unpickler(pickle.Unpickler):
    """Resolves only the few globals a state dict holds; anything else is refused, so a pickle
    cannot run code through this reader."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise LegacyFormatError(f"unexpected object {module}.{name} in the pickle")

    def persistent_load(self, pid: Any) -> tuple:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise LegacyFormatError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        return (str(key), storage_type.dtype, int(numel))


def read_state_dict(stream: IO[bytes]) -> dict[str, np.ndarray]:
    """Every tensor of a legacy PyTorch state dict, by name, as a numpy array (a copy)."""
    try:
        magic = _Unpickler(stream).load()
    except Exception as exc:  # noqa: BLE001 - any failure here means "not this format"
        raise LegacyFormatError(f"not a legacy PyTorch file ({type(exc).__name__})") from None
    if magic != MAGIC_NUMBER:
        raise LegacyFormatError("not a legacy PyTorch file (a zip-format or other file?)")
    if _Unpickler(stream).load() != PROTOCOL_VERSION:
        raise LegacyFormatError("unsupported legacy protocol version")
    _Unpickler(stream).load()  # sys_info: endianness and type sizes; little-endian assumed below
    state = _Unpickler(stream).load()
    if not isinstance(state, dict):
        raise LegacyFormatError(f"holds a {type(state).__name__}, not a state dict")
    keys = _Unpickler(stream).load()

    storages: dict[str, np.ndarray] = {}
    dtypes = {ref.storage[0]: ref.storage[1] for ref in state.values() if isinstance(ref, _TensorRef)}
    for key in keys:
        (numel,) = struct.unpack("<q", stream.read(8))
        dtype = dtypes.get(str(key), np.dtype("u1"))
        data = stream.read(numel * dtype.itemsize)
        if len(data) != numel * dtype.itemsize:
            raise LegacyFormatError(f"storage {key} is cut short")
        storages[str(key)] = np.frombuffer(data, dtype=dtype)

    arrays = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            continue
        flat = storages[ref.storage[0]]
        strides = tuple(s * flat.itemsize for s in ref.stride)
        arrays[name] = np.lib.stride_tricks.as_strided(flat[ref.offset:], ref.size, strides).copy()
    return arrays


def write_state_dict(arrays: dict[str, np.ndarray], stream: IO[bytes]) -> None:
    """Write arrays in the same legacy format (contiguous, one storage per tensor), emitting the
    pickle opcodes by hand since torch's globals cannot be pickled without torch. The tests use it
    to check the reader on a file they make."""
    storage_names = {np.dtype(v): k for k, v in STORAGE_DTYPES.items()}

    def value(obj: Any) -> bytes:  # one plain value's opcodes, without PROTO and STOP
        return pickle.dumps(obj, protocol=2)[2:-1]

    def global_(module: str, name: str) -> bytes:
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    empty_ordered_dict = global_("collections", "OrderedDict") + b")R"
    tensors = [(name, str(i), np.require(a, requirements="C").astype(np.dtype(a.dtype).newbyteorder("<")))
               for i, (name, a) in enumerate(arrays.items())]
    body = b"\x80\x02" + empty_ordered_dict
    for name, key, array in tensors:
        storage = (b"(" + value("storage") + global_("torch", storage_names[array.dtype])
                   + value(key) + value("cpu") + value(int(array.size)) + b"Nt" + b"Q")
        stride = tuple(int(np.prod(array.shape[i + 1:], dtype=np.int64)) for i in range(array.ndim))
        body += (value(name) + global_("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + value(0)
                 + value(tuple(int(n) for n in array.shape)) + value(stride) + b"\x89" + empty_ordered_dict
                 + b"tR" + b"s")
    for obj in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}):
        pickle.dump(obj, stream, protocol=2)
    stream.write(body + b".")
    pickle.dump([key for _, key, _ in tensors], stream, protocol=2)
    for _, _, array in tensors:
        stream.write(struct.pack("<q", array.size))
        stream.write(array.tobytes())
