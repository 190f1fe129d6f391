"""Results store: one JSON record per finished run, ``<workdir>/results/<key>.json``.

Why one file per record: runs finish on many machines that may share a file system (NFS, GCS fuse). A shared
index file would need locking; independent files written atomically (temp file in the same directory, fsync,
``os.replace``) never leave a half-written record behind and never lose a concurrent writer's result. The
key is a hash of everything that defines a run (:func:`run_key`), so re-running the same configuration
overwrites its own record and a finished run can be skipped with :meth:`ResultsStore.exists`.

A record is a JSON object with at least ``key``, ``backbone``, ``task``, ``dataset``, ``split``,
``protocol`` and ``metrics`` (name -> number); :mod:`bob_jax.ranking` also reads ``primary_metric`` and the
optional ``lower_is_better``. Non-finite metric values are stored as ``null`` (strict JSON has no NaN).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "REQUIRED_FIELDS",
    "ResultsStore",
    "atomic_write_bytes",
    "atomic_write_text",
    "environment_info",
    "run_key",
]

_log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("key", "backbone", "task", "dataset", "split", "protocol", "metrics")
_KEY_FIELDS = ("backbone", "weights_sha256", "task", "dataset", "split", "protocol", "seed", "hparams")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----------------------------------------------------------------------------------------------------------
# Atomic writes (also used by bob_jax.report)
# ----------------------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    Readers see either the old file or the complete new one. The temp file lives beside the target because
    ``os.replace`` is only atomic within one file system. The directory is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # fsync the directory so the rename itself survives a crash (best effort: not all platforms allow it).
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------
# Keys and JSON
# ----------------------------------------------------------------------------------------------------------


def _to_jsonable(obj: Any, where: str = "record") -> Any:
    """Plain-JSON copy of ``obj``: numpy scalars/arrays -> Python, tuples -> lists, NaN/inf -> None."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {k!r} ({type(k).__name__}).")
            out[k] = _to_jsonable(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return _to_jsonable(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return _to_jsonable(obj.item(), where)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(
        f"{where}: {type(obj).__name__} is not JSON-serialisable; convert it to str/number/list/dict."
    )


def _canonical_json(obj: Any) -> str:
    return json.dumps(
        _to_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def run_key(
    backbone: str,
    weights_sha256: str,
    task: str,
    dataset: str,
    split: str,
    protocol: str,
    seed: int,
    hparams: Mapping[str, Any],
) -> str:
    """Identity of a run: the first 16 hex digits of sha256 over the canonical JSON of all arguments.

    Canonical JSON = sorted keys, no whitespace, numpy values converted to Python, tuples as lists; so the
    same configuration gives the same key on every machine and Python version. Include in ``hparams`` every
    setting that changes the result (learning rate grid, epochs, resolution, k, ...).
    """
    fields = dict(
        backbone=backbone,
        weights_sha256=weights_sha256,
        task=task,
        dataset=dataset,
        split=split,
        protocol=protocol,
        seed=int(seed),
        hparams=dict(hparams),
    )
    return hashlib.sha256(_canonical_json(fields).encode("ascii")).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Store
# ----------------------------------------------------------------------------------------------------------


class ResultsStore:
    """Directory of JSON run records, ``<workdir>/results/<key>.json``; safe for concurrent writers."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir)
        self.root = self.workdir / "results"

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.workdir)!r})"

    def path(self, key: str) -> Path:
        """File of record ``key``; the key must be a plain file name (letters, digits, ``._-``)."""
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(
                f"invalid result key {key!r}: use run_key(...) or a name of letters, digits, '.', '_' or '-' "
                "(no path separators)."
            )
        return self.root / f"{key}.json"

    def exists(self, key: str) -> bool:
        """Whether a record for ``key`` has been written (e.g. to skip a finished run)."""
        return self.path(key).is_file()

    def write(self, record: Mapping[str, Any], *, overwrite: bool = True) -> Path:
        """Validate ``record`` and write it atomically; returns its path.

        Raises ValueError naming every missing required field, a non-dict ``metrics`` or a key that does not
        match :func:`run_key` of the record's own fields (checked when the record carries all of them);
        FileExistsError when ``overwrite=False`` and the record exists. A ``written_at`` UTC timestamp is
        added when absent.
        """
        if not isinstance(record, Mapping):
            raise TypeError(f"record must be a dict, got {type(record).__name__}.")
        missing = [f for f in REQUIRED_FIELDS if f not in record]
        if missing:
            raise ValueError(
                f"result record lacks required field(s) {missing}; every record needs "
                f"{list(REQUIRED_FIELDS)}."
            )
        if not isinstance(record["metrics"], Mapping):
            raise ValueError(
                f"record['metrics'] must be a dict of metric name -> number, got "
                f"{type(record['metrics']).__name__}."
            )
        if all(f in record for f in _KEY_FIELDS):
            expected = run_key(**{f: record[f] for f in _KEY_FIELDS})
            if expected != record["key"]:
                raise ValueError(
                    f"record key {record['key']!r} does not match run_key(...) of its own fields "
                    f"({expected!r}); compute the key with bob_jax.results.run_key from the same fields."
                )
        path = self.path(record["key"])
        if not overwrite and path.exists():
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace the earlier result.")
        data = dict(record)
        data.setdefault("written_at", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        text = json.dumps(_to_jsonable(data), sort_keys=True, indent=2, allow_nan=False) + "\n"
        return atomic_write_text(path, text)

    def read(self, key: str) -> dict[str, Any]:
        """The record stored under ``key``; FileNotFoundError naming the path when there is none."""
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no result record {path}; has the run with key {key!r} finished?")
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def records(self) -> list[dict[str, Any]]:
        """All readable records, sorted by key. Unreadable or invalid files are skipped with a warning.

        Temp files of in-flight writes (``.<name>.tmp``) are ignored.
        """
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.glob("*.json")):
            if path.name.startswith("."):
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    rec = json.load(f)
                if not isinstance(rec, dict):
                    raise ValueError("top level is not a JSON object")
                missing = [f for f in REQUIRED_FIELDS if f not in rec]
                if missing:
                    raise ValueError(f"missing field(s) {missing}")
            except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
                _log.warning("skipping unreadable result record %s: %s", path, e)
                continue
            out.append(rec)
        out.sort(key=lambda r: str(r["key"]))
        return out


# ----------------------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------------------

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        res = subprocess.run(
            ["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def environment_info() -> dict[str, Any]:
    """Provenance for a result record: package versions, bob_jax git state, device kind, host name.

    ``packages``: installed versions of jax, jaxlib, flax, optax, orbax-checkpoint, grain, numpy (None if not
    installed) and ``python``. ``git_commit`` / ``git_dirty``: ``git rev-parse HEAD`` and whether
    ``git status --porcelain`` lists changes (whole checkout), run from the bob_jax package directory (both
    None when the package is not inside a git checkout, e.g. installed from a wheel).
    ``device_kind``/``platform``/``device_count``/``process_count``: from ``jax.devices()`` (None if jax
    cannot start a backend).
    """
    packages: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    packages["python"] = platform.python_version()

    pkg_dir = Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], pkg_dir)
    # Whole checkout, untracked files included: a new uncommitted module changes behaviour as much as an edit.
    status = _git(["status", "--porcelain"], pkg_dir) if commit else None
    info: dict[str, Any] = {
        "packages": packages,
        "git_commit": commit.strip() if commit else None,
        "git_dirty": bool(status.strip()) if status is not None else None,
        "hostname": socket.gethostname(),
    }
    try:
        import jax

        devices = jax.devices()
        info.update(
            device_kind=devices[0].device_kind,
            platform=devices[0].platform,
            device_count=len(devices),
            process_count=jax.process_count(),
        )
    except Exception as e:  # no usable backend: provenance must not crash a finished run
        _log.warning("environment_info: could not query jax devices: %s", e)
        info.update(device_kind=None, platform=None, device_count=None, process_count=None)
    return info
