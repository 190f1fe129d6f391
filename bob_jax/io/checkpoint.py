"""Public entry points: read any supported checkpoint file into numpy, choosing the reader by content.

Supported: `.safetensors`; `torch.save` files in the zip and the legacy layout (`.pth`, `.pt`, `.bin`,
`.pth.tar`, ...; see `torch_format.py`); `.npz`; plain pickles of numpy arrays. The file extension is never
trusted: the first bytes decide, so a `.pth` that is really a safetensors file, or a PNG saved as `.pth`,
is read or rejected correctly.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from bob_jax.io.errors import CheckpointError, CheckpointNotFoundError
from bob_jax.io.safetensors_format import looks_like_safetensors, read_safetensors
from bob_jax.io.torch_format import find_zip_prefix, read_pickle_file, read_torch_zip
from bob_jax.io.unpickle import CheckpointNamespace

_ZIP_MAGIC = b"PK\x03\x04"


def _stat(path: str) -> int:
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such checkpoint file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    return os.path.getsize(path)


def _read_npz(path: str, archive: zipfile.ZipFile) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except ValueError as e:  # object arrays need pickle, which stays off
        raise CheckpointError(f"{path}: unreadable .npz (object arrays are not supported): {e}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: corrupt .npz: {e}") from None


def load_checkpoint_tree(path: str | os.PathLike) -> Any:
    """The whole content of a checkpoint as python containers with numpy arrays for tensors.

    torch files keep their nesting (`{"model": OrderedDict(...), "epoch": 3, "args": CheckpointNamespace}`);
    `torch.Size` becomes a tuple, `torch.device` and `torch.dtype` strings, numpy scalars stay numpy
    scalars. safetensors and npz files give their flat name -> array dict. Raises `CheckpointError`
    (`UnsafeCheckpointError` for pickles that name anything off the allowlist).
    """
    path = os.fspath(path)
    size = _stat(path)
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(512)

    if head.startswith(_ZIP_MAGIC) or zipfile.is_zipfile(path):
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise CheckpointError(
                f"{path}: truncated or damaged zip archive (no readable central directory in {size} bytes); "
                f"re-download or re-save it"
            ) from None
        with archive:
            names = archive.namelist()
            if find_zip_prefix(names) is not None:
                return read_torch_zip(path, archive)
            if names and all(n.endswith(".npy") for n in names):
                return _read_npz(path, archive)
            raise CheckpointError(
                f"{path}: a zip archive but neither a PyTorch checkpoint (no data.pkl) nor an .npz "
                f"(entries: {names[:5]})"
            )
    if looks_like_safetensors(head, size):
        return read_safetensors(path, size)
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return read_pickle_file(path, size)
    if len(head) > 262 and head[257:262] == b"ustar":
        raise CheckpointError(
            f"{path}: a tar archive (the pre-1.0 PyTorch tar layout is not supported); load and re-save it with "
            f"torch in a trusted environment"
        )
    raise CheckpointError(
        f"{path}: not a PyTorch/safetensors checkpoint: starts with {head[:8]!r} (expected a zip archive, a "
        f"pickle starting with b'\\x80', or a safetensors header)"
    )


# --------------------------------------------------------------------------------------------------------
# state dicts


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array {value.dtype}{list(value.shape)}"
    if isinstance(value, Mapping):
        n = _count_tensors(value)
        return f"{type(value).__name__} of {len(value)} entries, {n} tensors"
    if isinstance(value, CheckpointNamespace):
        return "Namespace"
    return type(value).__name__


def _count_tensors(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return 1
    if isinstance(value, Mapping):
        return sum(_count_tensors(v) for v in value.values())
    return 0


def _flatten_tensors(tree: Mapping, prefix: str, out: dict[str, np.ndarray], bad: list[str]) -> None:
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, np.ndarray):
            out[name] = v
        elif isinstance(v, Mapping) and v:
            _flatten_tensors(v, f"{name}.", out, bad)
        else:
            bad.append(f"{name!r} ({_describe(v)})")


def _select(tree: Any, key: str, path: str) -> Any:
    """Follow a dotted `key`. Keys may themselves contain dots ("module.conv1.weight"), so at each level the
    longest matching key wins; what is left once a name -> tensor dict is reached acts as a name prefix,
    which is stripped (`key="state_dict.module.base_encoder"` on a MoCo file)."""
    parts = key.split(".")
    node, i, walked = tree, 0, []
    while i < len(parts):
        if not isinstance(node, Mapping):
            raise CheckpointError(
                f"{path}: key={key!r}: {'.'.join(walked) or 'the top level'} is a {_describe(node)}, not a dict"
            )
        for j in range(len(parts), i, -1):
            candidate = ".".join(parts[i:j])
            if candidate in node:
                node, i = node[candidate], j
                walked.append(candidate)
                break
        else:
            prefix = ".".join(parts[i:]) + "."
            picked = {
                k[len(prefix) :]: v for k, v in node.items() if isinstance(k, str) and k.startswith(prefix)
            }
            if picked:
                return picked
            keys = ", ".join(repr(k) for k in list(node)[:20]) + (", ..." if len(node) > 20 else "")
            raise CheckpointError(
                f"{path}: key={key!r}: {'.'.join(parts[i:])!r} is neither a key nor a name prefix in "
                f"{'.'.join(walked) or 'the top level'} (keys: {keys})"
            )
    return node


def load_state_dict(path: str | os.PathLike, *, key: str | None = None) -> dict[str, np.ndarray]:
    """A flat name -> numpy array dict from any supported checkpoint (dtypes kept: bf16 stays bf16).

    Without `key` the file's top level must already be name -> tensor (nested dicts of tensors are
    flattened with dots). Wrapped checkpoints (`{"model": ...}`, `{"state_dict": ...}`, DINO's
    `{"teacher": ...}`) need `key=`: a dotted path into the nesting, whose tail may be a name prefix to
    select and strip (`key="state_dict.module.base_encoder"`).
    """
    path = os.fspath(path)
    tree = load_checkpoint_tree(path)
    node = _select(tree, key, path) if key else tree
    if not isinstance(node, Mapping):
        raise CheckpointError(
            f"{path}: {f'key={key!r} selects' if key else 'the file holds'} a {_describe(node)}, "
            f"not a name -> tensor dict"
        )
    out: dict[str, np.ndarray] = {}
    bad: list[str] = []
    _flatten_tensors(node, "", out, bad)
    if not bad:
        return out
    if key is None:
        entries = ", ".join(f"{k!r} ({_describe(v)})" for k, v in list(node.items())[:20])
        wrappers = sorted(
            (k for k, v in node.items() if isinstance(v, Mapping) and _count_tensors(v)),
            key=lambda k: -_count_tensors(node[k]),
        )
        hint = f", e.g. key={wrappers[0]!r}" if wrappers else ""
        raise CheckpointError(
            f"{path}: the top level is not a name -> tensor dict; top-level keys: {entries}. Pass key= to pick "
            f"the state dict{hint}"
        )
    raise CheckpointError(
        f"{path}: key={key!r} selects entries that are not tensors: {', '.join(bad[:10])}"
        f"{' ...' if len(bad) > 10 else ''}; pick a deeper key"
    )


def sha256_file(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (recorded beside converted weights for provenance)."""
    path = os.fspath(path)
    _stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
