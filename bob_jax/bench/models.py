"""JAX side of the model benchmark: forward and training-step throughput of bob_jax backbones.

Measurement rules (`shared/docs/performance.md` section 7): random init (weights do not change
speed), device-resident synthetic input, compile time measured separately as lower + compile of the
jitted pure function (params split once with `nnx.split`, merged inside), `warmup` untimed calls,
then `repeats` timed repetitions of `iters` calls each, `jax.block_until_ready` before reading the
clock, median repetition reported.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bob_jax.bench.flops import model_gflops, xla_flops
from bob_jax.models.layers import uses_drop_path

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Dense peak of the device's tensor cores per compute dtype (TFLOP/s); MFU is left empty elsewhere.
PEAK_TFLOPS = {("H100", "bfloat16"): 989.4, ("H200", "bfloat16"): 989.4}
# Large bf16 matmul measured on an H100 (performance.md section 2): the "achievable" denominator.
ACHIEVABLE_TFLOPS = {("H100", "bfloat16"): 795.0}


@dataclasses.dataclass
class Timing:
    img_per_s: float
    compile_s: float
    xla_gflops_per_img: float | None
    times_s: list[float]


def arch_kwargs_for(name: str, size: int, num_classes: int) -> dict[str, Any]:
    """create() kwargs: token/window models are built at the benchmark size (timm's img_size)."""
    from bob_jax.backbones import zoo

    arch = name.partition(".")[0]
    if arch not in zoo.ARCH_TO_FAMILY:
        raise ValueError(f"unknown architecture {arch!r} in {name!r}; see bob_jax.backbones.list_backbones()")
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if "img_size" in zoo.ARCH_TO_FAMILY[arch].arch_kwargs:
        kwargs["img_size"] = size
    return kwargs


def family_name(name: str) -> str:
    from bob_jax.backbones import zoo

    return zoo.ARCH_TO_FAMILY[name.partition(".")[0]].name


def device_peak_tflops(dtype: str, table=PEAK_TFLOPS) -> float | None:
    kind = jax.devices()[0].device_kind
    for (chip, dt), peak in table.items():
        if chip in kind and dt == dtype:
            return peak
    return None


def peak_memory() -> tuple[float, str]:
    """(bytes, what): the device allocator's peak when it reports one, else this process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "device peak"
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


def _time(fn, args, *, batch: int, warmup: int, repeats: int, iters: int, carry: bool = False) -> list[float]:
    """Median-able wall times of `repeats` x `iters` calls; with `carry` the outputs feed the next call
    (training: donated params / optimizer state)."""
    for _ in range(warmup):
        out = fn(*args)
        if carry:
            args = out[:-1] + args[len(out) - 1:]
        jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
            if carry:
                args = out[:-1] + args[len(out) - 1:]
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return times


def build(name: str, size: int, dtype: str, num_classes: int = 1000) -> nnx.Module:
    from bob_jax import backbones

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return backbones.create(name, dtype=DTYPES[dtype], **arch_kwargs_for(name, size, num_classes))


def _input(batch: int, size: int, dtype: str):
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32).astype(DTYPES[dtype])
    return jax.device_put(x)


def forward_benchmark(model: nnx.Module, *, batch: int, size: int, dtype: str, warmup: int, repeats: int,
                      iters: int) -> Timing:
    graphdef, state = nnx.split(model)

    def fwd(state, x):
        out = nnx.merge(graphdef, state)(x)
        return out["logits"] if "logits" in out else out["pooled"]

    x = _input(batch, size, dtype)
    t0 = time.perf_counter()
    compiled = jax.jit(fwd).lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    flops = xla_flops(compiled)
    times = _time(compiled, (state, x), batch=batch, warmup=warmup, repeats=repeats, iters=iters)
    return Timing(batch * iters / statistics.median(times), compile_s,
                  None if flops is None else flops / batch / 1e9, times)


def train_benchmark(model: nnx.Module, *, batch: int, size: int, dtype: str, warmup: int, repeats: int,
                    iters: int, num_classes: int = 1000) -> Timing:
    """forward + cross-entropy backward + optax.adamw update, one jitted pure step with donation."""
    model.train()  # BatchNorm uses (and updates) batch statistics, like timm's model.train()
    try:
        return _train_benchmark(model, batch=batch, size=size, dtype=dtype, warmup=warmup, repeats=repeats,
                                iters=iters, num_classes=num_classes)
    finally:
        model.eval()


def _train_benchmark(model, *, batch, size, dtype, warmup, repeats, iters, num_classes) -> Timing:
    import optax

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # The step donates its inputs; copies keep the caller's model intact.
    params, rest = jax.tree.map(jnp.copy, (params, rest))
    tx = optax.adamw(1e-4, weight_decay=0.05)
    opt_state = tx.init(params)

    def loss_fn(params, rest, x, y):
        # Fresh Variable objects at this (grad) trace level: BatchNorm may then update its statistics.
        rest = jax.tree.map(lambda a: a, rest)
        m = nnx.merge(graphdef, params, rest)
        # Stochastic depth in train mode as timm's (Swin's default drop_path_rate is 0.1): one fixed key.
        kwargs = {"rngs": nnx.Rngs(dropout=0)} if uses_drop_path(m) else {}
        logits = m(x, **kwargs)["logits"].astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, nnx.state(m, nnx.Not(nnx.Param))

    def step(params, opt_state, rest, x, y):
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, rest, loss

    x = _input(batch, size, dtype)
    y = jax.device_put(jnp.asarray(np.arange(batch) % num_classes, jnp.int32))
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(params, opt_state, rest, x, y).compile()
    compile_s = time.perf_counter() - t0
    flops = xla_flops(compiled)
    times = _time(compiled, (params, opt_state, rest, x, y), batch=batch, warmup=warmup, repeats=repeats,
                  iters=iters, carry=True)
    return Timing(batch * iters / statistics.median(times), compile_s,
                  None if flops is None else flops / batch / 1e9, times)


def run_model(name: str, *, batch: int, size: int, dtype: str, warmup: int, repeats: int, iters: int,
              train: bool, forward: bool = True, num_classes: int = 1000) -> dict[str, Any]:
    """One result row for `name` (JAX side only); the timm columns are filled by `timm_ref`."""
    t0 = time.perf_counter()
    model = build(name, size, dtype, num_classes)
    build_s = time.perf_counter() - t0
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    row: dict[str, Any] = {
        "model": name, "batch": batch, "size": size, "dtype": dtype, "params_m": n_params / 1e6,
        "build_s": build_s, "device": jax.devices()[0].device_kind,
        "gflops_per_img": model_gflops(name, size, arch_kwargs_for(name, size, num_classes)),
    }
    if forward:
        fwd = forward_benchmark(model, batch=batch, size=size, dtype=dtype, warmup=warmup, repeats=repeats,
                                iters=iters)
        row.update(jax_img_s=fwd.img_per_s, compile_s=fwd.compile_s, xla_gflops_per_img=fwd.xla_gflops_per_img,
                   jax_times_s=fwd.times_s)
    if train:
        tr = train_benchmark(model, batch=batch, size=size, dtype=dtype, warmup=warmup, repeats=repeats,
                             iters=iters, num_classes=num_classes)
        row.update(jax_train_img_s=tr.img_per_s, train_compile_s=tr.compile_s,
                   xla_train_gflops_per_img=tr.xla_gflops_per_img, jax_train_times_s=tr.times_s)
    peak = device_peak_tflops(dtype)
    row["peak_tflops"] = peak
    if peak and row["gflops_per_img"]:
        if forward:
            row["mfu"] = row["jax_img_s"] * row["gflops_per_img"] / (peak * 1e3)
        if train:
            row["train_mfu"] = row["jax_train_img_s"] * 3 * row["gflops_per_img"] / (peak * 1e3)
    achievable = device_peak_tflops(dtype, ACHIEVABLE_TFLOPS)
    if achievable and forward and row["gflops_per_img"]:
        row["mfu_achievable"] = row["jax_img_s"] * row["gflops_per_img"] / (achievable * 1e3)
    row["memory_bytes"], row["memory_kind"] = peak_memory()
    return row
