"""Multi-host start-up: `jax.distributed.initialize()` exactly when the run spans several processes.

`initialize()` is called by the entry points (`bob_jax.main`, `bob_jax.sweep`) before anything touches
a JAX backend. It decides, in this order:

1. Explicit settings: the arguments (the `--coordinator_address`, `--num_processes`, `--process_id`,
   `--local_device_ids` flags) or, for launch scripts, the environment variables
   `BOB_JAX_COORDINATOR_ADDRESS`, `BOB_JAX_NUM_PROCESSES`, `BOB_JAX_PROCESS_ID`,
   `BOB_JAX_LOCAL_DEVICE_IDS` (an argument wins over its variable). `num_processes=1` is a plain run.
   Values left out are filled in by JAX's cluster detection when a cluster is detected (below).
   `local_device_ids` are the local devices this process drives: comma-separated ids, or `all`.
2. A cluster that JAX's own detection (`jax._src.clusters`) can bootstrap, with more than one process:
   SLURM inside an `srun` step (`SLURM_STEP_NODELIST` set and `SLURM_STEP_NUM_TASKS` / `SLURM_NTASKS`
   > 1; with one task per node that process drives all of its node's GPUs, not only GPU
   SLURM_LOCALID as JAX's SLURM default assumes), Open MPI's `mpirun` (`OMPI_MCA_orte_hnp_uri`,
   `OMPI_COMM_WORLD_SIZE` > 1), and Cloud TPU VM slices with several workers (GKE:
   `TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES`; GCE: the metadata server's
   `worker-network-endpoints`; multislice: `MEGASCALE_NUM_SLICES`).
3. Otherwise it is a single-process run and nothing is initialised: a plain `python -m bob_jax.main`,
   an `sbatch` script outside `srun`, a one-task SLURM job-array element and a single-host TPU VM all
   land here.

On CPU (tests, CPU clusters) cross-process collectives need an implementation: gloo is selected
before initialising unless `JAX_CPU_COLLECTIVES_IMPLEMENTATION` chose one. Calling `initialize()`
again returns the existing topology.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

ENV_COORDINATOR = "BOB_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "BOB_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "BOB_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "BOB_JAX_LOCAL_DEVICE_IDS"

# Seconds a process waits for all others to connect (jax's default is 300).
DEFAULT_INIT_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Topology:
    """What `detect()` found. `source`: "flags", "env", "slurm", "ompi", "tpu" or "single"; fields that
    are None are left to JAX's cluster detection."""

    source: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    @property
    def multi_process(self) -> bool:
        return self.source != "single"


def _int(value, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {value!r}.") from None


def _device_ids(value, what: str) -> tuple[int, ...] | None:
    """None: JAX's default; () ("all"): every local device of this process; else the ids."""
    if value is None or value == "" or (not isinstance(value, str) and len(value) == 0):
        return None
    if isinstance(value, str) and value.strip().lower() == "all":
        return ()
    items = value.split(",") if isinstance(value, str) else value
    try:
        return tuple(int(i) for i in items)
    except (TypeError, ValueError):
        raise ValueError(
            f"{what} must be 'all' or comma-separated integers such as '0,1', got {value!r}."
        ) from None


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"coordinator address {address!r} is not 'host:port' (e.g. '10.0.0.1:1234'): give process 0's "
            "host name or IP and a free port, the same on every process."
        )


def _slurm_processes(env: Mapping[str, str]) -> int:
    # Only inside an `srun` step: the batch script of `sbatch --ntasks=8` also sees SLURM_NTASKS=8 but
    # is ONE process, and JAX's SLURM detection needs the step's node list.
    if "SLURM_STEP_NODELIST" not in env or "SLURM_PROCID" not in env or "SLURM_JOB_ID" not in env:
        return 1
    return _int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"), "SLURM_NTASKS") or 1


