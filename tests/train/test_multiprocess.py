"""Multi-host fine-tuning with real processes: two `jax.distributed` processes on localhost against one.

The worker (multiprocess_worker.py) runs the same short fine-tune + evaluation as
  * two processes, one CPU device each (loopback coordinator on a free port, gloo collectives),
  * one process with two simulated devices (the same global batch over the same 2-device mesh),
  * one process with one device.
All three run at once; every wait is bounded and the per-process logs are shown on failure. Then the
2-process run's checkpoints are restored, and resumed, in this (single) pytest process.

Measured (jax 0.10.2, CPU, float32, matmul precision highest, XLA's most optimisations off in every
run): 2 processes == 1 process x 2 devices bit for bit (losses, top1/nll/ece, per-example
correctness, every parameter); 1 process x 1 device differs by float reassociation only (see
ONE_DEVICE_RTOL). The same workers then extract frozen features (each process its rows of every global
batch, the whole matrix gathered onto every process) and run kNN, a linear probe and retrieval on them:
2 processes == 1 process x 2 devices bit for bit, in both processes.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import multiprocess_worker as worker  # tests/train is on sys.path (pytest's default import mode)
import numpy as np
import pytest

WORKER = Path(worker.__file__).resolve()
REPO = WORKER.parents[2]
TIMEOUT_S = 420  # for all workers together; a typical run takes well under a minute
# 1 device vs 2 devices: the same math with the batch reductions split differently. Measured after
# 30 AdamW steps: losses, nll and ece within 5.2e-7 relative, parameters within 3.0e-7 absolute
# (values up to ~1), top1 and per-example correctness identical. Bounds with a margin of ~7-20x:
ONE_DEVICE_RTOL = 1e-5
ONE_DEVICE_PARAM_ATOL = 2e-6
# Keys of result.json that describe the run rather than its outcome.
RUN_KEYS = ("process_count", "device_count")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
    # The worker sets JAX_PLATFORMS / XLA_FLAGS itself; nothing from this process or a surrounding
    # cluster (SLURM, MPI, TPU, bob_jax's own variables) may leak into its multi-process detection.
    drop = ("XLA_", "JAX_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "BOB_JAX_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    if os.environ.get("BOB_JAX_TEST_COMPILATION_CACHE"):
        env["BOB_JAX_TEST_COMPILATION_CACHE"] = os.environ["BOB_JAX_TEST_COMPILATION_CACHE"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_all(jobs: dict[str, list[list[str]]], root: Path) -> dict[str, Path]:
    """Start every process of every job at once, wait for all (bounded), return each job's dir.
    A job is a list of worker argument lists, one per process; "{out}" stands for the job's dir."""
    procs, logs, dirs = [], [], {}
    env = _worker_env()
    for name, arg_lists in jobs.items():
        out = root / name
        out.mkdir()
        dirs[name] = out
        for i, args in enumerate(arg_lists):
            log = out / f"process_{i}.log"
            logs.append(log)
            with open(log, "w") as f:
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), *(a.format(out=out) for a in args)],
                    stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # A process that failed leaves its peers waiting in a collective: stop everything at once.
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    failed = [(log, p.returncode) for log, p in zip(logs, procs, strict=True) if p.returncode != 0]
    if failed:  # every log of the run: a peer's log often says why a process was stuck
        report = "\n".join(f"===== {log} (exit {p.returncode}) =====\n{log.read_text()[-4000:]}"
                           for log, p in zip(logs, procs, strict=True))
        pytest.fail(f"worker process(es) failed or passed the {TIMEOUT_S} s limit:\n{report}")
    return dirs


OUT = ("{out}", "{out}/work")  # the worker's OUT_DIR and WORKDIR


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    coordinator = f"127.0.0.1:{_free_port()}"
    start, cpu = time.monotonic(), _children_cpu_s()
    dirs = _run_all({
        "two_processes": [[*OUT, "1", coordinator, "2", "0"], [*OUT, "1", coordinator, "2", "1"]],
        "one_process_two_devices": [[*OUT, "2"]],
        "one_process_one_device": [[*OUT, "1"]],
    }, root)
    print(f"workers: {time.monotonic() - start:.1f} s wall, {_children_cpu_s() - cpu:.1f} s CPU")
    return dirs


def _result(path: Path) -> dict:
    return json.loads((path / "result.json").read_text())


