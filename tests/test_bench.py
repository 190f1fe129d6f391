"""Tests of `python -m bob_jax.bench` on CPU: tiny runs (ResNet-50 at 32 px, batch 2, 1 repeat), report
files well-formed, the harness free of grain/tfds/ml_collections, analytic FLOPs equal to timm's
published counts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from bob_jax.bench import flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--models", "resnet50.a1_in1k", "--batch", "2", "--size", "32", "--repeats", "1", "--warmup", "1"]

# A sys.meta_path finder that makes the optional data/config stack unimportable.
_BLOCK = textwrap.dedent("""
    import runpy, sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("grain", "tensorflow_datasets", "ml_collections"):
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, Block())
    sys.argv = ["bob_jax.bench"] + sys.argv[1:]
    runpy.run_module("bob_jax.bench", run_name="__main__", alter_sys=True)
    assert not any(m.split(".")[0] in ("grain", "tensorflow_datasets", "ml_collections") for m in sys.modules)
""")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_report(workdir, *, timm: bool = False) -> dict:
    report = json.loads((workdir / "bench.json").read_text())
    assert report["environment"]["versions"]["jax"]
    assert report["environment"]["device_kind"]
    (row,) = report["models"]
    assert "error" not in row, row.get("error")
    assert row["model"] == "resnet50.a1_in1k" and row["batch"] == 2 and row["size"] == 32
    for key in ("jax_img_s", "compile_s", "gflops_per_img", "memory_bytes", "params_m"):
        assert _positive(row[key]), (key, row[key])
    assert row["xla_gflops_per_img"] is None or _positive(row["xla_gflops_per_img"])
    assert abs(row["params_m"] - 25.557) < 0.01
    assert row.get("mfu") is None  # no known peak on CPU
    md = (workdir / "bench.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    assert "jax img/s" in header and "GFLOPs/img" in header
    assert "| resnet50.a1_in1k | 2 | 32 | float32 |" in md
    if timm:
        assert _positive(row["timm_eager_img_s"]) and _positive(row["ratio_vs_best_torch"])
        assert "timm eager img/s" in header
    return report


def test_analytic_flops_match_timm():
    # timm/fvcore: ResNet-50 4.11 GMACs, ViT-B/16 17.58, ViT-S/16 4.61, ConvNeXt-T 4.47, Swin-B 15.47,
    # SwinV2-B@256 20.37, EVA-02-B 23.22, DINOv2-B@224 23.16 (performance.md section 3).
    expected = {
        ("resnet50.a1_in1k", 224): 4.11, ("vit_base_patch16_224.augreg_in1k", 224): 17.58,
        ("vit_small_patch16_224.augreg_in1k", 224): 4.61, ("convnext_tiny.fb_in1k", 224): 4.47,
        ("swin_base_patch4_window7_224.ms_in1k", 224): 15.47, ("swinv2_base_window8_256.ms_in1k", 256): 20.37,
        ("eva02_base_patch14_224.mim_in22k", 224): 23.22,
    }
    for (name, size), gmacs in expected.items():
        got = flops.model_gflops(name, size) / 2
        assert abs(got - gmacs) / gmacs < 0.01, (name, got, gmacs)
    dino = flops.model_gflops("vit_base_patch14_dinov2.lvd142m", 224, {"img_size": 224}) / 2
    assert abs(dino - 23.16) < 0.05
    # FLOPs = 2 x MACs: ResNet-50 about 8.2 GFLOPs.
    assert 8.1 < flops.model_gflops("resnet50.a1_in1k", 224) < 8.3
    # Resolution scaling: the convnet count follows the feature-map area.
    assert flops.model_gflops("resnet50.a1_in1k", 448) == pytest.approx(4 * flops.model_gflops("resnet50.a1_in1k", 224),
                                                                       rel=0.01)


def test_analytic_resnet50_by_hand():
    # Stem conv alone: 112*112*7*7*3*64 MACs; fc: 2048*1000. Removing stages 2-4 changes the count.
    class Cfg:
        layers, num_classes, in_chans = (0, 0, 0, 0), 1000, 3
    assert flops.resnet_macs(Cfg, 224, 224) == 112 * 112 * 49 * 3 * 64 + 64 * 1000


def _traced_macs(name: str, size: int, num_classes: int = 0) -> int:
    """MACs of the convolutions and matmuls in the jaxpr of the bob_jax model, traced abstractly.

    Independent of the closed forms: it counts what the model's code actually executes, from the
    shapes of every `dot_general` (output size x contracted size) and `conv_general_dilated` (output
    size x kernel taps x input channels per group) equation, sub-jaxprs included.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bob_jax.backbones import _abstract, zoo

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            out = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
            if eqn.primitive.name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                total += out * math.prod(eqn.invars[0].aval.shape[d] for d in contract)
            elif eqn.primitive.name == "conv_general_dilated":
                kernel, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec
                total += out * kernel[spec[1]] * math.prod(kernel[d] for d in spec[2:])
            for param in eqn.params.values():
                sub = getattr(param, "jaxpr", param)  # ClosedJaxpr or Jaxpr
                if hasattr(sub, "eqns"):
                    total += count(sub)
        return total

    arch = name.partition(".")[0]
    family = zoo.ARCH_TO_FAMILY[arch]
    kwargs = {**zoo.ZOO[name].default_kwargs(), "num_classes": num_classes}
    if "img_size" in family.arch_kwargs:
        kwargs["img_size"] = size
    graphdef, state = nnx.split(_abstract(family, arch, kwargs))
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return count(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x)["pooled"])(state, x).jaxpr)


