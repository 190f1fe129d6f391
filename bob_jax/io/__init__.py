"""Torch-free checkpoint reading: safetensors, `torch.save` files (zip and legacy layouts), npz.

`torch.save` files are pickles; they are read with a restricted unpickler (`unpickle.py`) that rebuilds
tensors as numpy arrays and refuses every global off its allowlist, so loading a checkpoint never imports or
runs code. Nothing here imports torch, grain or tensorflow_datasets; `huggingface_hub` only on download.
"""

from bob_jax.io.checkpoint import load_checkpoint_tree, load_state_dict, sha256_file
from bob_jax.io.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
)
from bob_jax.io.hub import download_timm_weights
from bob_jax.io.unpickle import CheckpointNamespace

__all__ = [
    "CheckpointError",
    "CheckpointNamespace",
    "CheckpointNotFoundError",
    "UnsafeCheckpointError",
    "WeightsUnavailableError",
    "download_timm_weights",
    "load_checkpoint_tree",
    "load_state_dict",
    "sha256_file",
]