def _params(path: Path) -> dict[str, np.ndarray]:
    with np.load(path / "params.npz") as f:
        return dict(f)


def test_two_processes_equal_one_process_bit_for_bit(runs):
    two, one = _result(runs["two_processes"]), _result(runs["one_process_two_devices"])
    assert (two["process_count"], two["device_count"]) == (2, 2)
    assert (one["process_count"], one["device_count"]) == (1, 2)
    assert two["steps"] == 30 and two["num_eval"] == 37 and two["shifted"]["num_eval"] == 21
    # The run learned something, so the per-example comparison is not of all-wrong vectors.
    assert 0.3 < two["top1"] < 1 and 0 < sum(two["per_example"]) < 37
    for key in one:
        if key not in RUN_KEYS:
            assert two[key] == one[key], key
    p2, p1 = _params(runs["two_processes"]), _params(runs["one_process_two_devices"])
    assert p2.keys() == p1.keys()
    for name in p1:
        np.testing.assert_array_equal(p2[name], p1[name], err_msg=name)


def test_each_process_reads_only_its_half_of_every_batch(runs):
    reads = [json.loads((runs["two_processes"] / f"reads_{i}.json").read_text()) for i in range(2)]
    single = json.loads((runs["one_process_two_devices"] / "reads_0.json").read_text())
    assert len(single) == 30 * 8  # 30 global batches of 8
    assert len(reads[0]) == len(reads[1]) == 30 * 4
    # Together the two processes read exactly what the single process read, each example as often.
    assert collections.Counter(reads[0]) + collections.Counter(reads[1]) == collections.Counter(single)


def test_one_device_matches_within_tolerance(runs):
    one, ref = _result(runs["one_process_one_device"]), _result(runs["one_process_two_devices"])
    assert (one["process_count"], one["device_count"]) == (1, 1)
    np.testing.assert_allclose(one["losses"], ref["losses"], rtol=ONE_DEVICE_RTOL)
    for key in ("nll", "ece"):
        np.testing.assert_allclose(one[key], ref[key], rtol=ONE_DEVICE_RTOL, err_msg=key)
        np.testing.assert_allclose(one["shifted"][key], ref["shifted"][key], rtol=ONE_DEVICE_RTOL, err_msg=key)
    assert one["per_example"] == ref["per_example"] and one["top1"] == ref["top1"]
    p1, ref_p = _params(runs["one_process_one_device"]), _params(runs["one_process_two_devices"])
    for name in ref_p:
        got, want = p1[name], ref_p[name]
        if name.endswith("attn.qkv.bias"):
            # The key bias cancels in the softmax: its exact gradient is 0, so Adam turns ~1e-10
            # rounding residues into full-size steps and the values are noise in any two runs.
            dim = want.shape[0] // 3
            got, want = np.delete(got, np.s_[dim:2 * dim]), np.delete(want, np.s_[dim:2 * dim])
        np.testing.assert_allclose(got, want, rtol=0, atol=ONE_DEVICE_PARAM_ATOL, err_msg=name)


# 1 device vs 2 devices, frozen features of the random-init tiny ViT: the per-device batch changes
# (8 vs 4 rows), so XLA may tile the matmuls differently. Bound on the features (values ~1):
FROZEN_ONE_DEVICE_ATOL = 1e-5
FROZEN_PROBE_RTOL = 1e-5  # the linear probe's metrics, 2 processes vs 1 (see the test)


def _frozen(path: Path, pid: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path / f"features_{pid}.npz") as f:
        return json.loads((path / f"frozen_{pid}.json").read_text()), dict(f)


TRAINED_HEADS = ("linear_probe", "linear_multihead", "multilabel_probe")