# One backbone per family, plus sizes that exercise odd maps (Swin's padded merge, TF 'SAME' rounding),
# a clamped window (Swin at 112: the last stage is smaller than the window) and register tokens.
_TRACED = [
    ("resnet50.a1_in1k", 224), ("vit_small_patch14_reg4_dinov2.lvd142m", 224),
    ("eva02_small_patch14_224.mim_in22k", 224), ("convnext_tiny.fb_in1k", 224),
    ("swin_tiny_patch4_window7_224.ms_in1k", 224), ("swin_tiny_patch4_window7_224.ms_in1k", 112),
    ("swinv2_tiny_window8_256.ms_in1k", 256), ("tf_efficientnet_lite0.in1k", 224),
    ("tf_efficientnet_lite0.in1k", 100), ("resnet50_clip.openai", 224),
]


@pytest.mark.parametrize("name,size", _TRACED)
def test_analytic_gflops_match_traced_model(name, size, monkeypatch):
    import jax

    from bob_jax.backbones import zoo

    # Off CPU, depthwise convs are one conv_general_dilated (on CPU: shifted multiply-adds the counter
    # would not see); tracing never compiles, so claiming a GPU backend here is safe.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    got = flops.analytic_gflops(name, size)
    assert got == pytest.approx(2 * _traced_macs(name, size) / 1e9, rel=1e-12)
    # ... and it is the family's closed form on the config the battle builds (trunk, img_size = size).
    arch = name.partition(".")[0]
    family = zoo.ARCH_TO_FAMILY[arch]
    kwargs = {**zoo.ZOO[name].default_kwargs(), "num_classes": 0}
    if "img_size" in family.arch_kwargs:
        kwargs["img_size"] = size
    assert got == 2 * flops.analytic_macs(family.name, family.config(arch, kwargs), size) / 1e9


def test_analytic_gflops_from_name_and_size():
    # Trunk only (as the battle builds backbones): ResNet-50 8.2 GFLOPs, ViT-B/16 35.1 at 224 px.
    assert round(flops.analytic_gflops("resnet50.a1_in1k", 224), 1) == 8.2
    assert round(flops.analytic_gflops("vit_base_patch16_224.augreg_in1k", 224), 1) == 35.1
    # A head adds D x classes MACs; with the benchmark's arguments it equals model_gflops.
    with_head = flops.analytic_gflops("vit_base_patch16_224.augreg_in1k", 224, num_classes=1000)
    assert with_head - flops.analytic_gflops("vit_base_patch16_224.augreg_in1k", 224) == pytest.approx(
        2 * 768 * 1000 / 1e9)
    assert with_head == flops.model_gflops("vit_base_patch16_224.augreg_in1k", 224,
                                           {"num_classes": 1000, "img_size": 224})
    # Token models are built at the input size: DINOv2 (img_size 518 by default) at 224 is 16 x 16 patches.
    assert flops.analytic_gflops("vit_base_patch14_dinov2.lvd142m", 224) == pytest.approx(2 * 23.16, rel=3e-3)
    # A bare arch, or a tag bob_jax lacks, counts the architecture's default graph.
    assert flops.analytic_gflops("resnet50", 224) == flops.analytic_gflops("resnet50.a1_in1k", 224)
    assert flops.analytic_gflops("resnet50.custom", 224) == flops.analytic_gflops("resnet50.a1_in1k", 224)
    with pytest.raises(ValueError, match="unknown architecture"):
        flops.analytic_gflops("not_a_model.x", 224)
    with pytest.raises(ValueError, match="positive integer"):
        flops.analytic_gflops("resnet50.a1_in1k", 0)
    with pytest.raises(ValueError, match="multiple of 32"):
        flops.analytic_gflops("resnet50_clip.openai", 112)  # the model itself cannot run 112 px


