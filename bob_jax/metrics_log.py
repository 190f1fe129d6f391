"""Append-only training metrics: JSON lines (always) and TensorBoard scalars (when available).

`MetricsWriter(workdir)` appends `{"step": ..., "time": ..., **metrics}` lines to
`<workdir>/metrics.jsonl`, flushing after every write so a killed run keeps everything it logged. Only
process 0 writes (multi-host runs would otherwise duplicate lines). TensorBoard event files are
written too when `tensorboardX` or `torch.utils.tensorboard` imports; neither is a dependency, and
their absence is silent.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def _to_json_value(value: Any) -> Any:
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        value = np.asarray(value)
        value = value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable instead of invalid JSON
    return value


def _make_tensorboard_writer(logdir: str):
    try:
        from tensorboardX import SummaryWriter  # type: ignore[import-not-found]
    except Exception:
        # torch's writer needs the `tensorboard` package; check for it first so a torch install without
        # it does not cost a multi-second `import torch` just to fail.
        if importlib.util.find_spec("tensorboard") is None:
            return None
        try:
            # Imported by name only here, never at module level: the runtime package must not need torch.
            SummaryWriter = importlib.import_module("torch.utils.tensorboard").SummaryWriter
        except Exception:
            return None
    try:
        return SummaryWriter(logdir)
    except Exception:
        return None


class MetricsWriter:
    """Write scalar metrics to `<workdir>/metrics.jsonl` (+ TensorBoard) from process 0."""

    def __init__(
        self, workdir: str | os.PathLike, *, filename: str = "metrics.jsonl", tensorboard: bool = True
    ):
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, filename)
        self._active = jax.process_index() == 0
        self._file = None
        self._tb = None
        if self._active:
            os.makedirs(self.workdir, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            if tensorboard:
                self._tb = _make_tensorboard_writer(os.path.join(self.workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one record; array values are converted to Python numbers/lists."""
        if not self._active or self._file is None:
            return
        record = {"step": int(step), "time": time.time()}
        record.update({k: _to_json_value(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key in ("step", "time") or isinstance(value, bool):
                    continue
                if isinstance(value, int | float):
                    self._tb.add_scalar(key, value, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read back every record of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
