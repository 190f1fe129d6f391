"""Sweeps: `python -m bob_jax.sweep --sweep=configs/sweeps/bob.py[:arg] --workdir=DIR`.

A sweep file defines `get_sweep(arg) -> list[(name, config)]`: each config is a complete job config
(`configs/*.py` style, `bob_jax.config_lib`). The runs are worked through in order into ONE results
store (`DIR`), so a finished (backbone, task, setting) is skipped on restart, whichever run produced
it, and one report ranks everything at the end. A run that fails (e.g. a dataset that needs a manual
download) is reported and the sweep goes on; the exit status says whether every run succeeded.

    python -m bob_jax.sweep --sweep=configs/sweeps/bob.py --workdir=runs/bob --dry_run   # list the grid
    python -m bob_jax.sweep --sweep=configs/sweeps/bob.py:local=true --workdir=runs/bob_local
    python -m bob_jax.sweep --sweep=configs/sweeps/bob.py --workdir=runs/bob --only=cifar100
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import re
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any


def load_sweep(spec: str) -> list[tuple[str, Any]]:
    """`path/to/sweep.py[:arg]` -> the (name, config) list its `get_sweep(arg)` returns."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"bob_jax_sweep_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise AttributeError(f"sweep file {path} defines no get_sweep(arg)")
    runs = list(module.get_sweep(arg or None))
    names = [name for name, _ in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"sweep {path} has duplicate run names: {duplicates}")
    return runs


def select(runs: list[tuple[str, Any]], only: str | None) -> list[tuple[str, Any]]:
    if not only:
        return runs
    pattern = re.compile(only)
    return [(n, c) for n, c in runs if pattern.search(n)]


def describe(config) -> str:
    return f"{len(config.backbones)} backbone(s) x tasks {'+'.join(config.tasks)} on {config.dataset.name}"


def run_sweep(runs: list[tuple[str, Any]], workdir: str | pathlib.Path, *, console=None) -> dict[str, Any]:
    """Run every config into one store; failures are collected, not fatal. Returns a summary."""
    from bob_jax import battle
    from bob_jax.report import write_report
    from bob_jax.results import ResultsStore

    workdir = pathlib.Path(workdir)
    done, failed = [], []
    for i, (name, config) in enumerate(runs, 1):
        if console is not None:
            console.print(f"[{i}/{len(runs)}] {name}: {describe(config)}", markup=False, highlight=False)
        t0 = time.time()
        try:
            battle.run(config, workdir, console=console, report=False)
        except Exception as e:  # noqa: BLE001 -- one bad run must not stop a 1,500-run sweep
            failed.append({"name": name, "error": f"{type(e).__name__}: {e}",
                           "traceback": traceback.format_exc()})
            if console is not None:
                console.print(f"[{i}/{len(runs)}] {name} FAILED: {type(e).__name__}: {e}", markup=False)
            continue
        done.append({"name": name, "seconds": time.time() - t0})
    records = ResultsStore(workdir).records()
    paths = write_report(records, workdir / "report", console=console) if records else {}
    return {"done": done, "failed": failed, "paths": paths, "num_records": len(records)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bob_jax.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", required=True, help="sweep file[:arg], e.g. configs/sweeps/bob.py:local=true")
    p.add_argument("--workdir", required=True, help="one results store for the whole sweep")
    p.add_argument("--only", default=None, help="run only runs whose name matches this regex")
    p.add_argument("--dry_run", action="store_true", help="list the runs and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rich.console import Console

    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    try:
        runs = select(load_sweep(args.sweep), args.only)
    except (FileNotFoundError, AttributeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for name, config in runs:
            console.print(f"{name}: {describe(config)}", markup=False, highlight=False)
        console.print(f"{len(runs)} run(s)", markup=False)
        return 0
    summary = run_sweep(runs, args.workdir, console=console)
    console.print(f"{len(summary['done'])} run(s) finished, {len(summary['failed'])} failed; "
                  f"{summary['num_records']} record(s) in {args.workdir}", markup=False)
    for f in summary["failed"]:
        console.print(f"  failed: {f['name']}: {f['error']}", markup=False)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
