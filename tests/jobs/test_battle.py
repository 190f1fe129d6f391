"""The main job end to end (CLI, config locking, results store, skip-on-rerun, report)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL = (
    "--config=configs/battle.py:dataset=digits,train_size=120,test_size=60,input_size=32",
    "--config.linear_probe.epochs=2",
    "--config.linear_probe.warmup_epochs=1",
    "--config.linear_probe.batch_size=32",
    "--config.progress=False",
)


def _main(workdir, *args, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    cache = os.environ.get("BOB_JAX_TEST_COMPILATION_CACHE", "")
    return subprocess.run(
        [sys.executable, "-m", "bob_jax.main", f"--workdir={workdir}", f"--compilation_cache={cache}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_battle_cli_end_to_end(tmp_path):
    out = _main(tmp_path, *SMALL)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")]
    assert len(records) == 9  # 3 backbones x 3 tasks
    for r in records:
        assert r["input_size"] == 32 and r["protocol"] == "local" and r["dataset"] == "digits"
        assert r["hparams"]["train_source"]["subset"]["n"] == 120
        assert r["environment"]["packages"]["jax"] and "git_commit" in r["environment"]
        assert 0.0 <= r["metrics"][r["primary_metric"]] <= 1.0
        assert r["num_params"] > 1_000_000
        if r["task"] in ("knn", "retrieval"):  # per-example primary metric, for bootstrap intervals
            per = [v for v in r["metrics_per_example"] if v is not None]
            assert len(r["metrics_per_example"]) == 60
            assert abs(sum(per) / len(per) - r["metrics"][r["primary_metric"]]) < 1e-9
    report = tmp_path / "report"
    assert (report / "ranking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (report / "ranking.md").read_text()
    assert "tf_efficientnet_lite0.offline" in md and "resnet50.a1_in1k@random" in md
    assert len((report / "ranking.csv").read_text().strip().splitlines()) == 4
    assert "Battle of the Backbones ranking" in out.stdout

    # A second run skips every finished (backbone, task) and does not touch the records.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").glob("*.json")}
    again = _main(tmp_path, *SMALL)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") == 9
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "results").glob("*.json")}


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--config=configs/battle.py", "--config.linear_probe.epoch=3"), "epoch"),
        (("--config=configs/battle.py:datset=digits",), "datset"),
        (("--config=configs/battle.py:backbones=nope.x@random,dataset=digits",), "nope"),
    ],
)
def test_config_mistakes_are_named(tmp_path, args, needle):
    out = _main(tmp_path, *args, timeout=120)
    assert out.returncode != 0
    assert needle in out.stderr


def test_every_config_builds():
    sys.path.insert(0, str(ROOT))
    import importlib.util

    for path in sorted((ROOT / "configs").glob("*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(None)
        if config.job == "battle":
            assert config.backbones
        else:  # configs/detection.py: one backbone per run
            assert config.job == "detection" and config.backbone
        with pytest.raises(AttributeError):
            config.not_a_key = 1  # locked


def test_missing_pretrained_weights_stop_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    out = _main(tmp_path / "wd", "--config=configs/resnet.py", timeout=120)
    assert out.returncode != 0
    assert "timm/resnet50.a1_in1k" in out.stderr and "weights=" in out.stderr
    assert not (tmp_path / "wd" / "results").exists() and not (tmp_path / "wd" / "features").exists()