def test_frozen_features_and_tasks_two_processes_equal_one_process(runs):
    """Multi-process feature extraction: each process embeds its rows of every global batch, and every
    process ends with the whole matrix in source order; kNN, linear probe and retrieval then agree
    with the 1-process x 2-device run bit for bit, in every process; the trained heads (linear probe,
    DINOv2 multi-head grid, multi-label probe) within float-summation order."""
    ref, ref_arrays = _frozen(runs["one_process_two_devices"])
    assert ref_arrays["test_features"].shape == (worker.N_TEST, 32)
    assert ref_arrays["train_labels"].tolist() == [worker.Blobs(worker.N_TRAIN, 30_000)[i]["label"]
                                                   for i in range(worker.N_TRAIN)]  # source order
    assert 0.2 < ref["knn"]["metrics"]["top1"] < 1 and 0.2 < ref["linear_probe"]["metrics"]["top1"] < 1
    assert 0.2 < ref["linear_multihead"]["metrics"]["top1"] <= 1 and ref["multilabel_probe"]["metrics"]["mean_auroc"] > 0.5
    first, _ = _frozen(runs["two_processes"], 0)
    for pid in range(2):
        got, arrays = _frozen(runs["two_processes"], pid)
        for name in ref_arrays:
            np.testing.assert_array_equal(arrays[name], ref_arrays[name], err_msg=f"process {pid} {name}")
        assert got == first, f"process {pid}"  # every process computed the same results
        # The heads trained with optimisers: the linear probe's own multi-process path
        # (bob_jax.tasks.linear_probe: GatherBatch sorts each process's rows, evaluation sums meet across
        # processes) reorders float sums (measured: nll 2.0e-7 and ece 1.0e-8 relative; top1, top5, final
        # train loss and per-example equal); the multi-head grid and the multi-label probe feed every
        # device its rows from the whole batch held by each process (parallel.shard_global_batch).
        trained = {name: got.pop(name) for name in TRAINED_HEADS}
        assert got == {k: v for k, v in ref.items() if k not in TRAINED_HEADS}, f"process {pid}"
        for name, result in trained.items():
            assert result.get("per_example") == ref[name].get("per_example"), f"process {pid} {name}"
            for key, value in ref[name]["metrics"].items():
                assert result["metrics"][key] == pytest.approx(value, rel=FROZEN_PROBE_RTOL), f"{name} {key}"
    # Computed once, written by process 0 alone, then read by both processes (after the barrier).
    assert ref["cached"] == [False, False, True] and ref["again_equal"]
    assert len(list((runs["two_processes"] / "work" / "features").glob("*.npz"))) == 2
    assert (runs["two_processes"] / "work" / "probe" / "checkpoints").is_dir()


def test_frozen_features_one_device_within_tolerance(runs):
    one, arrays = _frozen(runs["one_process_one_device"])
    ref, ref_arrays = _frozen(runs["one_process_two_devices"])
    for name in ref_arrays:
        np.testing.assert_allclose(arrays[name], ref_arrays[name], rtol=0, atol=FROZEN_ONE_DEVICE_ATOL,
                                   err_msg=name)
    assert one["knn"] == ref["knn"] and one["retrieval"]["metrics"]["mAP_revisited"] == pytest.approx(
        ref["retrieval"]["metrics"]["mAP_revisited"], rel=1e-5)
    assert one["linear_probe"]["per_example"] == ref["linear_probe"]["per_example"]


@pytest.fixture
def worker_compile_settings():
    """The workers' jax settings (most XLA optimisations off) for this process, restored afterwards."""
    import jax

    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def test_two_process_checkpoints_restore_and_resume_in_one_process(runs, tmp_path, worker_compile_settings):
    import jax

    from bob_jax import parallel
    from bob_jax.checkpoint import Checkpointer

    src = runs["two_processes"] / "work" / "checkpoints"
    with Checkpointer(src) as ckpt:
        assert ckpt.all_steps() == [20, 30]
        data_state = ckpt.data_state(20)
    assert data_state == {"next_index": 20}  # global batches consumed: the same for any process count
    ref = _result(runs["two_processes"])
    ref_params = _params(runs["two_processes"])

    # Resume the 2-process run at step 20 in this single process on a 2-device mesh: steps 21..30
    # and everything after are the 2-process run's, bit for bit.
    resume = tmp_path / "resume"
    shutil.copytree(src, resume / "checkpoints", ignore=shutil.ignore_patterns("30"))
    mesh2 = parallel.make_mesh({"data": 2}, devices=jax.devices()[:2])
    model, train, test, ood, config = worker.build()
    out = worker.run(model, train, test, ood, config, mesh2, str(resume))
    assert out["resumed_from"] == 20 and out["steps"] == 30
    assert out["losses"] == ref["losses"][20:]
    for key in ("top1", "nll", "ece", "per_example", "shifted"):
        assert out[key] == ref[key], key
    for name, value in worker.flat_params(model).items():
        np.testing.assert_array_equal(value, ref_params[name], err_msg=name)

    # The final checkpoint restores onto a 1-device mesh (another mesh shape): the same parameters.
    final = tmp_path / "final"
    shutil.copytree(src, final / "checkpoints")
    mesh1 = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    model, train, test, ood, config = worker.build()
    out = worker.run(model, train, test, ood, config, mesh1, str(final))
    assert out["resumed_from"] == out["steps"] == 30 and out["losses"] == [] and train.read == []
    for name, value in worker.flat_params(model).items():
        np.testing.assert_array_equal(value, ref_params[name], err_msg=name)
    assert out["per_example"] == ref["per_example"]
    np.testing.assert_allclose(out["nll"], ref["nll"], rtol=ONE_DEVICE_RTOL)


