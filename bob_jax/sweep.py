"""Sweeps: `python -m bob_jax.sweep --sweep=configs/sweeps/bob.py[:arg] --workdir=DIR`.

A sweep file defines `get_sweep(arg) -> list[(name, config)]`: each config is a complete job config
(`configs/*.py` style, `bob_jax.config_lib`). The runs are worked through in order into ONE results
store (`DIR`), so a finished (backbone, task, setting) is skipped on restart, whichever run produced
it, an interrupted fine-tuning resumes from its checkpoints (`DIR/runs/<key>/checkpoints`), and one
report ranks everything at the end. A run that fails (e.g. a dataset that needs a manual download) is
reported and the sweep goes on.

    python -m bob_jax.sweep --sweep=configs/sweeps/bob.py --workdir=runs/bob --dry_run   # list the grid
    python -m bob_jax.sweep --sweep=configs/sweeps/bob.py:local=true --workdir=runs/bob_local
    python -m bob_jax.sweep --sweep=configs/sweeps/bob.py --workdir=runs/bob --only=cifar100

Many machines: `--shard=i/n` runs only the runs j with j % n == i (j counts the runs left after
`--only`, in sweep order), so n invocations with i = 0..n-1 cover the grid without overlap or gaps;
all of them may write into the same store at once (one atomically written file per record).
`--emit_slurm=PATH --shards=n` writes a SLURM job-array script with one array task per shard:

    python -m bob_jax.sweep --sweep=configs/sweeps/bob.py --workdir=/shared/bob \\
        --emit_slurm=bob.sbatch --shards=64
    sbatch --partition=gpu --gres=gpu:1 --time=24:00:00 bob.sbatch   # cluster options go on the command line
    python -m bob_jax.report --workdir=/shared/bob                    # after all shards: the merged report

Each array task asks for `--requeue` and `--signal=B:USR1@120`: two minutes before its time limit the
script forwards USR1 to the sweep, whose fine-tuning saves a checkpoint and stops, and the script
requeues the array task (`scontrol requeue`), which resumes where it stopped. Every shard rewrites
`DIR/report` at its end, holding a lock on `DIR/report.lock`, so the report left is the one that saw
the most records; `python -m bob_jax.report` merges the store at any time.

Exit status: 0 every run succeeded; 1 some run failed (listed at the end); 2 bad arguments or sweep
file; 143 (128 + SIGTERM) preempted: a SIGTERM/SIGUSR1/SIGUSR2 stopped a training run after it saved a
checkpoint (`bob_jax.preemption`) and the sweep stopped there; rerun the same command to continue.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import pathlib
import re
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from bob_jax import compilation_cache, distributed, preemption

log = logging.getLogger(__name__)

# Seconds of warning SLURM gives before the time limit (`--signal=B:USR1@<this>`): enough for a
# fine-tuning step plus a synchronous checkpoint of a large backbone.
SLURM_WARNING_SECONDS = 120


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


def parse_shard(spec: str) -> tuple[int, int]:
    """`"i/n"` -> (i, n) with n >= 1 and 0 <= i < n; a ValueError says what is wrong otherwise."""
    m = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", spec or "")
    if m is None:
        raise ValueError(f"--shard={spec!r}: write it as i/n, e.g. --shard=0/4 for the first of 4 shards")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise ValueError(f"--shard={spec}: the number of shards n must be at least 1")
    if not 0 <= index < count:
        raise ValueError(
            f"--shard={spec}: the shard index must lie in 0..{count - 1} (shards are numbered from 0, like "
            f"SLURM_ARRAY_TASK_ID with --array=0-{count - 1})"
        )
    return index, count


def shard(runs: list[tuple[str, Any]], index: int, count: int) -> list[tuple[str, Any]]:
    """Runs j with j % count == index. Round robin rather than contiguous blocks: a grid lists its
    expensive runs (fine-tuning on ImageNet) together, and interleaving spreads them over the shards.
    Shard sizes differ by at most one."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need count >= 1 and 0 <= index < count")
    return runs[index::count]


def describe(config) -> str:
    return f"{len(config.backbones)} backbone(s) x tasks {'+'.join(config.tasks)} on {config.dataset.name}"


