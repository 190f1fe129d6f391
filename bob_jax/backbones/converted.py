"""Converted backbones on disk: an Orbax checkpoint of the NNX leaves plus a manifest.

Written by `python -m converters.convert`; `bob_jax.backbones.create(name, weights=DIR)` loads it
with no conversion step. The manifest records the source checkpoint's SHA-256, the package
versions, the architecture keyword arguments and the Flax logits on a fixed input batch, so a load
on another machine can be checked against the conversion.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
PARAMS = "params"


def is_converted_dir(path: str | pathlib.Path) -> bool:
    path = pathlib.Path(path)
    return path.is_dir() and (path / MANIFEST).is_file()


def fixed_input(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    """The fixed NHWC batch whose logits the manifest records."""
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def save(out_dir: str | pathlib.Path, leaves: Mapping[str, Any], manifest: Mapping[str, Any]) -> pathlib.Path:
    import orbax.checkpoint as ocp

    out_dir = pathlib.Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Orbax trees must not have dots in keys it treats as paths; keep the dotted names as flat keys.
    tree = {k.replace(".", "/"): np.asarray(v) for k, v in leaves.items()}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out_dir / PARAMS, tree, force=True)
    (out_dir / MANIFEST).write_text(json.dumps(dict(manifest), indent=2, sort_keys=True, default=str) + "\n")
    return out_dir


def load(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(dotted leaves, manifest) of a converted directory."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).resolve()
    if not is_converted_dir(path):
        raise FileNotFoundError(f"{path} is not a converted backbone directory (no {MANIFEST}); "
                                "write one with: python -m converters.convert --model NAME --out DIR")
    manifest = json.loads((path / MANIFEST).read_text())
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(path / PARAMS)
    return {k.replace("/", "."): np.asarray(v) for k, v in tree.items()}, manifest
