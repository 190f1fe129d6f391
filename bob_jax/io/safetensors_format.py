"""Read `.safetensors` files into numpy, bfloat16/float8 included.

Format (huggingface/safetensors `docs/source/index.mdx`): an 8-byte little-endian header length N, N bytes
of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data
section, little-endian and C-contiguous. `safetensors.numpy.load_file` rejects bfloat16 (numpy has no such
dtype), which most hub checkpoints use; parsing the header here and viewing the bytes with `ml_dtypes`
handles every dtype and lets truncation be reported per tensor.
"""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np

from bob_jax.io.errors import CheckpointError

_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}

# Headers above this are not real checkpoints (the reference implementation caps them at 100 MB too).
_MAX_HEADER = 100_000_000


def looks_like_safetensors(head: bytes, file_size: int) -> bool:
    """True when the first bytes are a plausible header length followed by the start of a JSON object."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= _MAX_HEADER


def read_safetensors(path: str, file_size: int) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > file_size:
            raise CheckpointError(
                f"{path}: truncated: the safetensors header declares {n} bytes, {file_size - 8} remain"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header: a JSON {type(header).__name__}")
        data_start = 8 + n
        data_size = file_size - data_start
        out: dict[str, np.ndarray] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt safetensors entry {name!r}: {info!r}") from None
            if dtype_name not in _DTYPES:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has safetensors dtype {dtype_name!r}, which numpy cannot hold "
                    f"(known: {sorted(_DTYPES)})"
                )
            dtype = _DTYPES[dtype_name]
            if not all(type(d) is int and d >= 0 for d in shape) or not (
                type(begin) is int and type(end) is int
            ):
                raise CheckpointError(f"{path}: corrupt safetensors entry {name!r}: {info!r}")
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(
                    f"{path}: corrupt safetensors entry {name!r}: shape {shape} of {dtype_name} needs {nbytes} "
                    f"bytes, data_offsets [{begin}, {end}) hold {end - begin}"
                )
            if end > data_size:
                raise CheckpointError(
                    f"{path}: truncated: tensor {name!r} declares data bytes [{begin}, {end}), "
                    f"{max(data_size - begin, 0)} remain"
                )
            f.seek(data_start + begin)
            buf = bytearray(nbytes)
            f.readinto(buf)
            out[name] = (
                np.frombuffer(buf, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)
            )
    return out
