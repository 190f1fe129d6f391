"""The detection job end to end through the CLI: configs/detection.py, synthetic data written on first use,
training, COCO evaluation on the test split and the shifted twin, records in the results store, the
report, and skip-on-rerun."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = (
    "--config.model.image_size=64",
    "--config.model.neck_channels=32",
    "--config.model.box_head_fc_dim=64",
    "--config.model.mask_head_convs=1",
    "--config.model.mask_head_conv_dim=16",
    "--config.model.rpn_pre_nms_topk=(64, 64)",
    "--config.model.rpn_post_nms_topk=(32, 32)",
    "--config.model.roi_batch_size_per_image=16",
    "--config.model.detections_per_image=10",
    "--config.dataset.num_train=4",
    "--config.dataset.num_test=3",
    "--config.train.steps=2",
    "--config.train.batch_size=2",
    "--config.train.num_threads=1",
    "--config.eval_batch_size=4",
    "--config.progress=False",
)


def _main(workdir, *args, timeout=600):
    # One CPU device; XLA's optimisation passes are skipped (a few steps on tiny arrays: compile time
    # dominates).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}
    cache = os.environ.get("BOB_JAX_TEST_COMPILATION_CACHE", "")
    return subprocess.run(
        [sys.executable, "-m", "bob_jax.main", f"--workdir={workdir}", f"--compilation_cache={cache}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )


def _records(workdir) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (workdir / "results").glob("*.json")),
                  key=lambda r: (r["backbone"], r["task"], r["dataset"]))


def _check_records(records, backbone, head, trunk):
    tasks = {"detection", "ood_detection"} | ({"instance_segmentation"} if head != "cascade_rcnn" else set())
    mine = [r for r in records if r["backbone"] == backbone and r["dataset"].endswith(f"/{head}/{trunk}")]
    assert {r["task"] for r in mine} == tasks
    for r in mine:
        assert r["protocol"] == "local" and r["primary_metric"] == "AP" and r["input_size"] == 64
        assert set(r["metrics"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert all(v is None or 0.0 <= v <= 1.0 for v in r["metrics"].values())
        assert r["num_eval"] == 3 and r["train"]["steps"] == 2 and r["num_params"] > 1_000_000
        assert r["hparams"]["model"]["head"] == head and r["hparams"]["train"]["protocol"] == trunk
        assert r["environment"]["packages"]["jax"]
        expected = "synthetic_shapes~shifted" if r["task"] == "ood_detection" else "synthetic_shapes"
        assert r["dataset"] == f"{expected}/{head}/{trunk}"
        assert r["split"] == ("train->shifted" if r["task"] == "ood_detection" else "train->test")
    ood = next(r for r in mine if r["task"] == "ood_detection")
    clean = next(r for r in mine if r["task"] == "detection")
    assert ood["metrics"]["clean_AP"] == clean["metrics"]["AP"]
    return mine


def test_detection_cli_end_to_end_and_rerun(tmp_path):
    args = ("--config=configs/detection.py", *TINY)
    out = _main(tmp_path, *args)
    assert out.returncode == 0, out.stderr[-4000:]
    records = _records(tmp_path)
    _check_records(records, "tf_efficientnet_lite0.offline", "mask_rcnn", "frozen")
    assert len(records) == 3
    data = tmp_path / "data" / "synthetic_shapes"
    assert {p.name for p in data.iterdir()} == {"train", "test", "shifted"}
    assert len(list((data / "shifted" / "images").glob("*.png"))) == 3
    assert (tmp_path / "report" / "ranking.md").is_file()
    assert "detection" in (tmp_path / "report" / "ranking.md").read_text()

    # A rerun skips the finished records; the missing OOD record is evaluated again from the finished
    # training checkpoint (no training), with the clean AP read back from the store.
    ood = next(r for r in records if r["task"] == "ood_detection")
    (tmp_path / "results" / f"{ood['key']}.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").glob("*.json")}
    again = _main(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") == 2
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    redone = next(r for r in _records(tmp_path) if r["task"] == "ood_detection")
    assert redone["train"]["resumed_from"] == 2 and redone["metrics"] == ood["metrics"]


@pytest.mark.slow
def test_detection_cli_hierarchical_and_plain_vit_backbones(tmp_path):
    """Lite0 (FPN) and ViT-S (ViTDet trunk + simple pyramid), Mask R-CNN and Cascade Mask R-CNN, one
    workdir: every record lands in one store and one report."""
    runs = [
        ("tf_efficientnet_lite0.offline", "cascade_mask_rcnn", "finetune", "tf_efficientnet_lite0.offline"),
        ("vit_small_patch16_224.augreg_in1k@random", "mask_rcnn", "finetune",
         "vit_small_patch16_224.augreg_in1k@random"),
        ("vit_small_patch16_224.augreg_in1k@random", "cascade_rcnn", "frozen",
         "vit_small_patch16_224.augreg_in1k@random"),
    ]
    for backbone, head, trunk, _ in runs:
        out = _main(tmp_path, f"--config=configs/detection.py:backbone={backbone},head={head},protocol={trunk}",
                    *TINY, "--config.model.window_size=4")
        assert out.returncode == 0, out.stderr[-4000:]
    records = _records(tmp_path)
    for _, head, trunk, label in runs:
        _check_records(records, label, head, trunk)
    assert len(records) == 3 + 3 + 2
    ranking = (tmp_path / "report" / "ranking.md").read_text()
    assert "vit_small_patch16_224.augreg_in1k@random" in ranking and "tf_efficientnet_lite0.offline" in ranking


def _detection_config_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("detection_config", ROOT / "configs" / "detection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_presets_and_bad_args_are_named(tmp_path):
    detection = _detection_config_module()

    with pytest.raises(ValueError, match="recipe"):
        detection.get_config("recipe=full")
    with pytest.raises(ValueError, match="test_dataset"):
        detection.get_config("test_dataset=coco:a.json:b")
    bob = detection.get_config("recipe=bob,head=cascade_mask_rcnn,protocol=finetune")
    assert bob.protocol == "bob" and bob.model.image_size == 1024 and bob.train.lr == 1e-4
    assert bob.train.steps == 0 and bob.train.epochs == 36 and bob.model.cascade_style == "mmdet"
    local = detection.get_config(None)
    assert local.protocol == "local" and local.model.head == "mask_rcnn" and local.train.protocol == "frozen"

    from bob_jax.detection import job

    assert job.train_config(bob, num_train=118_287).steps == 266_146  # 36 epochs of COCO at batch 16
    with pytest.raises(ValueError, match="coco:<annotations.json>:<image_dir>"):
        job.load_datasets(detection.get_config("dataset=voc:/x").dataset, tmp_path, with_masks=True,
                          image_size=64)


def test_coco_format_datasets_with_a_category_selection(tmp_path):
    """The real-data path (`coco:<json>:<dir>`), here on written synthetic sets: names, splits, the class
    selection shared by train and evaluation sets, and the errors that name the fix."""
    from bob_jax.detection import job
    from bob_jax.detection.synthetic import write_coco_dataset

    specs = {}
    for split, shift in (("train", False), ("val", False), ("night", True)):
        ann, images = write_coco_dataset(tmp_path, split, 3, seed=0, size=64, shift=shift)
        specs[split] = f"coco:{ann}:{images}"
    cfg = _detection_config_module().get_config(
        f"dataset={specs['train']},test_dataset={specs['val']},ood_dataset={specs['night']},categories=circle+star"
    ).dataset
    train, test, ood = job.load_datasets(cfg, tmp_path, with_masks=True, image_size=64)
    assert train.source.class_names == test.source.class_names == ood.source.class_names == ("circle", "star")
    assert train.source.filter_empty and not test.source.filter_empty
    assert (train.name, test.name, ood.name) == ("train", "train", "train~night")
    assert (train.split, test.split, ood.split) == ("train", "val", "ood")

    cfg.test, cfg.ood = "", ""
    with pytest.raises(ValueError, match="dataset.test and/or dataset.ood"):
        job.load_datasets(cfg, tmp_path, with_masks=True, image_size=64)
    # an evaluation set whose classes differ from the training set's (no "star" category)
    ann, images = write_coco_dataset(tmp_path, "other", 2, seed=0, size=64)
    coco = json.loads(ann.read_text())
    coco["categories"] = [c for c in coco["categories"] if c["name"] != "star"]
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != 5]
    ann.write_text(json.dumps(coco))
    cfg.test, cfg.category_names = f"coco:{ann}:{images}", ()
    with pytest.raises(ValueError, match="category_names"):
        job.load_datasets(cfg, tmp_path, with_masks=True, image_size=64)
    cfg.category_names = ("circle", "square")
    train, test, _ = job.load_datasets(cfg, tmp_path, with_masks=True, image_size=64)
    assert train.source.num_classes == test.source.num_classes == 2