CLI_JOB = (
    ("--config=configs/battle.py:backbones=vit_small_patch16_224.augreg_in1k@random,dataset=digits,"
     "train_size=64,test_size=40,input_size=32,tasks=finetune"),
    "--config.finetune.epochs=2", "--config.finetune.warmup_epochs=1", "--config.finetune.batch_size=16",
    "--config.finetune.num_threads=1", "--config.progress=False", "--compilation_cache=",
)


@pytest.mark.slow
def test_cli_two_processes_write_one_record_equal_to_one_process(tmp_path):
    """`python -m bob_jax.main` with --coordinator_address/--num_processes/--process_id: the battle
    job's fine-tuning record, written by process 0 alone, equals a 1-process run's; a rerun skips it."""

    def jobs(port):
        coordinator = f"--coordinator_address=127.0.0.1:{port}"
        return [["--cli", "1", "--workdir={out}/wd", coordinator, "--num_processes=2", f"--process_id={i}",
                 *CLI_JOB] for i in range(2)]

    dirs = _run_all({"two": jobs(_free_port()), "one": [["--cli", "2", "--workdir={out}/wd", *CLI_JOB]]}, tmp_path)
    records = {name: [json.loads(p.read_text()) for p in (d / "wd" / "results").glob("*.json")]
               for name, d in dirs.items()}
    assert len(records["two"]) == len(records["one"]) == 1
    two, one = records["two"][0], records["one"][0]
    assert two["key"] == one["key"] and two["num_devices"] == one["num_devices"] == 2
    assert two["metrics"] == one["metrics"] and two["metrics_per_example"] == one["metrics_per_example"]
    assert two["train"]["losses"] == one["train"]["losses"]
    logs = [(dirs["two"] / f"process_{i}.log").read_text() for i in range(2)]
    assert "finetune" in logs[0] and "wrote " in logs[0]
    assert "wrote" not in logs[1]  # process 1 computes its share in silence
    assert (dirs["two"] / "wd" / "report" / "ranking.md").is_file()

    # A rerun of the 2-process job: both processes agree that the record exists and skip it.
    (path,) = (dirs["two"] / "wd" / "results").glob("*.json")
    stamp = path.stat().st_mtime_ns
    again = _run_all({"two_again": [[a.replace("{out}", str(dirs["two"])) for a in args]
                                    for args in jobs(_free_port())]}, tmp_path)
    assert "finished earlier" in (again["two_again"] / "process_0.log").read_text()
    assert path.stat().st_mtime_ns == stamp and len(list(path.parent.glob("*.json"))) == 1
    # Without the record, the two processes restore the run's final checkpoint together (no
    # training) and write the same record again.
    path.unlink()
    restored = _run_all({"two_restore": [[a.replace("{out}", str(dirs["two"])) for a in args]
                                         for args in jobs(_free_port())]}, tmp_path)
    record = json.loads(path.read_text())
    assert record["train"]["resumed_from"] == record["train"]["steps"] == two["train"]["steps"]
    assert record["metrics"] == two["metrics"], (restored["two_restore"] / "process_0.log").read_text()[-3000:]


FROZEN_CLI_JOB = (
    ("--config=configs/battle.py:backbones=vit_small_patch16_224.augreg_in1k@random,dataset=digits,"
     "train_size=64,test_size=40,input_size=32,tasks=knn+linear_probe+retrieval"),
    "--config.linear_probe.epochs=2", "--config.linear_probe.warmup_epochs=1",
    "--config.linear_probe.batch_size=16", "--config.batch_size=16", "--config.progress=False",
    "--compilation_cache=",
)


