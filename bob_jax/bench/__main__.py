"""`python -m bob_jax.bench`: throughput, compile time, FLOPs, MFU and memory of bob_jax backbones,
optionally against timm (eager and torch.compile) in the same process, plus data-pipeline and
conversion benchmarks. Reports go to --workdir (bench.json, bench.md) and the console.

    python -m bob_jax.bench --models resnet50.a1_in1k,vit_small_patch16_224.augreg_in1k \
        --batch 8 --size 224 --dtype float32 --compare-timm --workdir /tmp/bench
    python -m bob_jax.bench --models vit_base_patch16_224.augreg_in1k --batch 256 --dtype bfloat16 \
        --compare-timm --train --append --workdir $OUT      # GPU: torch.compile on by default

Only argparse is used (no absl/ml_collections), and jax is imported after the arguments are parsed so
that XLA_PYTHON_CLIENT_PREALLOCATE=false is in place when torch shares the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import sys
import time
import traceback


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bob_jax.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="",
                   help="comma-separated bob_jax backbone names (arch.tag); name@SIZE overrides --size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
    p.add_argument("--iters", type=int, default=None,
                   help="calls per timed repetition (default: 10 on accelerators, 1 on CPU)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--train", action="store_true", help="also time a training step (fwd + CE bwd + AdamW)")
    p.add_argument("--forward", action=argparse.BooleanOptionalAction, default=True,
                   help="time the forward pass (--no-forward with --train: training step only)")
    p.add_argument("--compare-timm", action="store_true", help="time timm in the same process and device")
    p.add_argument("--jax", action=argparse.BooleanOptionalAction, default=True,
                   help="time the JAX model (--no-jax --compare-timm --append: add timm numbers to earlier rows)")
    p.add_argument("--timm-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="time timm eager (--no-timm-eager --torch-compile: a compile-only second pass)")
    p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile (default: on with CUDA, off on CPU)")
    p.add_argument("--data", action="store_true", help="data-pipeline benchmark")
    p.add_argument("--data-model", default="resnet50.a1_in1k", help="backbone whose preprocessing is used")
    p.add_argument("--data-images", type=int, default=64)
    p.add_argument("--data-batch", type=int, default=16)
    p.add_argument("--data-max-side", type=int, default=500, help="longest JPEG side (ImageNet-like: 500)")
    p.add_argument("--data-batches", type=int, default=16, help="timed loader batches per worker count")
    p.add_argument("--data-workers", default="1,2", help="comma-separated grain worker counts")
    p.add_argument("--convert", action="store_true", help="conversion-time benchmark (needs torch+timm)")
    p.add_argument("--convert-model", default="vit_base_patch16_224.augreg_in1k")
    p.add_argument("--workdir", default="bench_out")
    p.add_argument("--append", action="store_true", help="add to the rows of an existing bench.json")
    args = p.parse_args(argv)
    for k in ("batch", "size", "repeats"):
        if getattr(args, k) <= 0:
            p.error(f"--{k} must be positive, got {getattr(args, k)}")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if not args.jax and not args.compare_timm:
        p.error("--no-jax needs --compare-timm (nothing would be timed)")
    if not args.forward and not args.train:
        p.error("--no-forward needs --train (nothing would be timed)")
    if not (args.models or args.data or args.convert):
        p.error("nothing to do: give --models and/or --data / --convert")
    for spec in args.models.split(","):
        size = spec.partition("@")[2].strip()
        if size and not (size.isdigit() and int(size) > 0):
            p.error(f"--models entry {spec!r}: the size after '@' must be a positive integer")
    try:
        args.data_workers = [int(w) for w in args.data_workers.split(",") if w.strip()]
    except ValueError:
        p.error(f"--data-workers takes comma-separated integers, got {args.data_workers!r}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compare_timm:
        # torch needs GPU memory too; JAX would otherwise reserve 75 % at start-up.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    from bob_jax.bench import report as rep

    on_accel = jax.default_backend() != "cpu"
    iters = args.iters or (10 if on_accel else 1)
    workdir = pathlib.Path(args.workdir)
    previous = {}
    if args.append and (workdir / "bench.json").is_file():
        previous = json.loads((workdir / "bench.json").read_text())
    result = {
        "command": "python -m bob_jax.bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "args": {k: v for k, v in vars(args).items()},
        "environment": rep.environment(),
        "models": previous.get("models", []),
        "data": previous.get("data"),
        "convert": previous.get("convert"),
    }
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    failures = 0
    for spec in models:
        name, _, size = spec.partition("@")
        row = {"model": name, "batch": args.batch, "size": int(size) if size else args.size, "dtype": args.dtype,
               "train": args.train}
        row = _merge_row(result["models"], row)

        def save(row=row):
            rep.add_ratios(row)
            rep.write(workdir, result)  # after every stage: a cut-off run keeps what finished

        _bench_model(row, args, iters, save)
        failures += "error" in row
        save()
    if any(r.get("jax_img_s") or r.get("timm_compile_img_s") for r in result["models"]):
        rep.print_table(result["models"])
    if any(r.get("jax_train_img_s") or r.get("timm_train_compile_img_s") for r in result["models"]):
        rep.print_table(result["models"], rep.TRAIN_COLUMNS, title="training step")
    if args.data:
        from bob_jax.bench.data import run_data

        result["data"] = run_data(model=args.data_model, size=args.size, num_images=args.data_images,
                                  batch=args.data_batch, workers=args.data_workers,
                                  num_batches=args.data_batches, max_side=args.data_max_side)
        rep.write(workdir, result)
    if args.convert:
        from bob_jax.bench.convert import run_convert

        result["convert"] = run_convert(args.convert_model, repeats=min(args.repeats, 3))
        rep.write(workdir, result)
    json_path, md_path = rep.write(workdir, result)
    print(f"wrote {json_path} and {md_path}")
    if failures:
        raise SystemExit(f"{failures} model(s) failed; see 'error' in {json_path}")
    return result


def _merge_row(rows: list[dict], row: dict) -> dict:
    """The row of an earlier (--append) run with the same model/batch/size/dtype/train, or a new one:
    a second pass (e.g. torch.compile only) then completes the first pass's row."""
    key = ("model", "batch", "size", "dtype", "train")
    for old in rows:
        if all(old.get(k) == row[k] for k in key):
            old.pop("error", None)
            return old
    rows.append(row)
    return row


