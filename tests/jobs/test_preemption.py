"""Preemption: signals checkpoint the training loop and stop the job with status 143; a rerun resumes."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from bob_jax import preemption

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(__file__).with_name("preempt_worker.py")


def _python_handler(signum, frame):  # a stand-in for whatever handler the program had before
    raise AssertionError("the previous handler must not run while a watch() is active")


def test_watch_sets_the_flag_keeps_the_process_alive_and_restores_handlers():
    before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    signal.signal(signal.SIGUSR2, _python_handler)
    try:
        with preemption.watch() as watcher:
            assert watcher.mode == "local" and not watcher.should_stop(1) and not preemption.requested()
            os.kill(os.getpid(), signal.SIGTERM)  # would end pytest without the handler
            assert watcher.should_stop(2) and preemption.requested()
            assert watcher.signal_name == "SIGTERM"
            # Nested (a fine-tuning inside a sweep): the flag is shared, the first signal is remembered,
            # and leaving the inner watch puts the outer handlers back.
            outer = signal.getsignal(signal.SIGUSR1)
            with preemption.watch() as inner:
                assert inner.should_stop(1)
                os.kill(os.getpid(), signal.SIGUSR1)
                assert inner.signal_name == "SIGTERM"
            assert signal.getsignal(signal.SIGUSR1) is outer
        assert signal.getsignal(signal.SIGUSR2) is _python_handler
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
        assert signal.getsignal(signal.SIGUSR1) == before[signal.SIGUSR1]
        # A new outermost watch starts clean; a disabled one never stops and installs nothing.
        with preemption.watch() as watcher:
            assert not watcher.should_stop(1)
            os.kill(os.getpid(), signal.SIGUSR2)
            assert watcher.should_stop(2) and watcher.signal_name == "SIGUSR2"
        with preemption.watch(enabled=False) as off:
            assert signal.getsignal(signal.SIGUSR2) is _python_handler
            assert not off.should_stop(1)
    finally:
        signal.signal(signal.SIGUSR2, before[signal.SIGUSR2])


def test_preempted_is_not_an_ordinary_exception_and_names_the_checkpoint():
    e = preemption.Preempted(17, "/runs/x/checkpoints", "SIGUSR1")
    assert not isinstance(e, Exception)  # `except Exception` in a sweep must not swallow it
    assert str(e) == ("preempted at step 17 (SIGUSR1); checkpoint saved in /runs/x/checkpoints; "
                      "rerun the same command to resume")
    assert preemption.EXIT_STATUS == 143


def test_allgather_fallback_agrees_only_every_k_steps():
    # The multi-process fallback (jax's preemption service disabled), here with one process.
    with preemption.watch():
        watcher = preemption.Watcher("allgather")
        calls = [watcher.should_stop(s) for s in range(preemption.ALLGATHER_EVERY)]
        assert not any(calls)
        os.kill(os.getpid(), signal.SIGUSR1)
        calls = [watcher.should_stop(s) for s in range(preemption.ALLGATHER_EVERY)]
    assert sum(calls) == 1


# jax.distributed (one process, loopback coordinator) starts jax's preemption sync manager, whose notifier owns
# SIGTERM and takes one notice per process life. "usr1": the watcher leaves SIGTERM to the notifier and turns
# SIGUSR1 into a notice. "between": a SIGTERM between two loops (a sweep between runs) stops the next loop
# at once, because the agreement counts calls process-wide; raw loop steps would restart at 1 and meet the
# sync point (first loop's last step + 1) only 30 steps later.
_SYNC_POINT_CHILD = textwrap.dedent("""
    import os, signal, socket, sys, time
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    import jax
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=1, process_id=0, initialization_timeout=60)
    from bob_jax import preemption

    def loop(steps, signal_at=None):
        with preemption.watch() as watcher:
            assert watcher.mode == "sync_point", watcher.mode
            for step in range(1, steps + 1):
                if step == signal_at:
                    os.kill(os.getpid(), signal.SIGUSR1)
                if watcher.should_stop(step):
                    return step, watcher.signal_name
                time.sleep(0.02)  # jax's notifier polls its flag once a second
        return None, None

    if sys.argv[1] == "usr1":
        print(*loop(400, signal_at=5), flush=True)
    else:
        assert loop(30) == (None, None)
        os.kill(os.getpid(), signal.SIGTERM)  # no Python handler now: the notifier's catches it
        time.sleep(2)
        print(*loop(400), flush=True)
    jax.distributed.shutdown()
""")


def test_sync_point_mode_under_jax_distributed():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = {mode: subprocess.Popen([sys.executable, "-c", _SYNC_POINT_CHILD, mode], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mode in ("usr1", "between")}
    out = {}
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-3000:]
        step, name = stdout.strip().split(" ", 1)
        out[mode] = int(step), name
    assert out["usr1"][0] > 5 and out["usr1"][1] == "SIGUSR1"
    assert out["between"][0] < 30 and "preemption service" in out["between"][1]


# Two jax.distributed processes (loopback coordinator); only process 1 gets SIGUSR1. Its notice travels through
# the coordination service, and both processes must stop at the same step (a multi-host checkpoint is a
# collective save).
_TWO_PROCESS_CHILD = textwrap.dedent("""
    import os, pathlib, sys, time
    port, pid, ready = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
    import jax
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=60)
    from bob_jax import preemption

    with preemption.watch() as watcher:
        for step in range(1, 1500):
            if step == 3:
                ready.touch()
            if watcher.should_stop(step):
                print(step, watcher.signal_name, flush=True)
                break
            time.sleep(0.02)
        else:
            print("no stop", flush=True)
    jax.distributed.shutdown()
