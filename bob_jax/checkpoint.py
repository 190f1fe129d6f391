"""Crash-safe training checkpoints: model/optimiser pytree + data-iterator state + metadata (Orbax).

One checkpoint step is a directory `<dir>/<step>/` holding three Orbax items:
  state : the jax pytree (head + optimiser state + counters), saved with `StandardSave` so it is
          restored shard by shard onto the shardings of the abstract target;
  data  : the data-iterator state as JSON (a grain `DatasetIterator.get_state()` dict; raw bytes are
          stored base64-encoded), so training resumes on exactly the next batch;
  meta  : JSON metadata (config, library versions, user fields).

Atomicity: Orbax writes each step into a temporary directory and renames it only after every item is
complete (plus a commit marker on file systems without atomic rename), and `latest_step()` only lists
finalised steps. A SIGKILL during a save therefore leaves at most an unfinished temporary directory,
which is ignored and cleaned up on the next start. Saves run asynchronously by default; call `wait()`
(or `close()`) before reading a checkpoint back or before the process exits normally.
"""

from __future__ import annotations

import base64
import importlib.metadata
import os
from collections.abc import Mapping
from typing import Any

import jax

_BYTES_KEY = "__bob_jax_bytes_b64__"
_NONE_KEY = "__bob_jax_none__"


def _library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("bob_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _encode_data_state(data_state: Mapping[str, Any] | bytes | None) -> dict:
    if data_state is None:
        return {_NONE_KEY: True}
    if isinstance(data_state, bytes | bytearray):
        return {_BYTES_KEY: base64.b64encode(bytes(data_state)).decode("ascii")}
    if isinstance(data_state, Mapping):
        return dict(data_state)
    raise TypeError(
        f"Checkpointer.save: data_state must be a dict, bytes or None (a grain iterator's get_state()), "
        f"got {type(data_state).__name__}."
    )


def _decode_data_state(stored: Mapping[str, Any] | None) -> dict | bytes | None:
    if stored is None or stored.get(_NONE_KEY):
        return None
    if _BYTES_KEY in stored:
        return base64.b64decode(stored[_BYTES_KEY])
    return dict(stored)


def abstract_like(state: Any) -> Any:
    """`jax.ShapeDtypeStruct`s (with the arrays' shardings) describing `state`, a restore target."""

    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, state)


class Checkpointer:
    """Thin wrapper around `orbax.checkpoint.CheckpointManager` for training state + data state.

    Args:
      directory: where step directories are written (created if missing).
      max_to_keep: number of most recent checkpoints kept.
      save_interval_steps: `save()` only writes when `step % save_interval_steps == 0` (unless
        `force=True`).
      async_save: write in a background thread (the step loop continues); `wait()` blocks until done.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 2,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        import orbax.checkpoint as ocp

        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"Checkpointer: max_to_keep must be >= 1 or None, got {max_to_keep}.")
        if save_interval_steps < 1:
            raise ValueError(f"Checkpointer: save_interval_steps must be >= 1, got {save_interval_steps}.")
        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            # Remove temporary directories of saves interrupted by a crash.
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def save(
        self,
        step: int,
        state: Any,
        data_state: Mapping[str, Any] | bytes | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Save `state` (jax pytree), `data_state` and `metadata` as checkpoint `step`.

        Returns True when a save was started (False when skipped by `save_interval_steps`). With
        asynchronous saves the checkpoint becomes visible to `latest_step()` once it is finalised.
        """
        ocp = self._ocp
        meta = {"step": int(step), "versions": _library_versions(), **dict(metadata or {})}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_encode_data_state(data_state)),
            meta=ocp.args.JsonSave(meta),
        )
        return bool(self._manager.save(int(step), args=args, force=force))

    def latest_step(self) -> int | None:
        """Most recent finalised checkpoint step, or None when there is none."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def restore(self, step: int | None = None, abstract_state: Any = None) -> tuple[Any, dict | bytes | None]:
        """Restore `(state, data_state)` of `step` (default: the latest).

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `sharding` set (see
        `abstract_like`, or `jax.eval_shape` plus shardings); arrays are restored directly onto those
        shardings with that tree structure. Without it, the raw stored tree is returned.
        """
        ocp = self._ocp
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"Checkpointer.restore: no finalised checkpoint in {self.directory}.")
        elif step not in self.all_steps():
            raise FileNotFoundError(
                f"Checkpointer.restore: step {step} not found in {self.directory}; "
                f"available: {self.all_steps()}."
            )
        state_arg = (
            ocp.args.StandardRestore(abstract_state)
            if abstract_state is not None
            else (ocp.args.StandardRestore())
        )
        restored = self._manager.restore(
            int(step), args=ocp.args.Composite(state=state_arg, data=ocp.args.JsonRestore())
        )
        return restored["state"], _decode_data_state(restored["data"])

    def data_state(self, step: int | None = None) -> dict | bytes | None:
        """Only the data-iterator state saved with `step` (default: the latest); no arrays are read."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"Checkpointer.data_state: no finalised checkpoint in {self.directory}.")
        restored = self._manager.restore(int(step), args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        return _decode_data_state(restored["data"])

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata saved with `step` (default: the latest)."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"Checkpointer.metadata: no finalised checkpoint in {self.directory}.")
        restored = self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        """Block until pending asynchronous saves are finalised."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release Orbax resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
