"""A restricted unpickler that rebuilds PyTorch tensors as numpy arrays without torch and without running code.

PyTorch checkpoints are pickles: loading one with `pickle`/`torch.load(weights_only=False)` imports and
calls whatever globals the file names (`os.system`, `builtins.eval`, any class's `__reduce__`). Here
`find_class` resolves names only through an explicit allowlist of stand-ins written in this module; it never
imports anything, so a name off the list is refused before any code could run. The stand-ins are:

- torch's tensor rebuild functions (`torch._utils._rebuild_tensor_v2` & co., `torch/_utils.py` in torch
  2.x) -> `TensorRef` placeholders (storage, offset, size, stride, dtype). Storage bytes are attached
  afterwards (in the legacy format they follow the pickle), then `finalize` turns each placeholder into a
  numpy array with `as_strided` + copy after checking that every element lies inside its storage.
- storage classes (`torch.FloatStorage`, `torch.storage.UntypedStorage`, ...) and dtypes (`torch.float16`)
  -> inert markers that carry the numpy dtype (bfloat16/float8 through `ml_dtypes`).
- plain containers and scalars from `builtins`/`collections`.
- data-only objects seen in research checkpoints: `argparse.Namespace` (MAE/DINO `args`) -> an inert
  `CheckpointNamespace`; numpy scalars/arrays/dtypes (`numpy.core.multiarray.scalar`, `_reconstruct`,
  `numpy.dtype`, `_codecs.encode`) rebuilt from raw bytes for plain numeric dtypes only (numpy's own
  unpickling of object/structured dtypes can dereference arbitrary pointers); `torch.Size` -> tuple;
  `torch.device` -> str.
"""

from __future__ import annotations

import collections
import math
import pickle
import re
import types
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from bob_jax.io.errors import CONVERT_HINT, CheckpointError, UnsafeCheckpointError

# --------------------------------------------------------------------------------------------------------
# dtypes

# torch storage class name -> numpy dtype (torch/storage.py:_dtype_to_storage_type_map).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    # Untyped storages are raw bytes; the tensor's dtype comes with `_rebuild_tensor_v3`.
    "UntypedStorage": np.dtype(np.uint8),
}
# Known torch storages without a numpy equivalent: refused as unsupported (not as unsafe).
_UNSUPPORTED_STORAGES = (
    "QInt8Storage",
    "QInt32Storage",
    "QUInt8Storage",
    "QUInt4x2Storage",
    "QUInt2x4Storage",
)

# torch dtype attribute name -> numpy dtype (None: known to torch, no numpy equivalent).
_TORCH_DTYPES: dict[str, np.dtype | None] = {
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "cfloat": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "cdouble": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
    "complex32": None,
    "chalf": None,
    "qint8": None,
    "qint32": None,
    "quint8": None,
    "quint4x2": None,
    "quint2x4": None,
    "float4_e2m1fn_x2": None,
}


class _Inert:
    """Base of the read-only markers and placeholders: pickle's BUILD opcode cannot modify them."""

    __slots__ = ()

    def _set(self, **values: Any) -> None:
        for k, v in values.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: Any) -> None:
        raise CheckpointError(f"the pickle tries to set attribute {name!r} on a {type(self).__name__}")

    def __setstate__(self, state: Any) -> None:
        raise CheckpointError(f"the pickle tries to set the state of a {type(self).__name__}")


