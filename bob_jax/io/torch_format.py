"""Read files written by `torch.save` (both layouts) into python/numpy structures, without torch.

Layouts (torch/serialization.py, torch 2.x):

- zip (default since torch 1.6): `<archive>/data.pkl` (the pickle; tensors refer to storages through
  persistent ids `('storage', storage_type, key, location, numel)`), `<archive>/data/<key>` (raw storage
  bytes), `<archive>/byteorder` ("little"/"big"; absent in old files = little), `<archive>/version`. The
  top-level folder name is arbitrary (the file's stem at save time).
- legacy (`_use_new_zipfile_serialization=False`, and every file written by torch < 1.6): five objects
  back to back: pickle(magic number 0x1950a86a20f9469cfc6c), pickle(protocol version 1001), pickle(sys_info
  dict), the main pickle (persistent ids `('storage', type, key, location, numel, view_metadata)`), a pickle
  of the sorted storage keys; then per key an 8-byte little-endian element count and the raw bytes. torch
  writes those bytes little-endian whatever the machine (`THPStorage_writeFileRaw`).

A `.pkl` holding a plain pickle (e.g. detectron2 weights as numpy arrays) is read with the same restricted
unpickler (latin1 strings, as detectron2 writes them from Python 2).
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

from bob_jax.io.errors import CONVERT_HINT, CheckpointError
from bob_jax.io.unpickle import RestrictedUnpickler, StorageRef, TensorRef, finalize, tensor_from_storage

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def _with_path(error: CheckpointError, path: str) -> CheckpointError:
    """Prefix messages raised deep inside the rebuild code with the file they are about."""
    if str(error).startswith(path):
        return error
    return type(error)(f"{path}: {error}")


class _StorageTable:
    """Collects the storages the pickle names; one `StorageRef` per key (shared storages stay shared)."""

    def __init__(self, path: str):
        self.path = path
        self.roots: dict[str, StorageRef] = {}
        self.views: dict[str, StorageRef] = {}

    def __call__(
        self, key: str, dtype: np.dtype, numel: int, location: str, view: tuple | None
    ) -> StorageRef:
        root = self.roots.get(key)
        if root is None:
            root = self.roots[key] = StorageRef(key, dtype, numel, location, None)
        elif root.dtype != dtype or root.numel != numel:
            raise CheckpointError(
                f"storage {key!r} is named twice with different types ({root.dtype} x {root.numel} vs "
                f"{dtype} x {numel})"
            )
        if view is None:
            return root
        # Legacy files (torch < 1.0) could pickle views of a storage: (view_key, offset, size) in elements.
        view_key, offset, size = view
        if view_key not in self.views:
            self.views[view_key] = StorageRef(view_key, dtype, size, location, (key, offset))
        return self.views[view_key]


def _storage_bytes(ref: StorageRef, table: _StorageTable, root_bytes) -> memoryview:
    if ref.view is None:
        return memoryview(root_bytes(ref))
    root_key, offset = ref.view
    data = root_bytes(table.roots[root_key])
    start = offset * ref.dtype.itemsize
    if start + ref.nbytes > len(data):
        raise CheckpointError(
            f"storage view {ref.key!r} spans bytes [{start}, {start + ref.nbytes}) of storage {root_key!r}, "
            f"which has {len(data)} bytes"
        )
    return memoryview(data)[start : start + ref.nbytes]


def _finalize_with(tree: Any, table: _StorageTable, root_bytes, *, big_endian: bool) -> Any:
    # Storages whose buffer one array already wraps (zero-copy); later tensors on them get copies.
    claimed: set[str] = set()

    def resolve_tensor(ref: TensorRef, where: str) -> np.ndarray:
        storage = ref.storage
        root_key = storage.view[0] if storage.view else storage.key
        buf = _storage_bytes(storage, table, root_bytes)
        share = root_key not in claimed
        array = tensor_from_storage(ref, buf, big_endian=big_endian, where=repr(where), share=share)
        if share and not array.flags.owndata:
            claimed.add(root_key)
        return array

    def resolve_storage(ref: StorageRef, where: str) -> np.ndarray:
        whole = TensorRef(ref, 0, (ref.numel,), (1,), ref.dtype, None)
        return resolve_tensor(whole, where)

    return finalize(tree, resolve_tensor, resolve_storage)


def _readinto_exact(stream: BinaryIO, buf: bytearray) -> int:
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _unpickle(stream: BinaryIO, path: str, what: str, size: int, **kwargs) -> Any:
    """Run the restricted unpickler on `stream`; every failure becomes a CheckpointError naming `path`."""
    start = stream.tell()
    try:
        return RestrictedUnpickler(stream, path=path, **kwargs).load()
    except CheckpointError as e:
        raise _with_path(e, path) from None
    except EOFError:
        raise CheckpointError(
            f"{path}: truncated: {what} (from byte {start}) ends early ({size} bytes in all)"
        ) from None
    except pickle.UnpicklingError as e:
        if "truncated" in str(e):
            raise CheckpointError(
                f"{path}: truncated: {what} (from byte {start}) ends early ({size} bytes in all)"
            ) from None
        raise CheckpointError(f"{path}: corrupt {what} (from byte {start}): {e}") from None
    except (
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
        OverflowError,
        MemoryError,
        UnicodeDecodeError,
        RecursionError,
    ) as e:
        raise CheckpointError(
            f"{path}: corrupt {what} (from byte {start}): {type(e).__name__}: {e}"
        ) from None


# --------------------------------------------------------------------------------------------------------
# zip layout


def _read_entry_into(archive: zipfile.ZipFile, info: zipfile.ZipInfo, buf: bytearray, f: BinaryIO) -> int:
    """Fill `buf` from a zip entry. torch stores entries uncompressed: read those straight from the file `f`
    (skipping zipfile's extra copy and CRC pass, which double the load time of large checkpoints)."""
    if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(info) as stream:
            return _readinto_exact(stream, buf)
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError(
            f"corrupt zip: no local header for {info.filename} at byte {info.header_offset}"
        )
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    return _readinto_exact(f, buf)


def find_zip_prefix(names: list[str]) -> str | None:
    """The `<archive>/` folder holding `data.pkl` ('' when it sits at the top), or None if there is none."""
    prefixes = [n[: -len("data.pkl")] for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
    prefixes = [p for p in prefixes if p == "" or p.endswith("/")]
    if len(prefixes) > 1:
        raise CheckpointError(f"the archive holds several data.pkl files: {sorted(prefixes)}")
    return prefixes[0] if prefixes else None


def read_torch_zip(path: str, archive: zipfile.ZipFile) -> Any:
    names = archive.namelist()
    prefix = find_zip_prefix(names)
    if prefix is None:
        raise CheckpointError(
            f"{path}: a zip archive without data.pkl, so not a PyTorch checkpoint (entries: {names[:5]})"
        )
    if any(n.startswith(prefix + "code/") for n in names):
        raise CheckpointError(
            f"{path}: a TorchScript archive (torch.jit.save), whose pickles name compiled classes; save the "
            f"model's state_dict() with torch.save or {CONVERT_HINT}"
        )
    byteorder = "little"
    if prefix + "byteorder" in names:
        byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r}")

    table = _StorageTable(path)
    try:
        pickled = archive.read(prefix + "data.pkl")
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt zip entry {prefix}data.pkl: {e}") from None
    tree = _unpickle(io.BytesIO(pickled), path, f"{prefix}data.pkl", len(pickled), storage_for=table)

    cache: dict[str, bytearray] = {}

    def root_bytes(ref: StorageRef) -> bytearray:
        if ref.key in cache:
            return cache[ref.key]
        name = f"{prefix}data/{ref.key}"
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise CheckpointError(
                f"storage {ref.key!r} is missing from the archive (no entry {name})"
            ) from None
        if info.file_size < ref.nbytes:
            raise CheckpointError(
                f"truncated: storage {ref.key} declares {ref.nbytes} bytes, {info.file_size} remain"
            )
        buf = bytearray(ref.nbytes)
        got = _read_entry_into(archive, info, buf, raw_file)
        if got < ref.nbytes:
            raise CheckpointError(f"truncated: storage {ref.key} declares {ref.nbytes} bytes, {got} remain")
        cache[ref.key] = buf
        return buf

    try:
        with open(path, "rb") as raw_file:
            return _finalize_with(tree, table, root_bytes, big_endian=byteorder == "big")
    except CheckpointError as e:
        raise _with_path(e, path) from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt zip entry: {e}") from None


# --------------------------------------------------------------------------------------------------------
# legacy layout (and plain pickles)


def read_pickle_file(path: str, file_size: int) -> Any:
    """A legacy `torch.save` file, or else a plain pickle, rebuilt through the restricted unpickler."""
    with open(path, "rb") as f:
        # latin1 keeps Python 2 byte strings (numpy data in detectron2 pickles) intact; torch's magic number
        # is an int either way.
        first = _unpickle(f, path, "the first pickle", file_size, encoding="latin1")
        if not (type(first) is int and first == LEGACY_MAGIC):
            try:
                return _finalize_with(first, _StorageTable(path), None, big_endian=False)
            except CheckpointError as e:
                raise _with_path(e, path) from None

        version = _unpickle(f, path, "the protocol version", file_size)
        if version != LEGACY_PROTOCOL:
            raise CheckpointError(
                f"{path}: legacy PyTorch file with protocol version {version!r}; only {LEGACY_PROTOCOL} is known"
            )
        sys_info = _unpickle(f, path, "the sys_info record", file_size)
        if not isinstance(sys_info, dict):
            raise CheckpointError(f"{path}: corrupt legacy header: sys_info is a {type(sys_info).__name__}")

        table = _StorageTable(path)
        tree = _unpickle(f, path, "the main pickle", file_size, storage_for=table)
        keys = _unpickle(f, path, "the storage key list", file_size)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CheckpointError(
                f"{path}: corrupt legacy file: the storage key list is {type(keys).__name__}"
            )

        data: dict[str, bytearray] = {}
        for key in keys:
            ref = table.roots.get(key)
            if ref is None:
                raise CheckpointError(
                    f"{path}: corrupt legacy file: storage {key!r} is listed but never used"
                )
            remain = file_size - f.tell()
            if remain < 8:
                raise CheckpointError(
                    f"{path}: truncated: storage {key} size header needs 8 bytes, {remain} remain"
                )
            count = int.from_bytes(f.read(8), "little")
            if count != ref.numel:
                raise CheckpointError(
                    f"{path}: corrupt legacy file: storage {key} holds {count} elements, the pickle "
                    f"declares {ref.numel}"
                )
            remain -= 8
            if ref.nbytes > remain:
                raise CheckpointError(
                    f"{path}: truncated: storage {key} declares {ref.nbytes} bytes, {remain} remain"
                )
            buf = bytearray(ref.nbytes)
            got = _readinto_exact(f, buf)
            if got < ref.nbytes:
                raise CheckpointError(
                    f"{path}: truncated: storage {key} declares {ref.nbytes} bytes, {got} remain"
                )
            data[key] = buf

    missing = sorted(set(table.roots) - set(data))
    if missing:
        raise CheckpointError(
            f"{path}: truncated or corrupt legacy file: storages {missing[:10]} are used by the pickle but "
            f"have no data"
        )
    try:
        return _finalize_with(tree, table, lambda ref: data[ref.key], big_endian=False)
    except CheckpointError as e:
        raise _with_path(e, path) from None
