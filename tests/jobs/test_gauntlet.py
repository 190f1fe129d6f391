"""Task configs, config sets, OOD shifts, head re-initialisation and sweeps through the job."""

import importlib.util
import json
import pathlib
import textwrap

import numpy as np
import pytest

from bob_jax import backbones, config_sets, sweep, trained
from bob_jax.battle import parse_backbone
from bob_jax.config_lib import expand_tasks

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_task_presets_expand_in_order_without_duplicates():
    assert expand_tasks("frozen") == ("linear_probe", "knn", "retrieval")
    assert expand_tasks("ood") == ("finetune", "ood")
    assert expand_tasks("finetune+ood+knn") == ("finetune", "ood", "knn")
    assert expand_tasks(("knn", "frozen")) == ("knn", "linear_probe", "retrieval")


@pytest.mark.parametrize("task", ["linear_probe", "knn", "retrieval", "finetune", "ood"])
def test_task_configs_and_backbone_configs_combine(task):
    config = _load(ROOT / "configs" / "tasks" / f"{task}.py").get_config("dataset=digits,train_size=50")
    assert config.tasks == expand_tasks(task) and config.dataset.name == "digits"
    assert config.protocol == "local"
    swin = _load(ROOT / "configs" / "swin.py").get_config(f"task={task},dataset=cifar100,train_size=0,"
                                                          "test_size=0,input_size=0")
    assert swin.tasks == expand_tasks(task) and swin.dataset.name == "cifar100"
    assert swin.protocol == "bob" and swin.finetune.epochs == 100  # the original's recipe
    with pytest.raises(AttributeError):
        swin.finetune.epoch = 3  # locked: a typo is an error


def test_config_sets_pick_per_task_checkpoints_only_in_bob():
    zoo = set(backbones.list_backbones())
    for pool_name, choices in config_sets.POOL.items():
        assert set(choices.values()) <= zoo, pool_name
    assert config_sets.checkpoint("vit_base_in1k", "finetune", "bob") == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert config_sets.checkpoint("vit_base_in1k", "retrieval", "bob") == "vit_base_patch16_224.augreg_in1k"
    assert config_sets.checkpoint("resnet50", "detection", "bob") == "resnet50.tv_in1k"
    for task in ("finetune", "retrieval", "detection"):
        assert config_sets.checkpoint("vit_base_in1k", task, "consistent") == "vit_base_patch16_224.augreg_in1k"
    assert config_sets.normalization("linear_probe", "bob") == "imagenet"
    assert config_sets.normalization("linear_probe", "consistent") == "backbone"
    with pytest.raises(ValueError, match="config_set"):
        config_sets.checkpoint("resnet50", "knn", "paper")
    with pytest.raises(ValueError, match="unknown pool backbone"):
        config_sets.checkpoint("resnet5O", "knn", "bob")


def test_backbone_labels_and_weights():
    assert parse_backbone("resnet50.a1_in1k") == ("resnet50.a1_in1k", "pretrained", "resnet50.a1_in1k")
    assert parse_backbone("vit_base_in1k=vit_base_patch16_224.augreg_in1k") == (
        "vit_base_patch16_224.augreg_in1k", "pretrained", "vit_base_in1k")
    assert parse_backbone("r50=resnet50.a1_in1k@none") == ("resnet50.a1_in1k", None, "r50@random")
    assert parse_backbone("resnet50.a1_in1k@/w/r.pth")[2] == "resnet50.a1_in1k@r.pth"


def test_ood_shift_specs():
    s = trained.parse_shift("gaussian_noise@3")
    assert (s.corruption, s.severity, s.dataset) == ("gaussian_noise", 3, None)
    s = trained.parse_shift("imagenet_v2/matched-frequency")
    assert (s.dataset, s.split, s.corruption) == ("imagenet_v2/matched-frequency", "test", None)
    s = trained.parse_shift("folder:/data/visda/real[val]")
    assert (s.dataset, s.split) == ("folder:/data/visda/real", "val")
    for bad, needle in [("snow@3", "unknown corruption"), ("contrast@9", "severity"), ("", "empty")]:
        with pytest.raises(ValueError, match=needle):
            trained.parse_shift(bad)


def test_imagenet_r_shift_masks_logits_and_maps_labels(monkeypatch):
    from bob_jax.data import sources
    from bob_jax.data.imagenet_ood_classes import valid_class_indices

    class Fake:
        num_classes = 1000

    monkeypatch.setattr(sources, "get_source", lambda name, split, data_dir=None: Fake())
    src, subset, label_map = trained.shifted_source(trained.parse_shift("imagenet_r"), None, seed=0, data_dir=None)
    idx = valid_class_indices("imagenet_r")
    np.testing.assert_array_equal(subset, idx)
    np.testing.assert_array_equal(label_map(idx[[0, 5, 199]]), [0, 5, 199])


