"""Benchmark reports: a rich table on the console, `bench.json` and `bench.md` in the work directory.

The files are rewritten (atomically) after every model, so a run cut off by a time limit still leaves
every finished row. JSON holds the raw rows (incl. per-repeat times), the environment (versions,
device, XLA flags) and the arguments; Markdown holds the table plus data/convert sections.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
from typing import Any

# (key, header, format) of the main table; a missing value prints as "-".
COLUMNS = [
    ("model", "model", "{}"),
    ("batch", "batch", "{}"),
    ("size", "size", "{}"),
    ("dtype", "dtype", "{}"),
    ("jax_img_s", "jax img/s", "{:,.1f}"),
    ("compile_s", "compile s", "{:.2f}"),
    ("timm_eager_img_s", "timm eager img/s", "{:,.1f}"),
    ("timm_compile_img_s", "timm compile img/s", "{:,.1f}"),
    ("ratio_vs_best_torch", "JAX / best torch", "{:.2f}"),
    ("gflops_per_img", "GFLOPs/img", "{:.2f}"),
    ("xla_gflops_per_img", "XLA GFLOPs/img", "{:.2f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("mfu_achievable", "MFU @795", "{:.1%}"),
    ("memory_gb", "memory GB", "{:.2f}"),
    ("timm_memory_gb", "timm memory GB", "{:.2f}"),
]
TRAIN_COLUMNS = [
    ("model", "model", "{}"),
    ("jax_train_img_s", "jax train img/s", "{:,.1f}"),
    ("train_compile_s", "train compile s", "{:.2f}"),
    ("timm_train_eager_img_s", "timm train eager img/s", "{:,.1f}"),
    ("timm_train_compile_img_s", "timm train compile img/s", "{:,.1f}"),
    ("train_ratio_vs_best_torch", "JAX / best torch", "{:.2f}"),
    ("xla_train_gflops_per_img", "XLA train GFLOPs/img", "{:.2f}"),
    ("train_mfu", "train MFU", "{:.1%}"),
]


def add_ratios(row: dict[str, Any]) -> dict[str, Any]:
    """JAX throughput over the better of timm eager / torch.compile (the fair denominator)."""
    for prefix, jax_key, keys in (
        ("", "jax_img_s", ("timm_eager_img_s", "timm_compile_img_s")),
        ("train_", "jax_train_img_s", ("timm_train_eager_img_s", "timm_train_compile_img_s")),
    ):
        best = max((row[k] for k in keys if row.get(k)), default=None)
        if best and row.get(jax_key):
            row[f"{prefix}ratio_vs_best_torch"] = row[jax_key] / best
    for src, dst in (("memory_bytes", "memory_gb"), ("timm_memory_bytes", "timm_memory_gb")):
        if row.get(src):
            row[dst] = row[src] / 1e9
    return row


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    import jax

    versions = {}
    for dist in ("jax", "jaxlib", "flax", "optax", "jax-cuda12-plugin", "jax-cuda13-plugin", "jax-cuda12-pjrt",
                 "jax-cuda13-pjrt", "torch", "timm",
                 "grain", "numpy", "pillow"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    dev = jax.devices()[0]
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "versions": versions,
        "device_kind": dev.device_kind, "platform_name": dev.platform, "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
    }


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _columns(rows, columns):
    # Drop all-empty optional columns (e.g. the timm ones without --compare-timm), keep the identity ones.
    return [c for c in columns if c[0] in ("model", "batch", "size", "dtype") or any(r.get(c[0]) is not None
                                                                                    for r in rows)]


def markdown_table(rows: list[dict[str, Any]], columns=COLUMNS) -> str:
    cols = _columns(rows, columns)
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "|".join("---" if k == "model" else "---:" for k, _, _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), f) for k, _, f in cols) + " |")
    return "\n".join(lines)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def to_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    parts = ["# bob_jax benchmark", "",
             f"device: {env['device_kind']} ({env['platform_name']}); versions: "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
             f"command: `{report['command']}`", ""]
    rows = report["models"]
    if rows:
        if any(r.get("jax_img_s") or r.get("timm_eager_img_s") or r.get("timm_compile_img_s") for r in rows):
            parts += ["## forward", "", markdown_table(rows), ""]
        if any(r.get("jax_train_img_s") or r.get("timm_train_eager_img_s") for r in rows):
            parts += ["## training step", "", markdown_table(rows, TRAIN_COLUMNS), ""]
        parts += ["GFLOPs/img: analytic 2 x MACs of convs/linears/attention matmuls (timm/fvcore convention); "
                  "XLA GFLOPs/img: the compiled program's cost analysis (adds elementwise work, leaves out "
                  "multiplications with conv zero padding). MFU: analytic FLOPs x img/s / dense bf16 "
                  "peak (H100 989.4 TFLOP/s; MFU @795: the measured large-matmul ceiling); train MFU uses "
                  "3 x forward FLOPs. "
                  "Memory: " + ", ".join(sorted({r.get('memory_kind', '?') for r in rows})) + ".", ""]
    if report.get("data"):
        d = report["data"]
        parts += ["## data pipeline", "",
                  f"{d['num_images']} JPEGs, {d['size']} px train transform of {d['model']}, batch {d['batch']}, "
                  f"{d['cpu_count']} CPUs", "",
                  "| stage | img/s |", "|---|---:|",
                  f"| decode, 1 core | {d['decode_img_s']:,.1f} |",
                  f"| TrainTransform, 1 core | {d['augment_img_s']:,.1f} |",
                  f"| decode + transform, 1 core | {d['decode_augment_img_s_per_core']:,.1f} |"]
        parts += [f"| loader, {r['workers']} workers (first batch {r['first_batch_s']:.2f} s) | {r['img_s']:,.1f} |"
                  for r in d["loader"]]
        parts.append("")
    if report.get("convert"):
        c = report["convert"]
        parts += ["## conversion", "",
                  f"{c['model']}: {c['params_m']:.1f} M params, {c['file_mb']:.0f} MB safetensors; "
                  f"save {c['save_s']:.2f} s, create(weights=path) median {c['create_s']:.2f} s "
                  f"({c['mb_per_s']:,.0f} MB/s)", ""]
    return "\n".join(parts)


def write(workdir: str | os.PathLike, report: dict[str, Any]) -> tuple[pathlib.Path, pathlib.Path]:
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    j, m = workdir / "bench.json", workdir / "bench.md"
    _write_atomic(j, json.dumps(report, indent=2, default=float))
    _write_atomic(m, to_markdown(report))
    return j, m


def print_table(rows: list[dict[str, Any]], columns=COLUMNS, title: str = "bob_jax benchmark") -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: plain Markdown then
        print(markdown_table(rows, columns))
        return
    cols = _columns(rows, columns)
    table = Table(title=title)
    for k, h, _ in cols:
        table.add_column(h, justify="left" if k == "model" else "right")
    for r in rows:
        table.add_row(*(_fmt(r.get(k), f) for k, _, f in cols))
    Console(width=220).print(table)