def _record_names(workdir: pathlib.Path) -> set[str]:
    root = workdir / "results"
    return {p.name for p in root.glob("*.json") if not p.name.startswith(".")} if root.is_dir() else set()


def _records_written(workdir: pathlib.Path, before: set[str], config) -> int:
    """Records that appeared since `before` and carry `config`: written by this run, not by another
    shard writing into the same store meanwhile."""
    want = json.loads(json.dumps(config.to_dict()))
    count = 0
    for name in _record_names(workdir) - before:
        try:
            count += json.loads((workdir / "results" / name).read_text()).get("config") == want
        except (OSError, ValueError):
            continue
    return count


def write_store_report(workdir: str | pathlib.Path, console=None) -> dict[str, str]:
    """Rank every record of the store and write `workdir/report` (process 0 only).

    Shards of one sweep finish at different times and each one writes the report. The records are read
    and the report written while holding an exclusive lock on `workdir/report.lock`, so a shard that
    read an older state can never overwrite a newer report: every shard writes its records before it
    takes the lock, so the last holder saw all of them. Where the file system has no working locks
    (the error is logged), run `python -m bob_jax.report --workdir=DIR` after the shards."""
    import fcntl

    import jax

    from bob_jax.report import write_report
    from bob_jax.results import ResultsStore

    if jax.process_index() != 0:
        return {}
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "report.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:
            log.warning("no lock on %s (%s): concurrent shards may leave an older report; "
                        "run python -m bob_jax.report --workdir=%s after all shards", lock.name, e, workdir)
        records = ResultsStore(workdir).records()
        return write_report(records, workdir / "report", console=console) if records else {}


def run_sweep(runs: list[tuple[str, Any]], workdir: str | pathlib.Path, *, console=None,
              report: bool = True) -> dict[str, Any]:
    """Run every config into one store; failures are collected, not fatal. Returns a summary.

    `preemption.Preempted` (a training run checkpointed and stopped on a signal) is not a failure: it
    propagates, the remaining runs are not started, and a rerun continues."""
    from bob_jax import battle
    from bob_jax.results import ResultsStore

    def say(text: str) -> None:
        if console is not None:
            console.print(text, markup=False, highlight=False)

    workdir = pathlib.Path(workdir)
    done, failed = [], []
    for i, (name, config) in enumerate(runs, 1):
        say(f"[{i}/{len(runs)}] {name}: {describe(config)}")
        t0, before = time.time(), _record_names(workdir)
        try:
            battle.run(config, workdir, console=console, report=False)
        except Exception as e:  # noqa: BLE001 -- one bad run must not stop a 1,500-run sweep
            # Preempted is a BaseException and passes through: the machine is going away.
            failed.append({"name": name, "error": f"{type(e).__name__}: {e}",
                           "traceback": traceback.format_exc()})
            say(f"[{i}/{len(runs)}] {name} FAILED: {type(e).__name__}: {e}")
            continue
        new = _records_written(workdir, before, config)
        seconds = time.time() - t0
        done.append({"name": name, "seconds": seconds, "new_records": new})
        status = f"{new} new record(s)" if new else "every record existed, skipped"
        say(f"[{i}/{len(runs)}] {name}: done in {seconds:.1f} s, {status}")
    paths = write_store_report(workdir, console=console) if report else {}
    return {"done": done, "failed": failed, "paths": paths,
            "num_records": len(ResultsStore(workdir).records())}


# --------------------------------------------------------------------------------------------------
# SLURM job arrays
# --------------------------------------------------------------------------------------------------

