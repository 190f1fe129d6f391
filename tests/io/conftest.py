"""Builders for checkpoint files written without torch: a tiny protocol-2 pickle emitter and the zip,
legacy and safetensors layouts around it (torch/serialization.py, huggingface/safetensors).

The emitter lets tests name any global (`G("torch._utils", "_rebuild_tensor_v2")`, `G("os", "system")`)
without importing it, which the standard pickler cannot do.
"""

from __future__ import annotations

import json
import pickle
import struct
import types
import zipfile

import numpy as np
import pytest

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class G:
    """A global reference `module.name` (GLOBAL opcode)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class R:
    """`func(*args)` (REDUCE opcode)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args


class PID:
    """A persistent id (BINPERSID opcode) made of `fields`."""

    def __init__(self, *fields):
        self.fields = fields


class Build:
    """`obj` followed by BUILD(state)."""

    def __init__(self, obj, state):
        self.obj, self.state = obj, state


class OD:
    """An OrderedDict emitted the way torch state dicts are: OrderedDict() then SETITEMS."""

    def __init__(self, items: dict):
        self.items = items


def _emit(obj, out: bytearray) -> None:
    if isinstance(obj, G):
        out += b"c" + f"{obj.module}\n{obj.name}\n".encode()
    elif isinstance(obj, R):
        _emit(obj.func, out)
        _emit(tuple(obj.args), out)
        out += b"R"
    elif isinstance(obj, PID):
        _emit(tuple(obj.fields), out)
        out += b"Q"
    elif isinstance(obj, Build):
        _emit(obj.obj, out)
        _emit(obj.state, out)
        out += b"b"
    elif isinstance(obj, OD):
        _emit(R(G("collections", "OrderedDict")), out)
        out += b"("
        for k, v in obj.items.items():
            _emit(k, out)
            _emit(v, out)
        out += b"u"
    elif type(obj) is tuple:
        out += b"("
        for x in obj:
            _emit(x, out)
        out += b"t"
    elif type(obj) is list:
        out += b"]("
        for x in obj:
            _emit(x, out)
        out += b"e"
    elif type(obj) is dict:
        out += b"}("
        for k, v in obj.items():
            _emit(k, out)
            _emit(v, out)
        out += b"u"
    elif type(obj) is bytes:
        out += b"B" + struct.pack("<I", len(obj)) + obj
    else:
        # Anything else (numbers, strings, numpy scalars, argparse.Namespace...) through the real pickler;
        # its memo indices restart in each fragment, which only overwrites entries no one reads again.
        out += pickle.dumps(obj, protocol=2)[2:-1]


def dumps(obj) -> bytes:
    out = bytearray(b"\x80\x02")
    _emit(obj, out)
    return bytes(out + b".")


def storage(key: str, storage_class: str, numel: int, *, legacy: bool = False, module: str = "torch") -> PID:
    fields = ("storage", G(module, storage_class), key, "cpu", numel)
    return PID(*fields, None) if legacy else PID(*fields)


def tensor(pid: PID, offset: int, size, stride, *, dtype: str | None = None) -> R:
    hooks = R(G("collections", "OrderedDict"))
    if dtype is None:
        return R(
            G("torch._utils", "_rebuild_tensor_v2"), pid, offset, tuple(size), tuple(stride), False, hooks
        )
    return R(
        G("torch._utils", "_rebuild_tensor_v3"),
        pid,
        offset,
        tuple(size),
        tuple(stride),
        False,
        hooks,
        G("torch", dtype),
    )


def write_zip(
    path,
    obj,
    storages: dict[str, bytes],
    *,
    prefix: str = "archive",
    byteorder: str | None = "little",
    pickled: bytes | None = None,
) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", pickled if pickled is not None else dumps(obj))
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in storages.items():
            zf.writestr(f"{prefix}/data/{key}", data)
        zf.writestr(f"{prefix}/version", "3\n")


def legacy_bytes(
    obj, storages: dict[str, tuple[bytes, int]], *, pickled: bytes | None = None, magic: bytes | None = None
) -> bytes:
    """storages: key -> (raw little-endian bytes, element size)."""
    sys_info = {
        "protocol_version": 1001,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
    }
    out = magic if magic is not None else pickle.dumps(LEGACY_MAGIC, protocol=2)
    out += pickle.dumps(1001, protocol=2) + pickle.dumps(sys_info, protocol=2)
    out += pickled if pickled is not None else dumps(obj)
    keys = sorted(storages)
    out += pickle.dumps(keys, protocol=2)
    for key in keys:
        data, itemsize = storages[key]
        out += struct.pack("<q", len(data) // itemsize) + data
    return out


def write_legacy(path, obj, storages: dict[str, tuple[bytes, int]], **kwargs) -> None:
    with open(path, "wb") as f:
        f.write(legacy_bytes(obj, storages, **kwargs))


def write_safetensors(path, tensors: dict[str, tuple[str, np.ndarray]], metadata: dict | None = None) -> None:
    """tensors: name -> (safetensors dtype string, array); written by hand so bf16 works."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, array) in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


@pytest.fixture
def ckpt():
    """The builders above, as one namespace."""
    return types.SimpleNamespace(
        G=G,
        R=R,
        PID=PID,
        Build=Build,
        OD=OD,
        dumps=dumps,
        storage=storage,
        tensor=tensor,
        write_zip=write_zip,
        write_legacy=write_legacy,
        legacy_bytes=legacy_bytes,
        write_safetensors=write_safetensors,
        LEGACY_MAGIC=LEGACY_MAGIC,
    )