class StorageType(_Inert):
    """Stand-in for a torch storage class (`torch.FloatStorage`, `torch.storage.UntypedStorage`, ...)."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: np.dtype | None):
        self._set(name=name, dtype=dtype)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class TorchDtype(_Inert):
    """Stand-in for a `torch.dtype` pickled as a global (e.g. the dtype argument of `_rebuild_tensor_v3`)."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: np.dtype | None):
        self._set(name=name, dtype=dtype)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Marker(_Inert):
    """Stand-in for a class that only serves as a tag (`torch.Tensor`, `numpy.ndarray`, ...)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self._set(name=name)

    def __repr__(self) -> str:
        return self.name


_TENSOR_MARKER = _Marker("torch.Tensor")
_PARAMETER_MARKER = _Marker("torch.nn.Parameter")
_NDARRAY_MARKER = _Marker("numpy.ndarray")


class StorageRef(_Inert):
    """A storage named by a persistent id: `('storage', type, key, location, numel[, view_metadata])`."""

    __slots__ = ("dtype", "key", "location", "numel", "view")

    def __init__(self, key: str, dtype: np.dtype, numel: int, location: str, view: tuple | None):
        self._set(key=key, dtype=dtype, numel=numel, location=location, view=view)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class TensorRef(_Inert):
    """A tensor waiting for its storage bytes."""

    __slots__ = ("dtype", "metadata", "offset", "size", "storage", "stride")

    def __init__(self, storage, offset, size, stride, dtype, metadata):
        self._set(storage=storage, offset=offset, size=size, stride=stride, dtype=dtype, metadata=metadata)


class CheckpointNamespace(types.SimpleNamespace):
    """Inert stand-in for `argparse.Namespace` objects pickled into checkpoints (attributes only)."""


# --------------------------------------------------------------------------------------------------------
# torch rebuild functions, re-implemented as placeholders (signatures from torch/_utils.py, torch/_tensor.py)


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise CheckpointError(f"tensor {what} must be a tuple of ints, got {value!r}")
    return tuple(value)


def _tensor_ref(storage, storage_offset, size, stride, dtype=None, metadata=None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"tensor storage must come from a persistent id, got {type(storage).__name__}")
    if type(storage_offset) is not int or storage_offset < 0:
        raise CheckpointError(f"tensor storage offset must be a non-negative int, got {storage_offset!r}")
    size = _as_int_tuple(size, "size")
    stride = _as_int_tuple(stride, "stride")
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"invalid tensor geometry: size {size}, stride {stride}")
    if dtype is None:
        np_dtype = storage.dtype
    elif isinstance(dtype, TorchDtype):
        if dtype.dtype is None:
            raise CheckpointError(f"tensors of dtype {dtype!r} have no numpy equivalent; {CONVERT_HINT}")
        np_dtype = dtype.dtype
    else:
        raise CheckpointError(f"tensor dtype must be a torch dtype, got {dtype!r}")
    if metadata:
        if not isinstance(metadata, dict) or not set(metadata) <= {"conj", "neg"}:
            raise CheckpointError(f"unsupported tensor metadata {metadata!r}; {CONVERT_HINT}")
        metadata = {k: bool(v) for k, v in metadata.items()}
    return TensorRef(storage, storage_offset, size, stride, np_dtype, metadata or None)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _tensor_ref(storage, storage_offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    return _tensor_ref(storage, storage_offset, size, stride, dtype=dtype, metadata=metadata)


def _is_tensor_like(value: Any) -> bool:
    return isinstance(value, (TensorRef, _NdarrayProxy, np.ndarray))


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not _is_tensor_like(data):
        raise CheckpointError(f"a Parameter must wrap a tensor, got {type(data).__name__}")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    # `state` holds python attributes set on the Parameter; weights do not depend on them.
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_TENSOR_REBUILDERS: frozenset = frozenset()  # filled below, once the functions exist


def _rebuild_from_type_v2(func, new_type, args, state):
    # Used for tensors that carry python attributes (or subclasses): only plain Tensor/Parameter are
    # accepted, and `func` must itself be one of the placeholder rebuilders above.
    if func not in _TENSOR_REBUILDERS or new_type not in (_TENSOR_MARKER, _PARAMETER_MARKER):
        raise CheckpointError(f"unsupported tensor subclass rebuild ({func!r}, {new_type!r}); {CONVERT_HINT}")
    if not isinstance(args, tuple):
        raise CheckpointError("corrupt _rebuild_from_type_v2 arguments")
    return func(*args)


def _rebuild_device_tensor_from_numpy(data, dtype, device, requires_grad):
    # torch_xla saves TPU tensors as numpy arrays plus a target dtype.
    if not isinstance(dtype, TorchDtype) or dtype.dtype is None:
        raise CheckpointError(f"unsupported dtype {dtype!r} for a device tensor")
    array = _finalize_ndarray(data)
    return array.astype(dtype.dtype, copy=False)


_TENSOR_REBUILDERS = frozenset(
    {
        _rebuild_tensor,
        _rebuild_tensor_v2,
        _rebuild_tensor_v3,
        _rebuild_parameter,
        _rebuild_parameter_with_state,
        _rebuild_device_tensor_from_numpy,
    }
)


def _torch_size(dims=()):
    return _as_int_tuple(tuple(dims), "torch.Size")


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise CheckpointError(f"invalid torch.device({kind!r}, {index!r})")
    return kind if index is None else f"{kind}:{index}"


# --------------------------------------------------------------------------------------------------------
# numpy objects, rebuilt from raw bytes for plain numeric dtypes only

_NUMPY_SPEC = re.compile(r"^[<>|=]?[biufc?]\d*$")


class _DtypeSpec:
    """`numpy.dtype(spec, align, copy)` followed by BUILD(state): records a plain numeric dtype only."""

    def __init__(self, spec: Any = None, align: Any = False, copy: Any = True):
        if not isinstance(spec, str) or not _NUMPY_SPEC.match(spec):
            raise CheckpointError(f"numpy dtype {spec!r} is not a plain numeric dtype; {CONVERT_HINT}")
        self._dtype = np.dtype(spec)
        if self._dtype.kind not in "biufc":
            raise CheckpointError(f"numpy dtype {spec!r} is not a plain numeric dtype; {CONVERT_HINT}")

    def __setstate__(self, state: Any) -> None:
        # numpy's state: (version, byteorder, subarray, names, fields, elsize, alignment, flags).
        if not isinstance(state, tuple) or len(state) < 5 or any(s is not None for s in state[2:5]):
            raise CheckpointError(f"numpy dtype state {state!r} is not a plain numeric dtype; {CONVERT_HINT}")
        byteorder = state[1]
        if byteorder not in ("<", ">", "|", "="):
            raise CheckpointError(f"invalid numpy byte order {byteorder!r}")
        if byteorder in ("<", ">"):
            self._dtype = self._dtype.newbyteorder(byteorder)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype


def _raw_bytes(data: Any, what: str) -> bytes:
    # Python 2 pickles carry raw bytes as str; with encoding="latin1" they map back 1:1.
    if isinstance(data, str):
        return data.encode("latin1")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    raise CheckpointError(f"{what} data must be bytes, got {type(data).__name__}")


def _numpy_scalar(dtype: Any, data: Any = None):
    if not isinstance(dtype, _DtypeSpec):
        raise CheckpointError(f"numpy scalar dtype must be a plain numpy dtype, got {dtype!r}")
    raw = _raw_bytes(data, "numpy scalar")
    if len(raw) != dtype.dtype.itemsize:
        raise CheckpointError(
            f"numpy scalar of {dtype.dtype} needs {dtype.dtype.itemsize} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype.dtype)[0].astype(dtype.dtype.newbyteorder("="))


def _array_from_bytes(raw: bytes, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> np.ndarray:
    count = math.prod(shape)
    if len(raw) != count * dtype.itemsize:
        raise CheckpointError(
            f"numpy array {shape} of {dtype} needs {count * dtype.itemsize} bytes, got {len(raw)}"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")
    return array.astype(dtype.newbyteorder("="), order="C")  # a native-order, writable copy


class _NdarrayProxy:
    """`numpy.core.multiarray._reconstruct(ndarray, ...)` followed by BUILD(state) -> `self.array`."""

    def __init__(self):
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # drop the format version
        if not isinstance(state, tuple) or len(state) != 4:
            raise CheckpointError("corrupt numpy array state")
        shape, dtype, fortran, data = state
        if not isinstance(dtype, _DtypeSpec):
            raise CheckpointError(f"numpy array dtype {dtype!r} is not a plain numeric dtype; {CONVERT_HINT}")
        shape = _as_int_tuple(shape, "numpy shape")
        self.array = _array_from_bytes(_raw_bytes(data, "numpy array"), dtype.dtype, shape, bool(fortran))


def _numpy_reconstruct(cls, shape=(0,), typecode=b"b"):
    if cls is not _NDARRAY_MARKER:
        raise CheckpointError(f"numpy _reconstruct only rebuilds numpy.ndarray, got {cls!r}; {CONVERT_HINT}")
    return _NdarrayProxy()


def _numpy_frombuffer(buffer, dtype, shape, order):
    # numpy's pickle protocol-5 path (numpy/_core/numeric.py:_frombuffer).
    if not isinstance(dtype, _DtypeSpec):
        raise CheckpointError(f"numpy array dtype {dtype!r} is not a plain numeric dtype; {CONVERT_HINT}")
    raw = bytes(memoryview(buffer)) if isinstance(buffer, (bytes, bytearray, pickle.PickleBuffer)) else None
    if raw is None:
        raise CheckpointError("numpy _frombuffer data must be bytes")
    return _array_from_bytes(raw, dtype.dtype, _as_int_tuple(tuple(shape), "numpy shape"), order == "F")


def _finalize_ndarray(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, _NdarrayProxy) and value.array is not None:
        return value.array
    raise CheckpointError(f"expected a numpy array, got {type(value).__name__}")


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # numpy scalars pickled with protocol 2 store their bytes as `_codecs.encode(latin1 str, "latin1")`.
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise CheckpointError(f"_codecs.encode is only allowed for latin1 byte strings, got {encoding!r}")
    return text.encode("latin1")


# --------------------------------------------------------------------------------------------------------
# builtins with the few argument forms that could do harm removed


def _safe_bytes(*args):
    # bytes(10**12) would allocate a terabyte; only data-carrying forms are allowed.
    if args and isinstance(args[0], int):
        raise CheckpointError("bytes(<int>) is not allowed in checkpoints")
    return bytes(*args)


def _safe_bytearray(*args):
    if args and isinstance(args[0], int):
        raise CheckpointError("bytearray(<int>) is not allowed in checkpoints")
    return bytearray(*args)


def _copyreg_reconstructor(cls, base, state):
    # Protocol 0/1 pickles (e.g. argparse.Namespace from Python 2) rebuild objects through copyreg.
    if cls not in (CheckpointNamespace, collections.OrderedDict) or base is not object or state is not None:
        raise CheckpointError(f"copyreg._reconstructor({cls!r}, {base!r}) is not allowed; {CONVERT_HINT}")
    return cls.__new__(cls)


# --------------------------------------------------------------------------------------------------------
# the allowlist

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "complex"): complex,
    ("builtins", "str"): str,
    ("builtins", "bool"): bool,
    ("builtins", "slice"): slice,
    ("builtins", "object"): object,
    ("builtins", "bytes"): _safe_bytes,
    ("builtins", "bytearray"): _safe_bytearray,
    ("copyreg", "_reconstructor"): _copyreg_reconstructor,
    ("argparse", "Namespace"): CheckpointNamespace,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy", "dtype"): _DtypeSpec,
    ("numpy", "ndarray"): _NDARRAY_MARKER,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): _rebuild_device_tensor_from_numpy,
    ("torch._utils", "_rebuild_xla_tensor"): _rebuild_device_tensor_from_numpy,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TENSOR_MARKER,
    ("torch._tensor", "Tensor"): _TENSOR_MARKER,
    ("torch.nn.parameter", "Parameter"): _PARAMETER_MARKER,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
}
for _name, _dtype in _STORAGE_DTYPES.items():
    for _module in ("torch", "torch.storage", "torch.cuda"):  # checkpoints saved on GPU name torch.cuda.*
        _ALLOWED[(_module, _name)] = StorageType(_name, _dtype)
_ALLOWED[("torch.storage", "TypedStorage")] = StorageType("TypedStorage", None)
for _name, _dtype in _TORCH_DTYPES.items():
    _ALLOWED[("torch", _name)] = TorchDtype(_name, _dtype)

# Module spellings that mean the same module (Python 2 names, numpy < 2).
_MODULE_ALIASES = {
    "__builtin__": "builtins",
    "copy_reg": "copyreg",
    "numpy.core.multiarray": "numpy._core.multiarray",
    "numpy.core.numeric": "numpy._core.numeric",
}

# Known torch functions that rebuild tensor kinds numpy cannot represent: a clearer error than "unsafe".
_UNSUPPORTED_TORCH = {
    "_rebuild_qtensor": "quantized tensors",
    "_rebuild_sparse_tensor": "sparse tensors",
    "_rebuild_nested_tensor": "nested tensors",
    "_rebuild_meta_tensor_no_storage": "meta tensors (no data)",
    "_rebuild_wrapper_subclass": "tensor subclasses",
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves globals only through `_ALLOWED` and storages only through `storage_for`.

    `storage_for(key, dtype, numel, location, view)` returns the `StorageRef` for a persistent id; without it
    (a plain pickle) any persistent id is an error.
    """

    def __init__(
        self,
        file,
        *,
        path: str,
        storage_for: Callable[..., StorageRef] | None = None,
        encoding: str = "utf-8",
    ):
        super().__init__(file, encoding=encoding)
        self._path = path
        self._storage_for = storage_for

    def find_class(self, module: str, name: str) -> Any:
        key = (_MODULE_ALIASES.get(module, module), name)
        try:
            return _ALLOWED[key]
        except (KeyError, TypeError):
            pass
        if key[0] in ("torch._utils", "torch._tensor") and name in _UNSUPPORTED_TORCH:
            raise CheckpointError(
                f"{self._path}: holds {_UNSUPPORTED_TORCH[name]} ({module}.{name}), which cannot be rebuilt "
                f"without torch; {CONVERT_HINT}"
            )
        if key[0] in ("torch", "torch.cuda") and name in _UNSUPPORTED_STORAGES:
            raise CheckpointError(f"{self._path}: holds quantized storages ({module}.{name}); {CONVERT_HINT}")
        raise UnsafeCheckpointError(
            f"{self._path}: refused to load: the pickle asks for {module}.{name}, which is not on the allowlist "
            f"of tensor, container and plain-data types (a pickle global can run arbitrary code; nothing was "
            f"imported or run). If you trust the file, {CONVERT_HINT}."
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._storage_for is None:
            raise CheckpointError(f"{self._path}: unexpected persistent id {pid!r} in a plain pickle")
        if not isinstance(pid, tuple) or not pid:
            raise CheckpointError(f"{self._path}: invalid persistent id {pid!r}")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename != "storage" or len(pid) not in (5, 6):
            raise CheckpointError(
                f"{self._path}: unsupported persistent id {typename!r} (whole pickled modules are not "
                f"supported); {CONVERT_HINT}"
            )
        storage_type, key, location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, StorageType) or storage_type.dtype is None:
            raise CheckpointError(f"{self._path}: persistent id names {storage_type!r}, not a storage class")
        if isinstance(location, bytes):
            location = location.decode("ascii")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise CheckpointError(f"{self._path}: invalid storage persistent id {pid!r}")
        if view is not None and not (
            isinstance(view, tuple)
            and len(view) == 3
            and isinstance(view[0], str)
            and all(type(v) is int and v >= 0 for v in view[1:])
        ):
            raise CheckpointError(f"{self._path}: invalid storage view {view!r}")
        return self._storage_for(key, storage_type.dtype, numel, str(location), view)