def test_finetune_config_rejects_unknown_fields():
    config = _load(ROOT / "configs" / "tasks" / "finetune.py").get_config(None)
    ft = trained.finetune_config(config.finetune, 48)
    assert ft.input_size == 48 and ft.epochs == 3  # the local recipe, at the job's input size
    with config.finetune.unlocked():
        config.finetune.lrr = 1.0
    with pytest.raises(ValueError, match="lrr"):
        trained.finetune_config(config.finetune, 0)


def test_head_reinit_is_xavier_normal_and_leaves_the_trunk():
    from flax import nnx

    from bob_jax.tasks.finetune import finetune_model

    ref = backbones.create("resnet50.a1_in1k", seed=3, num_classes=100)
    model = finetune_model("resnet50.a1_in1k", None, 100, seed=3)
    kernel = np.asarray(model.fc.kernel[...], np.float64)
    assert abs(kernel.std() / np.sqrt(2 / (2048 + 100)) - 1) < 0.02 and abs(kernel.mean()) < 1e-3
    assert not np.any(np.asarray(model.fc.bias[...]))
    trunk = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if p[0] != "fc"]
    ref_flat = dict(nnx.to_flat_state(nnx.state(ref, nnx.Param)))
    assert all(np.array_equal(v[...], ref_flat[p][...]) for p, v in trunk)


def test_sweep_files_enumerate_valid_grids():
    grid = sweep.load_sweep(str(ROOT / "configs/sweeps/bob.py"))
    zoo = set(backbones.list_backbones())
    assert len(grid) >= 10
    for _, config in grid:
        assert {parse_backbone(b)[0] for b in config.backbones} <= zoo
    consistent = dict(sweep.load_sweep(str(ROOT / "configs/sweeps/bob.py") + ":config_set=consistent"))
    bob = dict(grid)
    assert bob["finetune/cifar100/lr=0.001"].backbones != consistent["finetune/cifar100/lr=0.001"].backbones
    assert bob["linear_probe/cifar100"].normalization == "imagenet"
    assert consistent["linear_probe/cifar100"].normalization == "backbone"
    assert bob["ood/imagenet2012/lr=0.001"].ood.shifts[0] == "imagenet_a"
    local = sweep.load_sweep(str(ROOT / "configs/sweeps/bob.py") + ":local=true,lrs=1e-3+5e-4")
    assert local[0][1].tasks == ("linear_probe", "linear_multihead", "knn", "retrieval")
    assert [n for n, _ in local] == ["frozen/fashion_mnist", "multilabel/shapes", "ood/fashion_mnist/lr=0.001",
                                     "ood/fashion_mnist/lr=0.0005"]


def test_sweep_runs_finetune_and_ood_skips_finished_and_survives_a_bad_run(tmp_path, capsys):
    sweep_file = tmp_path / "tiny.py"
    sweep_file.write_text(textwrap.dedent("""
        from bob_jax.config_lib import battle_config, lock

        def get_sweep(arg=None):
            good = battle_config(backbones=("tf_efficientnet_lite0.offline@random",), dataset="digits",
                                 train_size=64, test_size=40, input_size=32, tasks=("finetune", "ood"))
            good.finetune.epochs, good.finetune.warmup_epochs, good.finetune.batch_size = 1, 0, 32
            good.ood.shifts = ("gaussian_noise@5", "rotation@2")
            good.progress = False
            bad = battle_config(backbones=("resnet50.a1_in1k@random",), dataset="tfds:no_such_dataset",
                                tasks=("knn",))
            return [("good", lock(good)), ("bad", lock(bad))]
    """))
    assert sweep.main([f"--sweep={sweep_file}", f"--workdir={tmp_path / 'wd'}"]) == 1
    out = capsys.readouterr().out
    assert "1 run(s) finished, 1 failed" in out and "no_such_dataset" in out
    records = [json.loads(p.read_text()) for p in (tmp_path / "wd" / "results").glob("*.json")]
    by_task = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    assert len(by_task["finetune"]) == 1 and len(by_task["ood"]) == 2
    clean = by_task["finetune"][0]
    assert clean["protocol"] == "local" and clean["train"]["steps"] == 2
    for r in by_task["ood"]:
        assert r["metrics"]["clean_top1"] == clean["metrics"]["top1"]
        assert r["dataset"] in ("digits~gaussian_noise@5", "digits~rotation@2")
        assert r["hparams"]["finetune_key"] == clean["key"] and r["num_eval"] == 40
        assert r["hparams"]["ood_source"]["shift"]["corruption"] in ("gaussian_noise", "rotation")
    assert (tmp_path / "wd" / "report" / "ranking.md").exists()
    # Rerun: everything finished is skipped, nothing is trained again.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "wd" / "results").glob("*.json")}
    assert sweep.main([f"--sweep={sweep_file}", f"--workdir={tmp_path / 'wd'}", "--only=good"]) == 0
    assert "finished earlier" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "wd" / "results").glob("*.json")}
