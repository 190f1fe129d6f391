"""Exceptions raised by the torch-free checkpoint readers in `bob_jax.io`.

Every message names the file and the problem, and where there is one, the fix.
"""

from __future__ import annotations

# The remedy for anything the restricted reader will not (or cannot) rebuild; kept in one place so every
# message points to the same two ways out.
CONVERT_HINT = (
    "convert the file with converters/export_torch.py (it writes safetensors), or load it with torch in a "
    "trusted environment and save the state dict with safetensors.torch.save_file"
)


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint: empty, truncated, corrupt, of an unknown or unsupported kind."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle asked for a global outside the allowlist (it could run arbitrary code); nothing was run."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (catchable as CheckpointError and as FileNotFoundError)."""


class WeightsUnavailableError(FileNotFoundError):
    """Pretrained weights are neither in the local cache nor downloadable (offline, or not on the hub)."""
