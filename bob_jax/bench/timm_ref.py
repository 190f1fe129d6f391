"""PyTorch / timm side of the model benchmark, run in the same process on the same kind of device.

torch and timm are imported inside the functions only, so `bob_jax.bench` works without them.
Setup follows `shared/docs/performance.md` section 1: random init, `torch.inference_mode`, bf16
autocast when the benchmark dtype is bfloat16, channels_last for convnets, `cudnn.benchmark`, TF32
off for float32 (so both sides do true fp32 matmuls), synthetic device-resident input, warm-up,
`torch.cuda.synchronize()` before reading the clock, median of the repetitions. torch.compile in its
default mode; its compile time is the wall time of the first call.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

CONVNET_FAMILIES = ("resnet", "convnext", "efficientnet", "clip_resnet")


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device, dtype: str):
    import torch

    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _set_precision(device, dtype: str) -> None:
    import torch

    torch.backends.cudnn.benchmark = True
    tf32 = dtype != "float32"  # fp32 comparisons use exact fp32 matmuls, like the JAX side
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def build_timm(name: str, size: int, num_classes: int = 1000):
    """timm model for bob_jax backbone `name` (random init), at `size` when the arch takes img_size."""
    import timm

    from bob_jax.bench.models import arch_kwargs_for

    arch = name.partition(".")[0]
    return timm.create_model(arch, pretrained=False, **arch_kwargs_for(name, size, num_classes))


def _time(fn, device, *, warmup: int, repeats: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _peak_memory(device) -> float | None:
    import torch

    return float(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None


def run_timm(name: str, *, family: str, batch: int, size: int, dtype: str, warmup: int, repeats: int,
             iters: int, train: bool, compile_: bool, eager: bool = True, forward_: bool = True,
             num_classes: int = 1000
             ) -> dict[str, Any]:
    """timm eager and/or torch.compile throughput (forward, and the train step with `train`); keys
    prefixed `timm_`. The main program runs eager and compile as separate calls so that a run cut off
    during a long torch.compile still has the eager numbers saved."""
    import torch

    device = _device()
    _set_precision(device, dtype)
    memory_format = torch.channels_last if family in CONVNET_FAMILIES else torch.contiguous_format
    model = build_timm(name, size, num_classes).to(device).to(memory_format=memory_format).eval()
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=memory_format)
    row: dict[str, Any] = {"torch_version": torch.__version__, "torch_device": (
        torch.cuda.get_device_name() if device.type == "cuda" else "cpu")}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def forward(m):
        def fn():
            with torch.inference_mode(), _autocast(device, dtype):
                return m(x)
        return fn

    if eager and forward_:
        times = _time(forward(model), device, warmup=warmup, repeats=repeats, iters=iters)
        row["timm_eager_img_s"] = batch * iters / statistics.median(times)
    if compile_ and forward_:
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        forward(compiled)()
        _sync(device)
        row["timm_compile_s"] = time.perf_counter() - t0
        times = _time(forward(compiled), device, warmup=warmup, repeats=repeats, iters=iters)
        row["timm_compile_img_s"] = batch * iters / statistics.median(times)
    if train:
        row.update(_train(model, x, device, dtype=dtype, warmup=warmup, repeats=repeats, iters=iters,
                          eager=eager, compile_=compile_, num_classes=num_classes))
    if device.type == "cuda":
        row["timm_compile_memory_bytes" if compile_ else "timm_memory_bytes"] = _peak_memory(device)
    return row


def _train(model, x, device, *, dtype, warmup, repeats, iters, eager, compile_, num_classes) -> dict[str, Any]:
    """forward + cross-entropy backward + AdamW (fused on CUDA), as the JAX train step."""
    import torch

    model.train()
    y = torch.arange(x.shape[0], device=device) % num_classes
    out = {}
    variants = ([("eager", model)] if eager else []) + ([("compile", torch.compile(model))] if compile_ else [])
    for label, m in variants:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                                fused=device.type == "cuda")

        def step(m=m, opt=opt):
            with _autocast(device, dtype):
                loss = torch.nn.functional.cross_entropy(m(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if label == "compile":
            t0 = time.perf_counter()
            step()
            _sync(device)
            out["timm_train_compile_s"] = time.perf_counter() - t0
        times = _time(step, device, warmup=warmup, repeats=repeats, iters=iters)
        out[f"timm_train_{label}_img_s"] = x.shape[0] * iters / statistics.median(times)
    model.eval()
    return out