_SLURM_TEMPLATE = """\
#!/bin/bash
# BoB sweep as a SLURM job array, one array task per shard; written by
#   {command}
# Cluster-specific options go on the sbatch command line (they override the lines below), e.g.
#   sbatch --partition=gpu --gres=gpu:1 --cpus-per-task=8 --time=24:00:00 {script}
# After all shards: python -m bob_jax.report --workdir={workdir_q}
#SBATCH --job-name=bob-sweep
#SBATCH --array=0-{last}{throttle}
#SBATCH --ntasks=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@{warning}
#SBATCH --open-mode=append
#SBATCH --output={log_dir}/%A_%a.out

set -u
cd {cwd}
PYTHON="${{PYTHON:-{python}}}"
echo "bob-sweep shard ${{SLURM_ARRAY_TASK_ID}}/{shards} on $(hostname), restart ${{SLURM_RESTART_COUNT:-0}}"

# The sweep runs in the background so that this shell can pass the warning on: bash runs a trap only
# between commands, and `wait` returns early when a trapped signal arrives.
"$PYTHON" -m bob_jax.sweep --sweep={sweep} --workdir={workdir_q} \\
  --shard="${{SLURM_ARRAY_TASK_ID}}/{shards}"{extra} &
child=$!
warned=0
trap 'warned=1; kill -USR1 "$child" 2>/dev/null' USR1
trap 'warned=1; kill -TERM "$child" 2>/dev/null' TERM
while :; do
  wait "$child"
  status=$?
  kill -0 "$child" 2>/dev/null || break
done

# {exit_status}: a training run saved a checkpoint and stopped (bob_jax.preemption). Requeue on it, and
# whenever the warning came (a frozen-feature run ends on USR1 without a checkpoint; the store keeps
# every finished record): the requeued task skips finished runs and resumes the interrupted one. At most
# BOB_JAX_MAX_REQUEUES times (default 20; raise it with sbatch --export=ALL,BOB_JAX_MAX_REQUEUES=N).
if {{ [ "$status" -eq {exit_status} ] || [ "$warned" -eq 1 ]; }} &&
   [ "${{SLURM_RESTART_COUNT:-0}}" -lt "${{BOB_JAX_MAX_REQUEUES:-20}}" ]; then
  echo "shard ${{SLURM_ARRAY_TASK_ID}} stopped (exit status $status); requeueing"
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}" || true
fi
exit "$status"
"""


def slurm_array_script(sweep: str, workdir: str | os.PathLike, shards: int, *, only: str | None = None,
                       max_parallel: int = 0, script: str = "sweep.sbatch", python: str | None = None,
                       cwd: str | os.PathLike | None = None, compilation_cache: str | None = None) -> str:
    """The text of an sbatch job-array script running shard `$SLURM_ARRAY_TASK_ID` of `shards`.

    Paths are made absolute (array tasks start in the submission directory, which may differ);
    `python` defaults to this interpreter and can be overridden at submission with `PYTHON=...`;
    `compilation_cache` (None: the sweep's default, per user) is passed on to every shard."""
    if shards < 1:
        raise ValueError(f"--shards={shards}: need at least one shard")
    if max_parallel < 0:
        raise ValueError(f"--max_parallel={max_parallel}: use 0 (no limit) or a positive number")
    path, colon, arg = sweep.partition(":")
    sweep_abs = str(pathlib.Path(path).resolve()) + colon + arg
    workdir_abs = str(pathlib.Path(workdir).resolve())
    extra = ([f"--only={only}"] if only else []) + \
        ([f"--compilation_cache={compilation_cache}"] if compilation_cache is not None else [])
    command = ["python", "-m", "bob_jax.sweep", f"--sweep={sweep}", f"--workdir={workdir}",
               f"--emit_slurm={script}", f"--shards={shards}", *extra]
    return _SLURM_TEMPLATE.format(
        command=shlex.join(command), script=shlex.quote(script), workdir_q=shlex.quote(workdir_abs),
        last=shards - 1, throttle=f"%{max_parallel}" if max_parallel else "", warning=SLURM_WARNING_SECONDS,
        log_dir=os.path.join(workdir_abs, "slurm"),
        cwd=shlex.quote(str(pathlib.Path(cwd or os.getcwd()).resolve())),
        python=python or sys.executable, shards=shards, sweep=shlex.quote(sweep_abs),
        extra="".join(f" {shlex.quote(a)}" for a in extra), exit_status=preemption.EXIT_STATUS,
    )