def _bench_model(row: dict, args, iters: int, save) -> None:
    """Fill `row` stage by stage (JAX, timm eager, torch.compile), calling `save()` after each."""
    from bob_jax.bench import models

    common = dict(batch=args.batch, size=row["size"], dtype=args.dtype, warmup=args.warmup,
                  repeats=args.repeats, iters=iters)
    t0 = time.perf_counter()
    if args.jax:
        try:
            row.update(models.run_model(row["model"], train=args.train, forward=args.forward,
                                        num_classes=args.num_classes, **common))
        except Exception as e:  # one broken model must not lose the others' rows
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"
            return
        save()
    if args.compare_timm:
        from bob_jax.bench import timm_ref

        compile_ = args.torch_compile
        if compile_ is None:
            import torch

            compile_ = torch.cuda.is_available()
        stages = ([False] if args.timm_eager else []) + ([True] if compile_ else [])
        for with_compile in stages:
            try:
                row.update(timm_ref.run_timm(row["model"], family=models.family_name(row["model"]),
                                             train=args.train, compile_=with_compile,
                                             eager=not with_compile, forward_=args.forward,
                                             num_classes=args.num_classes, **common))
            except Exception as e:
                traceback.print_exc()
                row["timm_error"] = f"{type(e).__name__}: {e}"
                break
            save()
    row["wall_s"] = time.perf_counter() - t0


if __name__ == "__main__":
    main()
