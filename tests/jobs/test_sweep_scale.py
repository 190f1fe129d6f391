"""Sweeps at scale: --shard, SLURM job-array emission, kill and resume, preemption stops the sweep."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from bob_jax import preemption, sweep

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Three runs of the battle job on the embedded digits set with one random-init backbone at 32 px, frozen
# tasks only: features are extracted by the first run and read from the feature cache by the others.
TINY_SWEEP = textwrap.dedent("""
    from bob_jax.config_lib import battle_config, lock


    def _job(task, **settings):
        c = battle_config(backbones=("tf_efficientnet_lite0.offline@random",), dataset="digits", train_size=120,
                          test_size=60, input_size=32, tasks=(task,))
        c.progress = False
        for key, value in settings.items():
            c[task][key] = value
        return lock(c)


    def get_sweep(arg=None):
        return [("knn/k=5", _job("knn", k=5)), ("knn/k=10", _job("knn", k=10)), ("retrieval", _job("retrieval"))]
""")


@pytest.fixture
def sweep_file(tmp_path):
    path = tmp_path / "tiny_sweep.py"
    path.write_text(TINY_SWEEP)
    return path


@pytest.mark.parametrize("total", [0, 1, 3, 7, 12])
def test_shard_splits_the_grid_without_overlap_or_gaps(total):
    runs = [(f"run{j}", None) for j in range(total)]
    for n in range(1, 6):
        parts = [sweep.shard(runs, i, n) for i in range(n)]
        names = [name for part in parts for name, _ in part]
        assert sorted(names) == sorted(r[0] for r in runs) and len(names) == len(set(names))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        for i, part in enumerate(parts):  # deterministic: run j goes to shard j % n
            assert [name for name, _ in part] == [f"run{j}" for j in range(total) if j % n == i]


@pytest.mark.parametrize("spec,needle", [
    ("3/3", "must lie in 0..2"), ("-1/2", "must lie in 0..1"), ("1/0", "at least 1"), ("a/b", "write it as i/n"),
    ("2", "write it as i/n"), ("", "write it as i/n"),
])
def test_bad_shard_specs_are_named(spec, needle):
    with pytest.raises(ValueError, match=needle):
        sweep.parse_shard(spec)
    assert sweep.parse_shard(" 2 / 5 ") == (2, 5)


def test_dry_run_lists_only_the_shard_and_bad_arguments_exit_2(sweep_file, tmp_path, capsys):
    assert sweep.main([f"--sweep={sweep_file}", f"--workdir={tmp_path}", "--shard=1/2", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "1: knn/k=10" in out and "knn/k=5" not in out and "retrieval" not in out
    assert "shard 1/2: 1 of 3 run(s)" in out
    for args, needle in [(["--shard=2/2"], "must lie in 0..1"), (["--emit_slurm=x.sbatch"], "needs --shards"),
                         (["--shards=3"], "goes with --emit_slurm"),
                         (["--emit_slurm=x.sbatch", "--shards=2", "--shard=0/2"], "drop --shard")]:
        assert sweep.main([f"--sweep={sweep_file}", f"--workdir={tmp_path}", *args]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "x.sbatch").exists()


# A stand-in for the sweep in the emitted script: FAKE_MODE=preempt exits 143 on USR1 after a moment (the
# checkpoint), die does not handle USR1 (a frozen run ends by the signal), ok / fail exit 0 / 1 at once.
_FAKE_PYTHON = """#!/bin/bash
echo "args: $*"
case "$FAKE_MODE" in
  preempt) trap 'sleep 0.2; exit 143' USR1 ;;
  ok) exit 0 ;;
  fail) exit 1 ;;
