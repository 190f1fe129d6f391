"""Conversion-time benchmark: how long `bob_jax.backbones.create(name, weights=path)` takes for a
~100M-parameter timm checkpoint (read safetensors, rename, reshape/transpose, fill the NNX model).

The checkpoint is a random-init timm state dict (timm/torch imported here only), written once as
safetensors into a temporary directory; its write time is reported too.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import tempfile
import time
from typing import Any


def timm_state_dict(name: str, size: int | None = None) -> dict:
    """numpy state dict of a random-init timm model for bob_jax backbone `name`."""
    import timm

    from bob_jax.backbones import zoo

    arch = name.partition(".")[0]
    kwargs = zoo.ZOO[name].default_kwargs() if name in zoo.ZOO else {}
    if size is not None and "img_size" in zoo.ARCH_TO_FAMILY[arch].arch_kwargs:
        kwargs["img_size"] = size
    model = timm.create_model(arch, pretrained=False, **kwargs)
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def run_convert(name: str, *, repeats: int, workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    import jax
    from flax import nnx
    from safetensors.numpy import save_file

    from bob_jax import backbones

    state_dict = timm_state_dict(name)
    n_params = sum(v.size for v in state_dict.values())
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = pathlib.Path(tmp) / "model.safetensors"
        t0 = time.perf_counter()
        save_file(state_dict, str(path))
        save_s = time.perf_counter() - t0
        file_mb = path.stat().st_size / 1e6
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            model = backbones.create(name, weights=str(path))
            jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
            times.append(time.perf_counter() - t0)
    create_s = statistics.median(times)
    return {"model": name, "params_m": n_params / 1e6, "file_mb": file_mb, "save_s": save_s,
            "create_s": create_s, "create_times_s": times, "mb_per_s": file_mb / create_s}