def write_slurm_array(path: str | os.PathLike, sweep: str, workdir: str | os.PathLike, shards: int,
                      **kwargs) -> pathlib.Path:
    """Write `slurm_array_script(...)` to `path` (executable) and create `workdir/slurm` for the logs
    (SLURM does not create the directory of `--output`)."""
    from bob_jax.results import atomic_write_text

    text = slurm_array_script(sweep, workdir, shards, script=str(path), **kwargs)
    (pathlib.Path(workdir).resolve() / "slurm").mkdir(parents=True, exist_ok=True)
    out = atomic_write_text(path, text)
    os.chmod(out, 0o755)
    return out


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bob_jax.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", required=True, help="sweep file[:arg], e.g. configs/sweeps/bob.py:local=true")
    p.add_argument("--workdir", required=True, help="one results store for the whole sweep")
    p.add_argument("--only", default=None, help="run only runs whose name matches this regex")
    p.add_argument("--shard", default=None, help="i/n: run only the runs j with j %% n == i (after --only)")
    p.add_argument("--dry_run", action="store_true", help="list the runs (of this shard) and exit")
    p.add_argument("--compilation_cache", default=compilation_cache.DEFAULT_DIR,
                   help="persistent XLA compilation cache directory, shared by shards ('' disables it)")
    p.add_argument("--emit_slurm", default=None, metavar="PATH",
                   help="write a SLURM job-array script running --shards shards of this sweep, and exit")
    p.add_argument("--shards", type=int, default=None, help="number of array tasks for --emit_slurm")
    p.add_argument("--max_parallel", type=int, default=0,
                   help="with --emit_slurm: at most this many array tasks run at once (0: no limit)")
    return p


def _check_args(args) -> None:
    if args.emit_slurm and args.shard:
        raise ValueError("--emit_slurm writes a script for every shard; drop --shard (use --shards=N)")
    if args.emit_slurm and args.shards is None:
        raise ValueError("--emit_slurm needs --shards=N, the number of array tasks")
    if args.shards is not None and not args.emit_slurm:
        raise ValueError("--shards goes with --emit_slurm; to run one shard here use --shard=i/n")


def _emit_slurm(args, runs, console) -> int:
    explicit_cache = args.compilation_cache != _parser().get_default("compilation_cache")
    path = write_slurm_array(args.emit_slurm, args.sweep, args.workdir, args.shards, only=args.only,
                             max_parallel=args.max_parallel,
                             compilation_cache=args.compilation_cache if explicit_cache else None)
    per = f"{len(runs) // args.shards}-{-(-len(runs) // args.shards)}"
    console.print(f"wrote {path}: {len(runs)} run(s) in {args.shards} array task(s) of {per} run(s)",
                  markup=False)
    if args.shards > len(runs):
        console.print(f"note: {args.shards - len(runs)} array task(s) will have no run", markup=False)
    console.print(f"submit:  sbatch [--partition=... --gres=gpu:1 --time=...] {path}\n"
                  f"report:  python -m bob_jax.report --workdir={args.workdir}   (after all shards)",
                  markup=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rich.console import Console

    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    try:
        distributed.initialize()  # multi-host sweeps: SLURM srun steps, TPU slices or BOB_JAX_* variables
        _check_args(args)
        index, count = parse_shard(args.shard) if args.shard else (0, 1)
        runs = select(load_sweep(args.sweep), args.only)
        if args.emit_slurm:
            return _emit_slurm(args, runs, console)
    except (FileNotFoundError, AttributeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mine = shard(runs, index, count)
    label = f"{len(runs)} run(s)" if count == 1 else \
        f"shard {index}/{count}: {len(mine)} of {len(runs)} run(s)"
    if args.dry_run:
        for j, (name, config) in enumerate(runs):
            if j % count == index:
                console.print(f"{j}: {name}: {describe(config)}", markup=False, highlight=False)
        console.print(label, markup=False)
        return 0
    if not mine:
        console.print(f"{label}: nothing to do", markup=False)
        return 0
    console.print(label, markup=False)
    compilation_cache.enable(args.compilation_cache)
    try:
        summary = run_sweep(mine, args.workdir, console=console)
    except preemption.Preempted as e:
        print(f"{preemption.message(e)}; the sweep stopped there", file=sys.stderr, flush=True)
        return preemption.EXIT_STATUS
    console.print(f"{len(summary['done'])} run(s) finished, {len(summary['failed'])} failed; "
                  f"{summary['num_records']} record(s) in {args.workdir}", markup=False)
    for f in summary["failed"]:
        console.print(f"  failed: {f['name']}: {f['error']}", markup=False)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
