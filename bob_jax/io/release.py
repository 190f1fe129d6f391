"""Original release files (checkpoints timm does not host): download once, cache, verify SHA-256.

The cache is `$BOB_JAX_WEIGHTS_CACHE` or `~/.cache/bob_jax/weights`. Offline (`BOB_JAX_OFFLINE=1`
or `HF_HUB_OFFLINE=1`) or on a failed download with no cached file, the error names the URL, the
cache path and how to provide the file. Downloads go to a temporary file and are renamed into place
only after the hash check, so an interrupted download never leaves a corrupt cached file.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tempfile
import urllib.request

from bob_jax.io.errors import CheckpointError, WeightsUnavailableError


def cache_dir() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "bob_jax" / "weights"
    return pathlib.Path(os.environ.get("BOB_JAX_WEIGHTS_CACHE", default))


def _offline() -> bool:
    flags = (os.environ.get(v, "").strip().lower() for v in ("BOB_JAX_OFFLINE", "HF_HUB_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path: pathlib.Path, sha256: str, url: str) -> pathlib.Path:
    if sha256 and _sha256(path) != sha256:
        raise CheckpointError(
            f"{path}: SHA-256 does not match the recorded {sha256} for {url} (corrupt or replaced file); "
            "delete it to download again"
        )
    return path


def download_release_file(url: str, filename: str, *, sha256: str = "", what: str = "") -> pathlib.Path:
    """Local path of `url`, downloading it into the cache on first use."""
    target = cache_dir() / filename
    if target.is_file():
        return _check(target, sha256, url)
    fix = (f"Fix: download {url} on a connected machine and pass weights=/path/to/{filename}, "
           f"or place it at {target}")
    label = f"{what}: " if what else ""
    if _offline():
        raise WeightsUnavailableError(f"{label}{filename} is not cached at {target} and downloads are off "
                                      f"(BOB_JAX_OFFLINE/HF_HUB_OFFLINE). {fix}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{filename}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        _check(pathlib.Path(tmp), sha256, url)
        os.replace(tmp, target)
    except OSError as e:
        raise WeightsUnavailableError(f"{label}could not download {url} ({e}). {fix}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