def test_cli_without_grain_tfds_ml_collections(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _BLOCK, *TINY, "--workdir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    _check_report(tmp_path)


@pytest.mark.reference
def test_compare_timm_eager(tmp_path, reference):
    from bob_jax.bench.__main__ import main

    # --append keeps the rows of an earlier run in the same workdir.
    (tmp_path / "bench.json").write_text(json.dumps({"models": [{"model": "earlier.run", "batch": 7}]}))
    main([*TINY, "--compare-timm", "--no-torch-compile", "--append", "--workdir", str(tmp_path)])
    rows = json.loads((tmp_path / "bench.json").read_text())["models"]
    assert [r["batch"] for r in rows] == [7, 2]
    report = json.loads((tmp_path / "bench.json").read_text())
    report["models"] = rows[1:]
    (tmp_path / "bench.json").write_text(json.dumps(report))
    report = _check_report(tmp_path, timm=True)
    assert "timm_compile_img_s" not in report["models"][0]
    # A timm-only second pass (as launch/gpu_check.sh does for torch.compile) completes the same row.
    jax_img_s = report["models"][0]["jax_img_s"]
    main([*TINY, "--no-jax", "--compare-timm", "--no-torch-compile", "--append", "--workdir", str(tmp_path)])
    (row,) = json.loads((tmp_path / "bench.json").read_text())["models"]
    assert row["jax_img_s"] == jax_img_s and _positive(row["timm_eager_img_s"])


@pytest.mark.reference
def test_convert_benchmark(tmp_path, reference):
    from bob_jax.bench.__main__ import main

    main(["--convert", "--convert-model", "tf_efficientnet_lite0.in1k", "--repeats", "1",
          "--workdir", str(tmp_path)])
    c = json.loads((tmp_path / "bench.json").read_text())["convert"]
    assert abs(c["params_m"] - 4.65) < 0.1  # timm tf_efficientnet_lite0 incl. BN buffers
    for key in ("file_mb", "save_s", "create_s", "mb_per_s"):
        assert _positive(c[key]), (key, c[key])
    assert "## conversion" in (tmp_path / "bench.md").read_text()


def test_data_benchmark(tmp_path):
    from bob_jax.bench.__main__ import main

    main(["--data", "--size", "32", "--data-images", "8", "--data-batch", "4", "--data-batches", "2",
          "--data-workers", "0,1", "--data-max-side", "64", "--workdir", str(tmp_path)])
    d = json.loads((tmp_path / "bench.json").read_text())["data"]
    for key in ("decode_img_s", "augment_img_s", "decode_augment_img_s_per_core"):
        assert _positive(d[key]), (key, d[key])
    assert [r["workers"] for r in d["loader"]] == [0, 1]
    for r in d["loader"]:
        assert _positive(r["img_s"]) and _positive(r["first_batch_s"])
    md = (tmp_path / "bench.md").read_text()
    assert "## data pipeline" in md and "loader, 1 workers" in md


def test_train_step_with_batch_norm():
    # A tiny conv + BatchNorm + linear model: the jitted step (grad through merged params, BatchNorm
    # statistics updated in train mode, donated params/optimizer state carried between calls) runs.
    import jax.numpy as jnp
    from flax import nnx

    from bob_jax.bench import models

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.fc = nnx.Linear(4, 10, rngs=rngs)

        def __call__(self, x):
            pooled = jnp.mean(self.bn(self.conv(x)), axis=(1, 2))
            return {"logits": self.fc(pooled), "pooled": pooled}

    model = Tiny(nnx.Rngs(0))
    t = models.train_benchmark(model, batch=4, size=8, dtype="float32", warmup=1, repeats=2, iters=2,
                               num_classes=10)
    assert _positive(t.img_per_s) and _positive(t.compile_s) and len(t.times_s) == 2
    # The model's own BatchNorm statistics are untouched (the step works on a split copy).
    assert float(jnp.abs(model.bn.mean[...]).max()) == 0.0
    fwd = models.forward_benchmark(model, batch=4, size=8, dtype="bfloat16", warmup=0, repeats=1, iters=1)
    assert _positive(fwd.img_per_s)


def test_bad_arguments():
    from bob_jax.bench.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--models", "resnet50.a1_in1k", "--batch", "0"])
    with pytest.raises(SystemExit):
        parse_args([])  # nothing to do
    from bob_jax.bench.models import arch_kwargs_for

    with pytest.raises(ValueError, match="unknown architecture"):
        arch_kwargs_for("not_a_model.x", 224, 1000)
    assert arch_kwargs_for("vit_small_patch16_224.augreg_in1k", 64, 10) == {"num_classes": 10, "img_size": 64}
    assert arch_kwargs_for("resnet50.a1_in1k", 64, 10) == {"num_classes": 10}
