"""The revisited retrieval protocol through the battle job: a generated ROxford layout (tiny JPEGs and a
revisitop ground-truth pickle), a random CLIP ResNet at 32 px whose original descriptor is the projected
embedding ("logits", built with the head the job's trunk model drops), only the evaluation source opened."""

import json
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
from PIL import Image

from bob_jax.data.sources import get_source
from bob_jax.evaluate.retrieval import revisited_retrieval

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _layout(data_dir: pathlib.Path):
    rng = np.random.default_rng(0)
    folder = data_dir / "roxford5k"
    (folder / "jpg").mkdir(parents=True)
    imlist, qimlist = [f"oxford_{i:03d}" for i in range(8)], [f"query_{i}" for i in range(3)]
    for name in imlist + qimlist:
        image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / "jpg" / f"{name}.jpg")
    gnd = [
        {"easy": np.array([0, 1]), "hard": np.array([2]), "junk": np.array([3]), "bbx": [1, 2, 30, 35]},
        {"easy": [4], "hard": [5], "junk": [], "bbx": [0.0, 0.0, 20.0, 20.0]},
        {"easy": [], "hard": [6, 7], "junk": [0], "bbx": [5.0, 5.0, 40.0, 38.0]},
    ]
    with open(folder / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)


def _main(workdir, *args, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    cache = os.environ.get("BOB_JAX_TEST_COMPILATION_CACHE", "")
    return subprocess.run(
        [sys.executable, "-m", "bob_jax.main", f"--workdir={workdir}", f"--compilation_cache={cache}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_revisited_retrieval_through_the_job(tmp_path):
    _layout(tmp_path / "data")
    args = (
        (
            "--config=configs/battle.py:backbones=resnet50_clip.openai@random,dataset=revisited:roxford5k,"
            "train_size=0,test_size=0,input_size=32,tasks=retrieval"
        ),
        f"--config.dataset.data_dir={tmp_path / 'data'}",
        "--config.dataset.test_split=bob",  # no train split exists: the job must not open one
        "--config.retrieval.protocol=revisited",
        "--config.progress=False",
    )
    out = _main(tmp_path / "wd", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "wd" / "results").glob("*.json")]
    assert (record["task"], record["dataset"], record["split"]) == ("retrieval", "revisited:roxford5k", "bob")
    assert record["primary_metric"] == "mAP_medium"
    hp = record["hparams"]
    assert hp["task"]["protocol"] == "revisited" and hp["task"]["descriptor"] == "bob"
    assert hp["output"] == "logits" and record["feature_dim"] == 1024  # CLIP RN50's embedding width
    assert hp["train_source"] is None
    assert hp["test_source"]["queries"] == {"crop_to_bbx": False, "thumbnail": 224}
    metrics = record["metrics"]
    assert (metrics["num_database"], metrics["num_queries"]) == (8, 3)
    difficulties = ("easy", "medium", "hard")
    assert all(f"{m}_{d}" in metrics for m in ("mAP", "P@1", "P@5", "P@10", "MRR") for d in difficulties)
    # The record is the evaluation of the features the job extracted (database rows first, then queries).
    (cached,) = list((tmp_path / "wd" / "features").glob("*.npz"))
    with np.load(cached) as f:
        feats, labels = f["features"], f["labels"]
    np.testing.assert_array_equal(labels, [0] * 8 + [1] * 3)
    source = get_source("revisited:roxford5k", "bob", data_dir=tmp_path / "data")
    expected, per_query = revisited_retrieval(feats[8:], feats[:8], source.gnd)
    for name, value in expected.items():
        assert metrics[name] == value or abs(metrics[name] - value) < 1e-12, name
    assert record["metrics_per_example"] == [float(v) for v in per_query["AP_medium"]]