def _slurm_one_task_per_node(env: Mapping[str, str]) -> bool:
    """`SLURM_STEP_TASKS_PER_NODE` like "1(x4)" or "1,1": one process drives all GPUs of its node.
    JAX's SLURM detection assumes one process per GPU and would show each process only GPU
    SLURM_LOCALID, so this case asks for all local devices instead."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    counts = [item.split("(")[0] for item in spec.split(",") if item]
    return bool(counts) and all(c.strip() == "1" for c in counts)


def _ompi_processes(env: Mapping[str, str]) -> int:
    if "OMPI_MCA_orte_hnp_uri" not in env:
        return 1
    return _int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 1


def _tpu_processes() -> int:
    """Workers of this Cloud TPU VM slice (all slices), via JAX's own TPU cluster detection; 1 when
    this is not a TPU VM. Asks the GCE metadata server only on a TPU VM."""
    try:
        from jax._src import cloud_tpu_init
        from jax._src.clusters import cloud_tpu_cluster
    except ImportError:  # a JAX without these modules: no TPU auto-detection
        return 1
    if not cloud_tpu_init.running_in_cloud_tpu_vm:
        return 1
    for cluster in (cloud_tpu_cluster.GkeTpuCluster, cloud_tpu_cluster.GceTpuCluster):
        try:
            if cluster.is_env_present():
                return int(cluster.get_process_count())
        except Exception as e:  # metadata server unreachable, requests missing, ...
            raise RuntimeError(
                f"this looks like a Cloud TPU VM but its slice could not be read ({type(e).__name__}: {e}); "
                f"pass --num_processes/--process_id/--coordinator_address (or {ENV_NUM_PROCESSES}, "
                f"{ENV_PROCESS_ID}, {ENV_COORDINATOR}), or --num_processes=1 for a single-host run."
            ) from e
    return 1


def _cluster(env: Mapping[str, str]) -> tuple[str, int] | None:
    for name, count in (("slurm", _slurm_processes(env)), ("ompi", _ompi_processes(env))):
        if count > 1:
            return name, count
    if env is os.environ:  # the TPU probe reads the live environment and the metadata server
        count = _tpu_processes()
        if count > 1:
            return "tpu", count
    return None


def detect(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Topology:
    """Decide whether this run is multi-process (see the module docstring); raises ValueError on an
    incomplete or inconsistent explicit setting. Touches no JAX backend."""
    env = os.environ if environ is None else environ
    given = any(v not in (None, "") for v in (coordinator_address, num_processes, process_id, local_device_ids))
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    num_processes = _int(num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES),
                         f"num_processes ({ENV_NUM_PROCESSES})")
    process_id = _int(process_id if process_id is not None else env.get(ENV_PROCESS_ID),
                      f"process_id ({ENV_PROCESS_ID})")
    local_device_ids = _device_ids(
        local_device_ids if local_device_ids not in (None, "") else env.get(ENV_LOCAL_DEVICE_IDS),
        f"local_device_ids ({ENV_LOCAL_DEVICE_IDS})")
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id, local_device_ids))

    if process_id is not None and num_processes is None:
        raise ValueError(
            f"process_id={process_id} was given without num_processes: pass --num_processes "
            f"(or {ENV_NUM_PROCESSES}) as well, the same on every process."
        )
    if num_processes is not None:
        if num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
        if process_id is not None and not 0 <= process_id < num_processes:
            raise ValueError(
                f"process_id={process_id} is outside [0, {num_processes}): number the processes 0 .. "
                f"num_processes - 1."
            )
        if num_processes == 1:
            return Topology("single", num_processes=1, process_id=0)
    if coordinator_address is not None:
        _check_address(coordinator_address)

    cluster = _cluster(env)
    if explicit:
        source = "flags" if given else "env"
        missing = [n for n, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                                  ("process_id", process_id)) if v is None]
        if missing and cluster is None:
            raise ValueError(
                f"multi-process settings are incomplete: {', '.join(missing)} missing and no cluster "
                "(SLURM srun step, Open MPI, TPU VM slice) was detected to supply them; pass "
                "--coordinator_address=HOST:PORT --num_processes=N --process_id=I on every process (or "
                f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})."
            )
        return Topology(source if not missing else f"{source}+{cluster[0]}", coordinator_address,
                        num_processes, process_id, local_device_ids)
    if cluster is None:
        return Topology("single")
    name, count = cluster
    all_devices = name == "slurm" and _slurm_one_task_per_node(env)
    return Topology(name, num_processes=count, local_device_ids=() if all_devices else None)


def _select_cpu_collectives(jax) -> None:
    # Cross-process collectives on CPU go through gloo (jax 0.10.2's default, stated here so that a
    # release with another default still works); a choice made in the environment stands.
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" in os.environ:
        return
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") or ""
    if not platforms or "cpu" in platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | str | None = None,
    *,
    initialization_timeout: int = DEFAULT_INIT_TIMEOUT_S,
) -> Topology:
    """Call `jax.distributed.initialize` when `detect()` finds a multi-process run; returns the topology.

    Must run before any JAX computation or device query. Idempotent: once JAX's distributed system is
    up (by this function or by the caller), later calls return the live topology and change nothing."""
    import jax

    if jax.distributed.is_initialized():
        topo = Topology("initialized", num_processes=jax.process_count(), process_id=jax.process_index())
        log.info("jax.distributed already initialised: process %d of %d", topo.process_id, topo.num_processes)
        return topo
    topo = detect(coordinator_address, num_processes, process_id, local_device_ids)
    if not topo.multi_process:
        log.info("single-process run: jax.distributed is not initialised")
        return topo
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            f"a multi-process run was detected ({topo}) but a JAX backend is already in use; call "
            "bob_jax.distributed.initialize() before any JAX computation or jax.devices() call."
        )
    _select_cpu_collectives(jax)
    log.info(
        "multi-process run (%s): coordinator %s, %s processes, process id %s, local devices %s; "
        "calling jax.distributed.initialize",
        topo.source, topo.coordinator_address or "auto", topo.num_processes or "auto",
        "auto" if topo.process_id is None else topo.process_id,
        "all" if topo.local_device_ids is None else list(topo.local_device_ids),
    )
    jax.distributed.initialize(
        coordinator_address=topo.coordinator_address,
        num_processes=topo.num_processes,
        process_id=topo.process_id,
        # An empty list is not None, so JAX's cluster detection keeps it, and it restricts nothing:
        # every local device stays visible (jax/_src/distributed.py, jax 0.10.2).
        local_device_ids=None if topo.local_device_ids is None else list(topo.local_device_ids),
        initialization_timeout=initialization_timeout,
    )
    log.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return dataclasses.replace(topo, num_processes=jax.process_count(), process_id=jax.process_index())


def is_primary() -> bool:
    """True on the process that writes results, reports, logs and JSON (process 0)."""
    import jax

    return jax.process_index() == 0
