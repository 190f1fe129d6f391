"""The public backbone API: names, random init scheme, local weight files, user registration."""

import numpy as np
import pytest
from flax import nnx

from bob_jax import backbones
from bob_jax.backbones import Preprocess
from bob_jax.convert import ConversionError
from bob_jax.testing import assert_parity


def test_list_backbones_are_tagged():
    names = backbones.list_backbones()
    assert "tf_efficientnet_lite0.offline" in names and "resnet50.a1_in1k" in names
    assert all("." in n for n in names)


def test_untagged_or_unknown_names_are_errors():
    with pytest.raises(ValueError, match="tags for resnet50"):
        backbones.create("resnet50")
    with pytest.raises(ValueError, match="unknown architecture"):
        backbones.create("notanet.x")


def test_resnet_random_init_follows_timm_scheme():
    m = backbones.create("resnet50.a1_in1k", seed=3)
    again = backbones.create("resnet50.a1_in1k", seed=3)
    other = backbones.create("resnet50.a1_in1k", seed=4)
    k = np.asarray(m.layer2[0].conv2.kernel[...])
    np.testing.assert_array_equal(k, np.asarray(again.layer2[0].conv2.kernel[...]))
    assert not np.array_equal(k, np.asarray(other.layer2[0].conv2.kernel[...]))
    # kaiming normal, fan_out = 3*3*128
    assert abs(k.std() - np.sqrt(2 / (9 * 128))) < 0.02 * np.sqrt(2 / (9 * 128)) * 10
    for layer in (m.layer1, m.layer4):
        for block in layer:
            assert np.all(np.asarray(block.bn3.scale[...]) == 0)  # zero_init_last
            assert np.all(np.asarray(block.bn1.scale[...]) == 1)
    fc = np.asarray(m.fc.kernel[...])
    assert np.abs(fc).max() <= 1 / np.sqrt(2048)
    no_zero = backbones.create("resnet50.a1_in1k", zero_init_last=False)
    assert np.all(np.asarray(no_zero.layer1[0].bn3.scale[...]) == 1)
    assert m.weights_id == "random-init:seed=3"


def test_local_safetensors_and_pth_files_load(tmp_path, reference):
    torch, timm = reference
    import safetensors.numpy

    from bob_jax.testing.reference import redraw_parameters, state_dict_numpy

    ref = redraw_parameters(timm.create_model("resnet50", pretrained=False).eval(), 7)
    sd = state_dict_numpy(ref)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": ref.state_dict(), "epoch": 3}, tmp_path / "w.pth")
    x = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    a = backbones.create("resnet50.a1_in1k", weights=tmp_path / "w.safetensors")
    b = backbones.create("resnet50.a1_in1k", weights=tmp_path / "w.pth", weights_key="state_dict")
    for m in (a, b):
        assert_parity(backbones.forward(m, x)["logits"], want)
    assert a.weights_id.startswith("sha256:")
    # num_classes=0 drops the checkpoint's head instead of failing
    headless = backbones.create("resnet50.a1_in1k", weights=tmp_path / "w.safetensors", num_classes=0)
    assert "logits" not in backbones.forward(headless, x)
    # a checkpoint of another architecture is refused with the problems named
    with pytest.raises(ConversionError, match="missing"):
        backbones.create("resnet101.tv_in1k", weights=tmp_path / "w.safetensors")


class _TinyNet(nnx.Module):
    def __init__(self, *, rngs, width=8):
        self.conv = nnx.Conv(3, width, (3, 3), rngs=rngs)
        self.head = nnx.Linear(width, 4, rngs=rngs)

    def __call__(self, x, *, intermediates=False):
        f = self.conv(x)
        pooled = f.mean(axis=(1, 2))
        return {"pooled": pooled, "logits": self.head(pooled), "features": {1: f}}


def test_register_user_backbone(tmp_path):
    backbones.register(
        "tinynet.test", build=lambda *, rngs, **kw: _TinyNet(rngs=rngs, **kw), convert=None,
        preprocess=Preprocess(input_size=32, crop_pct=1.0),
    )
    assert "tinynet.test" in backbones.list_backbones()
    m = backbones.create("tinynet.test", width=8)
    out = backbones.forward(m, np.zeros((2, 32, 32, 3), np.float32))
    assert out["pooled"].shape == (2, 8) and m.preprocess.input_size == 32
    from bob_jax.convert.core import abstract_leaves

    np.savez(tmp_path / "tiny.npz", **{k: np.ones(v.shape, np.float32) for k, v in abstract_leaves(m).items()})
    loaded = backbones.create("tinynet.test", weights=tmp_path / "tiny.npz")
    assert np.all(np.asarray(loaded.head.kernel[...]) == 1)
    with pytest.raises(ValueError, match="arch.tag"):
        backbones.register("untagged", build=None, convert=None, preprocess=Preprocess())


def test_bfloat16_compute_keeps_float32_parameters():
    import jax.numpy as jnp

    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    f32 = backbones.create("tf_efficientnet_lite0.offline", weights="pretrained")
    bf16 = backbones.create("tf_efficientnet_lite0.offline", weights="pretrained", dtype=jnp.bfloat16)
    want = np.asarray(backbones.forward(f32, x)["logits"])
    got = backbones.forward(bf16, x)["logits"]
    assert got.dtype == jnp.bfloat16 and bf16.conv_stem.kernel[...].dtype == jnp.float32
    # bf16 has an 8-bit mantissa: agreement to a few percent of the logit range, same top-1.
    assert np.abs(np.asarray(got, np.float32) - want).max() < 0.1 * np.abs(want).max()
    assert (np.argmax(np.asarray(got, np.float32), -1) == np.argmax(want, -1)).all()


def test_ssl_release_files_load_after_prefix_stripping(tmp_path, reference):
    """DINO/VICReg ResNet-50 releases: torchvision names under `module.`/`backbone.`, no head."""
    torch, timm = reference
    from bob_jax.testing.reference import redraw_parameters

    ref = redraw_parameters(timm.create_model("resnet50", pretrained=False, num_classes=0).eval(), 5)
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "dino.pth")
    torch.save({f"backbone.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "vicreg.pth")
    x = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    for tag in ("dino", "vicreg"):
        model = backbones.create(f"resnet50.{tag}", weights=tmp_path / f"{tag}.pth")
        out = backbones.forward(model, x)
        assert "logits" not in out
        assert_parity(out["pooled"], want)


def test_new_head_is_reinitialised_and_trunk_kept():
    """Pretrained weights with another num_classes: the trunk is the checkpoint's, the head is new."""
    pre = backbones.create("tf_efficientnet_lite0.offline", weights="pretrained")
    ten = backbones.create("tf_efficientnet_lite0.offline", weights="pretrained", num_classes=10, seed=1)
    assert ten.classifier.kernel[...].shape == (1280, 10)
    assert np.all(np.asarray(ten.classifier.bias[...]) == 0)  # timm's goog init: zero bias
    assert 0 < np.abs(np.asarray(ten.classifier.kernel[...])).max() <= 1 / np.sqrt(10)
    np.testing.assert_array_equal(np.asarray(ten.conv_head.kernel[...]), np.asarray(pre.conv_head.kernel[...]))