@pytest.mark.slow
def test_cli_frozen_tasks_two_processes_equal_one_process(tmp_path):
    """The battle job's frozen path on 2 processes (features extracted over both, tasks run in each,
    records written by process 0) gives the records of a 1-process x 2-device run."""
    port = _free_port()
    two = [["--cli", "1", "--workdir={out}/wd", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            f"--process_id={i}", *FROZEN_CLI_JOB] for i in range(2)]
    dirs = _run_all({"two": two, "one": [["--cli", "2", "--workdir={out}/wd", *FROZEN_CLI_JOB]]}, tmp_path)
    records = {name: {r["task"]: r for r in (json.loads(p.read_text()) for p in (d / "wd" / "results").glob("*.json"))}
               for name, d in dirs.items()}
    assert sorted(records["two"]) == sorted(records["one"]) == ["knn", "linear_probe", "retrieval"]
    for task, one in records["one"].items():
        got = records["two"][task]
        assert got["key"] == one["key"] and got["num_devices"] == one["num_devices"] == 2
        assert got["metrics_per_example"] == one["metrics_per_example"], task
        for key, value in one["metrics"].items():
            if key != "train_seconds":  # wall time
                assert got["metrics"][key] == pytest.approx(value, rel=FROZEN_PROBE_RTOL), (task, key)
        if task != "linear_probe":
            assert got["metrics"] == one["metrics"], task
    assert "wrote" not in (dirs["two"] / "process_1.log").read_text()


# --------------------------------------------------------------------------------------------------
# Per-process data: the parts of every global batch (no processes needed)
# --------------------------------------------------------------------------------------------------


def test_train_dataset_process_parts_assemble_the_single_process_batches():
    from bob_jax.backbones.preprocess import Preprocess
    from bob_jax.data import pipelines as P
    from bob_jax.data import transforms as T

    src, tf = worker.Blobs(20), T.TrainTransform(Preprocess(input_size=16))  # random crops and flips
    single = list(P.train_dataset(src, tf, 8, seed=3, num_epochs=2))  # 40 positions -> 5 batches of 8
    parts = [list(P.train_dataset(src, tf, 8, seed=3, num_epochs=2, process=(p, 2))) for p in range(2)]
    assert len(single) == len(parts[0]) == len(parts[1]) == 5
    for k, whole in enumerate(single):
        for key in whole:  # rows [0, 4) from process 0, [4, 8) from process 1: images and their augmentation
            np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[key])
    # The iterator state counts global batches, so it moves between process counts.
    it = iter(P.train_dataset(src, tf, 8, seed=3, num_epochs=2, process=(1, 2)))
    next(it), next(it)
    assert it.get_state() == {"next_index": 2}
    resumed = iter(P.train_dataset(src, tf, 8, seed=3, num_epochs=2))
    resumed.set_state(it.get_state())
    np.testing.assert_array_equal(next(resumed)["image"], single[2]["image"])
    with pytest.raises(ValueError, match="multiple of 3"):
        P.train_dataset(src, tf, 8, seed=3, process=(0, 3))
    with pytest.raises(ValueError, match="drop_remainder"):
        P.train_dataset(src, tf, 8, seed=3, process=(0, 2), drop_remainder=False)
    with pytest.raises(ValueError, match="index < count"):
        P.train_dataset(src, tf, 8, seed=3, process=(2, 2))


def test_eval_batches_process_parts_assemble_the_single_process_batches():
    from bob_jax.data import pipelines as P

    src = worker.Blobs(21)
    single = list(P.eval_batches(src, None, 8))  # 8 + 8 + 5 valid rows
    parts = [list(P.eval_batches(src, None, 8, process=(p, 2))) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(single) == 3
    for k, whole in enumerate(single):
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[key])
    assert parts[1][2]["mask"].tolist() == [True, False, False, False]  # example 20, then padding
    # A process left without any example still steps in lockstep, on padding shaped like example 0.
    empty = list(P.eval_batches(worker.Blobs(3), None, 8, process=(1, 2)))
    assert len(empty) == 1 and not empty[0]["mask"].any()
    assert empty[0]["image"].shape == (4, 32, 32, 3) and (empty[0]["index"] == -1).all()
    with pytest.raises(ValueError, match="not both"):
        P.eval_batches(src, None, 8, shard=(0, 2), process=(0, 2))


# --------------------------------------------------------------------------------------------------
# bob_jax.distributed: when jax.distributed.initialize is called
# --------------------------------------------------------------------------------------------------

_SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "3",
               "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
               "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}


@pytest.mark.parametrize("environ, source, count, local", [
    ({}, "single", None, None),
    (_SLURM_STEP, "slurm", 4, None),  # srun, one task per GPU: jax picks GPU SLURM_LOCALID
    ({**_SLURM_STEP, "SLURM_STEP_TASKS_PER_NODE": "1(x4)"}, "slurm", 4, ()),  # one per node: all GPUs
    # The batch script of `sbatch --ntasks=4` is one process; so is a 1-task job-array element.
    ({k: v for k, v in _SLURM_STEP.items() if not k.startswith("SLURM_STEP")}, "single", None, None),
    ({**_SLURM_STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}, "single", None, None),
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911", "OMPI_COMM_WORLD_SIZE": "2"}, "ompi", 2, None),
    ({"BOB_JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "BOB_JAX_NUM_PROCESSES": "2", "BOB_JAX_PROCESS_ID": "1"},
     "env", 2, None),
    ({"BOB_JAX_NUM_PROCESSES": "1"}, "single", 1, None),
    # Explicit values win; what they leave out comes from the detected cluster.
    ({**_SLURM_STEP, "BOB_JAX_LOCAL_DEVICE_IDS": "all"}, "env+slurm", None, ()),
])
def test_detect(environ, source, count, local):
    from bob_jax import distributed

    topo = distributed.detect(environ=environ)
    assert (topo.source, topo.num_processes, topo.local_device_ids) == (source, count, local)
    assert topo.multi_process == (source != "single")


def test_detect_explicit_arguments_and_errors():
    from bob_jax import distributed

    env = {"BOB_JAX_NUM_PROCESSES": "4", "BOB_JAX_PROCESS_ID": "3", "BOB_JAX_COORDINATOR_ADDRESS": "h:1"}
    topo = distributed.detect("127.0.0.1:5000", 2, 1, "0,1", environ=env)  # arguments win over variables
    assert topo == distributed.Topology("flags", "127.0.0.1:5000", 2, 1, (0, 1))
    with pytest.raises(ValueError, match="without num_processes"):
        distributed.detect(process_id=1, environ={})
    with pytest.raises(ValueError, match="coordinator_address, process_id missing"):
        distributed.detect(num_processes=2, environ={})
    with pytest.raises(ValueError, match="outside"):
        distributed.detect("h:1", 2, 2, environ={})
    with pytest.raises(ValueError, match="host:port"):
        distributed.detect("10.0.0.1", 2, 0, environ={})
    with pytest.raises(ValueError, match="integer"):
        distributed.detect(environ={"BOB_JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="'all' or comma-separated"):
        distributed.detect("h:1", 2, 0, "gpu0", environ={})


def test_detect_reads_tpu_slices_through_jax(monkeypatch):
    from jax._src import cloud_tpu_init
    from jax._src.clusters import cloud_tpu_cluster

    from bob_jax import distributed

    for var in [v for v in os.environ if v.startswith(("SLURM_", "OMPI_", "BOB_JAX_"))]:
        monkeypatch.delenv(var)
    # What `import jax` sets on a TPU VM (jax's cluster module keeps its own copy of the flag).
    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    # A GKE-style slice of 4 workers; the slice count is set so that jax asks no metadata server.
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-w-0,t1v-w-1,t1v-w-2,t1v-w-3")
    monkeypatch.setenv("MEGASCALE_NUM_SLICES", "1")
    assert distributed.detect() == distributed.Topology("tpu", num_processes=4)
    monkeypatch.setenv("MEGASCALE_NUM_SLICES", "2")  # multislice: every worker of every slice
    assert distributed.detect().num_processes == 8
    monkeypatch.setenv("MEGASCALE_NUM_SLICES", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # a single-host TPU VM: a plain run
    assert not distributed.detect().multi_process


def test_initialize_single_process_is_a_no_op():
    import jax

    from bob_jax import distributed

    assert distributed.initialize(num_processes=1) == distributed.Topology("single", num_processes=1, process_id=0)
    assert not jax.distributed.is_initialized()
    # Once the backend is up a multi-process start-up is impossible, and the error says so.
    jax.devices()
    with pytest.raises(RuntimeError, match="before any JAX computation"):
        distributed.initialize("127.0.0.1:1", 2, 0)
