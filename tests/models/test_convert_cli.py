"""`python -m converters.convert`: Orbax checkpoint + manifest, loadable with create(name, weights=DIR)."""

import json
import pathlib
import sys

import numpy as np
import pytest

from bob_jax import backbones
from bob_jax.backbones import converted

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from converters import convert  # noqa: E402


def test_convert_writes_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "lite0"
    assert convert.main(["--model", "tf_efficientnet_lite0.offline", "--out", str(out), "--size", "64"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_sha256"].startswith("57934424") and manifest["num_leaves"] > 200
    model = backbones.create("tf_efficientnet_lite0.offline", weights=out)
    logits = np.asarray(backbones.forward(model, converted.fixed_input(64))["logits"])
    np.testing.assert_array_equal(logits, np.asarray(manifest["reference_values"], np.float32))
    # Stochastic depth adds no variables: the same directory loads with drop path, unchanged in eval mode.
    dropping = backbones.create("tf_efficientnet_lite0.offline", weights=out, drop_path_rate=0.2)
    assert dropping.cfg.drop_path_rate == 0.2
    dropping_logits = backbones.forward(dropping, converted.fixed_input(64))["logits"]
    np.testing.assert_array_equal(np.asarray(dropping_logits), logits)
    with pytest.raises(ValueError, match="not 'resnet50.a1_in1k'"):
        backbones.create("resnet50.a1_in1k", weights=out)
    with pytest.raises(ValueError, match="reconvert"):
        backbones.create("tf_efficientnet_lite0.offline", weights=out, num_classes=0)