""")


def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_CHILD, port, str(i), str(ready[i])], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not all(r.exists() for r in ready):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "workers did not start"
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGUSR1)
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    (step0, name0), (step1, name1) = (out.strip().split(" ", 1) for out, _ in outs)
    assert step0 == step1 and int(step0) > 3
    assert "preemption service" in name0 and name1 == "SIGUSR1"


# --------------------------------------------------------------------------------------------------
# End to end: python -m bob_jax.main fine-tuning, SIGTERM mid-run, resume, same result
# --------------------------------------------------------------------------------------------------

STEPS_PER_EPOCH, EPOCHS = 8, 2
JOB = (
    ("--config=configs/battle.py:backbones=vit_small_patch16_224.augreg_in1k@random,dataset=digits,"
     "train_size=128,test_size=64,input_size=32,tasks=finetune"),
    f"--config.finetune.epochs={EPOCHS}",
    "--config.finetune.batch_size=16",
    "--config.finetune.num_threads=1",
    "--config.progress=False",
)


def _start(workdir, log, cache, *extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, str(WORKER), *extra, f"--workdir={workdir}", f"--compilation_cache={cache}", *JOB],
            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
        )


def _wait(proc, log, timeout=240):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"job did not finish within {timeout} s:\n{pathlib.Path(log).read_text()[-3000:]}")


def _checkpoint_dirs(workdir):
    return list(pathlib.Path(workdir).glob("runs/*/checkpoints"))


def _steps(ckpt_dir):
    # Orbax finalises a step by renaming its temporary directory to "<step>".
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def _record(workdir):
    (path,) = pathlib.Path(workdir).glob("results/*.json")
    return json.loads(path.read_text())


def _final_state(ckpt_dir, step):
    from bob_jax.checkpoint import Checkpointer

    with Checkpointer(ckpt_dir, async_save=False) as ckpt:
        state, _ = ckpt.restore(step)
    return [np.asarray(x) for x in state["leaves"]]


def test_sigterm_mid_finetune_checkpoints_exits_143_and_the_rerun_matches(tmp_path):
    total = STEPS_PER_EPOCH * EPOCHS
    cache = tmp_path / "xla"  # the later runs reuse the victim's compilations
    victim_wd, victim_log = tmp_path / "wd", tmp_path / "victim.log"
    victim = _start(victim_wd, victim_log, cache, "--step_sleep=0.2")
    deadline = time.monotonic() + 180
    while not any(_steps(d) for d in _checkpoint_dirs(victim_wd)):  # training is under way
        if victim.poll() is not None or time.monotonic() > deadline:
            victim.kill()
            victim.wait()
            pytest.fail(f"no checkpoint before the job ended or 180 s passed:\n{victim_log.read_text()[-3000:]}")
        time.sleep(0.02)
    victim.send_signal(signal.SIGTERM)
    assert _wait(victim, victim_log, timeout=60) == preemption.EXIT_STATUS, victim_log.read_text()[-3000:]
    log = victim_log.read_text()
    m = re.search(r"preempted at step (\d+) \(SIGTERM\); checkpoint saved in (\S+); rerun the same command", log)
    assert m, log[-3000:]
    stopped, (ckpt_dir,) = int(m.group(1)), _checkpoint_dirs(victim_wd)
    assert pathlib.Path(m.group(2)) == ckpt_dir.resolve()
    assert STEPS_PER_EPOCH <= stopped < total and max(_steps(ckpt_dir)) == stopped
    assert not list(victim_wd.glob("results/*.json"))  # no record for an unfinished run

    # The same command resumes; an uninterrupted run (another workdir) runs alongside for comparison.
    resumed = _start(victim_wd, tmp_path / "resumed.log", cache)
    reference = _start(tmp_path / "ref", tmp_path / "ref.log", cache)
    assert _wait(resumed, tmp_path / "resumed.log") == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert _wait(reference, tmp_path / "ref.log") == 0, (tmp_path / "ref.log").read_text()[-3000:]
    got, want = _record(victim_wd), _record(tmp_path / "ref")
    assert got["key"] == want["key"]
    assert got["train"]["resumed_from"] == stopped and got["train"]["steps"] == total
    assert want["train"]["resumed_from"] == 0
    # Bitwise: per-step keys are fold_in(seed, step) and the data iterator state is checkpointed.
    assert got["metrics"] == want["metrics"]
    assert got["metrics_per_example"] == want["metrics_per_example"]
    (ref_ckpt,) = _checkpoint_dirs(tmp_path / "ref")
    for a, b in zip(_final_state(ckpt_dir, total), _final_state(ref_ckpt, total), strict=True):
        np.testing.assert_array_equal(a, b)