esac
touch "$READY"
for i in $(seq 300); do sleep 0.1; done
exit 0
"""


@pytest.mark.parametrize("mode,warn,status,restarts,requeued", [
    ("preempt", True, 143, "0", True), ("die", True, 128 + signal.SIGUSR1, "0", True), ("ok", False, 0, "0", False),
    ("fail", False, 1, "0", False), ("preempt", True, 143, "20", False),  # BOB_JAX_MAX_REQUEUES (20) reached
])
def test_emitted_slurm_array_script(sweep_file, tmp_path, mode, warn, status, restarts, requeued):
    script = tmp_path / "sweep.sbatch"
    workdir = tmp_path / "store"
    assert sweep.main([f"--sweep={sweep_file}", f"--workdir={workdir}", f"--emit_slurm={script}", "--shards=4",
                       "--only=knn|retrieval"]) == 0
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    for line in ("#SBATCH --array=0-3\n", "#SBATCH --requeue\n", "#SBATCH --signal=B:USR1@120\n",
                 f"#SBATCH --output={workdir.resolve()}/slurm/%A_%a.out\n"):
        assert line in text
    assert (workdir / "slurm").is_dir()  # SLURM does not create the log directory itself

    # Run it as SLURM would run array task 2, with a fake interpreter and a fake scontrol.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "fake_python").write_text(_FAKE_PYTHON)
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "$*" >> "$SCONTROL_LOG"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "fake_python"),
           "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_JOB_ID": "77", "SLURM_RESTART_COUNT": restarts, "FAKE_MODE": mode,
           "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "READY": str(tmp_path / "ready")}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if warn:  # SLURM's --signal=B:USR1@120 signals the batch shell only
        deadline = time.monotonic() + 20
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == status, out
    assert (f"-m bob_jax.sweep --sweep={sweep_file.resolve()} --workdir={workdir.resolve()} --shard=2/4 "
            "--only=knn|retrieval") in out
    log = tmp_path / "scontrol.log"
    assert (log.read_text() if log.exists() else "") == ("requeue 77_2\n" if requeued else "")


def test_preempted_run_stops_the_sweep_and_failures_do_not(sweep_file, tmp_path, monkeypatch, capsys):
    from bob_jax import battle

    calls = []

    def fake_run(config, workdir, console=None, report=True):
        calls.append(config.tasks[0] + str(config.knn.k))
        if len(calls) == 1:
            raise ValueError("dataset needs a manual download")  # an ordinary failure: the sweep goes on
        raise preemption.Preempted(7, "/store/runs/abc/checkpoints", "SIGUSR1")

    monkeypatch.setattr(battle, "run", fake_run)
    assert sweep.main([f"--sweep={sweep_file}", f"--workdir={tmp_path}", "--compilation_cache="]) == 143
    assert calls == ["knn5", "knn10"]  # the third run never started
    captured = capsys.readouterr()
    assert "knn/k=5 FAILED: ValueError: dataset needs a manual download" in captured.out
    assert ("preempted at step 7 (SIGUSR1); checkpoint saved in /store/runs/abc/checkpoints; rerun the same "
            "command to resume; the sweep stopped there") in captured.err


def _records(workdir):
    return {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (workdir / "results").glob("*.json")}


def _sweep(sweep_file, workdir, cache, log, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "bob_jax.sweep", f"--sweep={sweep_file}", f"--workdir={workdir}",
             f"--compilation_cache={cache}", *args],
            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
        )


def _finish(proc, log, timeout=240):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"sweep did not finish within {timeout} s:\n{pathlib.Path(log).read_text()[-3000:]}")
    return proc.returncode


def test_killed_sweep_is_finished_by_two_shards_that_redo_only_what_is_missing(sweep_file, tmp_path):
    workdir, cache = tmp_path / "store", tmp_path / "xla"
    first = _sweep(sweep_file, workdir, cache, tmp_path / "first.log")
    deadline = time.monotonic() + 240
    while not list((workdir / "results").glob("*.json")):
        if first.poll() is not None or time.monotonic() > deadline:
            first.kill()
            first.wait()
            pytest.fail(f"no record before the sweep ended or 240 s:\n{(tmp_path / 'first.log').read_text()[-3000:]}")
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=30) == -signal.SIGKILL
    before = _records(workdir)
    assert len(before) == 1, "the first run's record only: the sweep was killed right after writing it"

    # The rest is finished by two shards at once, writing into the same store.
    logs = [tmp_path / f"shard{i}.log" for i in range(2)]
    shards = [_sweep(sweep_file, workdir, cache, logs[i], f"--shard={i}/2") for i in range(2)]
    assert [_finish(p, log) for p, log in zip(shards, logs, strict=True)] == [0, 0], \
        "\n".join(log.read_text()[-2000:] for log in logs)
    shard0, shard1 = (log.read_text() for log in logs)
    after = _records(workdir)
    assert len(after) == 3
    assert {k: after[k] for k in before} == before  # untouched: same bytes, same mtime
    # Shard 0 has runs 0 and 2: it skips the finished knn/k=5 and does retrieval; shard 1 does knn/k=10.
    assert "shard 0/2: 2 of 3 run(s)" in shard0 and "shard 1/2: 1 of 3 run(s)" in shard1
    assert "knn: finished earlier" in shard0 and "[1/2] knn/k=5: done" in shard0
    assert "every record existed, skipped" in shard0 and "[2/2] retrieval: done" in shard0
    assert "[1/1] knn/k=10: done" in shard1 and "1 new record(s)" in shard1 and "finished earlier" not in shard1
    # Whichever shard wrote the report last saw every record (the report is written under a lock).
    ranking = json.loads((workdir / "report" / "ranking.json").read_text())
    assert sum(n for s in ranking["settings"].values() for n in s["num_records"].values()) == 3
    assert "Records: 3 from results store" in (workdir / "report" / "ranking.md").read_text()