# --------------------------------------------------------------------------------------------------------
# placeholders -> numpy


def _covers_whole_storage(ref: TensorRef, nbytes: int) -> bool:
    """True when `ref` is the C-contiguous view of all `nbytes` of its storage, as most weights are."""
    if ref.offset or ref.metadata:
        return False
    expected = 1
    for n, s in zip(reversed(ref.size), reversed(ref.stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return expected * ref.dtype.itemsize == nbytes


def tensor_from_storage(
    ref: TensorRef, buf: memoryview | bytearray, *, big_endian: bool, where: str, share: bool = False
) -> np.ndarray:
    """Copy the strided view `ref` out of the raw storage bytes `buf`, checking every bound first.

    With `share=True` a tensor that is exactly the whole (native-order) storage wraps `buf` instead of
    copying it; the caller lets only one tensor per storage do so, so arrays never alias each other.
    """
    dtype = ref.dtype
    itemsize = dtype.itemsize
    n_elements = len(buf) // itemsize
    size, stride, offset = ref.size, ref.stride, ref.offset
    if math.prod(size) == 0:
        return np.zeros(size, dtype=dtype)
    if math.prod(size) * itemsize > 4 * len(buf) + (1 << 30):
        # Zero strides (expand) can describe tensors far larger than their storage; copying one of
        # those would exhaust memory, and real weights are never saved that way.
        raise CheckpointError(
            f"tensor {where} (size {size}, stride {stride}) would expand a {len(buf)}-byte storage to "
            f"{math.prod(size) * itemsize} bytes"
        )
    if share and (not big_endian or itemsize == 1) and _covers_whole_storage(ref, len(buf)):
        return np.frombuffer(buf, dtype=dtype).reshape(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= n_elements:
        raise CheckpointError(
            f"tensor {where} (size {size}, stride {stride}, offset {offset}) reads element {last} of storage "
            f"{ref.storage.key!r}, which holds {n_elements} elements of {dtype}"
        )
    base = np.frombuffer(buf, dtype=np.uint8, count=n_elements * itemsize)
    if big_endian and itemsize > 1:
        # Byte-swap whole elements (complex: each half), then reinterpret as the target dtype.
        unit = itemsize // 2 if dtype.kind == "c" else itemsize
        base = base.view(f">u{unit}").astype(f"<u{unit}").view(np.uint8)
    base = base.view(dtype)
    view = np.lib.stride_tricks.as_strided(
        base[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )
    out = np.array(view, copy=True, order="C")
    if ref.metadata:
        if ref.metadata.get("conj"):
            out = np.conj(out)
        if ref.metadata.get("neg"):
            out = np.negative(out)
    return out


def finalize(
    tree: Any,
    resolve_tensor: Callable[[TensorRef, str], np.ndarray],
    resolve_storage: Callable[[StorageRef, str], np.ndarray],
) -> Any:
    """Rebuild the unpickled structure with every placeholder replaced by plain python / numpy values.

    Shared sub-objects stay shared (a memo keyed by id), so cycles through lists/dicts terminate.
    """
    memo: dict[int, Any] = {}

    def walk(obj: Any, where: str) -> Any:
        oid = id(obj)
        if oid in memo:
            return memo[oid]
        kind = type(obj)
        if kind is TensorRef:
            result = resolve_tensor(obj, where)
        elif kind is StorageRef:
            result = resolve_storage(obj, where)
        elif kind is _NdarrayProxy:
            result = _finalize_ndarray(obj)
        elif kind is _DtypeSpec:
            result = obj.dtype
        elif kind in (TorchDtype, StorageType, _Marker):
            result = repr(obj)
        elif kind is dict or kind is collections.OrderedDict:
            result = kind()
            memo[oid] = result
            for k, v in obj.items():
                key = walk(k, where)
                result[key] = walk(v, f"{where}.{key}" if where else str(key))
            # torch state dicts carry `_metadata` (module versions) as an OrderedDict attribute.
            for k, v in vars(obj).items() if kind is collections.OrderedDict else ():
                setattr(result, k, walk(v, f"{where}.{k}"))
        elif kind is list:
            result = []
            memo[oid] = result
            result.extend(walk(v, f"{where}[{i}]") for i, v in enumerate(obj))
        elif kind is tuple:
            result = tuple(walk(v, f"{where}[{i}]") for i, v in enumerate(obj))
        elif kind is set or kind is frozenset:
            result = kind(walk(v, where) for v in obj)
        elif kind is CheckpointNamespace:
            result = CheckpointNamespace()
            memo[oid] = result
            for k, v in vars(obj).items():
                setattr(result, k, walk(v, f"{where}.{k}"))
        else:
            # Scalars, strings, bytes, numpy values, and the inert objects allowlisted constructors make.
            result = obj
        memo[oid] = result
        return result

    try:
        return walk(tree, "")
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError("the checkpoint nests containers too deeply to rebuild") from None
    except (TypeError, ValueError, AttributeError) as e:
        # e.g. a tensor used as a dict key or set member (arrays are unhashable).
        raise CheckpointError(f"cannot rebuild the checkpoint's structure: {type(e).__name__}: {e}") from None
