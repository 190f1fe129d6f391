"""bob_jax entry point: `python -m bob_jax.main --config=configs/<name>.py[:arg] --workdir=DIR`.

The config file's `get_config(arg)` returns a locked ConfigDict, so `--config.key=value` overrides
work and a mistyped key is an error naming it. `config.job` picks what runs.

Exit status: 0 done; 1 error (message on stderr); 143 (128 + SIGTERM) preempted: SIGTERM, SIGUSR1 or
SIGUSR2 arrived during training, a checkpoint of the current step was saved and rerunning the same
command resumes from it (`bob_jax.preemption`).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bob_jax import compilation_cache

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory: results, features, checkpoints, report.")
_CACHE = flags.DEFINE_string(
    "compilation_cache", compilation_cache.DEFAULT_DIR,
    "Persistent XLA compilation cache directory ('' disables it).",
)
# Multi-host (bob_jax.distributed): SLURM srun steps, Open MPI and Cloud TPU VM slices are detected and
# need none of these; elsewhere give all three on every process (or the BOB_JAX_* variables).
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-host: HOST:PORT of process 0's coordinator, the same on every process "
    "(env BOB_JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-host: number of processes; 1 = plain run (env BOB_JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-host: this process's id in [0, num_processes) (env BOB_JAX_PROCESS_ID).")
_LOCAL_DEVICE_IDS = flags.DEFINE_string(
    "local_device_ids", None,
    "Multi-host: the local devices this process drives, comma-separated ids or 'all' "
    "(env BOB_JAX_LOCAL_DEVICE_IDS; default: jax's choice, one GPU per process under SLURM).")
flags.mark_flags_as_required(["config", "workdir"])

JOBS = ("battle", "detection")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from bob_jax import distributed

    quiet = not flags.FLAGS["verbosity"].present
    if quiet:
        # Orbax, grain and backend start-up log at INFO; progress bars and result lines say enough.
        logging.set_verbosity(logging.WARNING)
    try:  # before anything touches a JAX backend
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               _LOCAL_DEVICE_IDS.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if quiet and jax.process_index() != 0:
        # Processes other than 0 compute their share in silence: process 0 speaks for the run.
        logging.set_verbosity(logging.ERROR)
    compilation_cache.enable(_CACHE.value)
    config = _CONFIG.value
    if config.job not in JOBS:
        raise app.UsageError(f"config.job={config.job!r} is not one of {JOBS}")
    os.makedirs(_WORKDIR.value, exist_ok=True)
    logging.info("config:\n%s", config)
    if jax.process_index() == 0:
        with open(os.path.join(_WORKDIR.value, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    from rich.console import Console

    from bob_jax import battle
    from bob_jax.detection import job as detection_job

    run_job = {"battle": battle.run, "detection": detection_job.run}[config.job]
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160,
                      quiet=jax.process_index() != 0)
    from bob_jax import preemption
    from bob_jax.convert import ConversionError
    from bob_jax.io import CheckpointError, WeightsUnavailableError

    try:
        out = run_job(config, _WORKDIR.value, console=console)
    except (WeightsUnavailableError, CheckpointError, ConversionError, FileNotFoundError) as e:
        # Problems with the user's inputs: the message says what is wrong and how to fix it.
        sys.exit(f"error: {e}")
    except preemption.Preempted as e:
        # A checkpoint of the current step is saved; exit 143 (128 + SIGTERM) so launchers requeue.
        print(preemption.message(e), file=sys.stderr, flush=True)
        sys.exit(preemption.EXIT_STATUS)
    for kind, path in out["paths"].items():
        console.print(f"wrote {kind}: {path}", markup=False, highlight=False)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
