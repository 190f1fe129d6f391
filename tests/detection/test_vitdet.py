"""ViTDet trunk: PyTorch-exact resizes (bicubic pos-embed and patch kernel vs F.interpolate, pseudo-inverse
patch resize vs timm, linear rel-pos resize), an identity check against our ViT (full windows, no rel
pos), and the whole trunk against a plain-torch re-implementation of detectron2's ViT semantics
(padded windows, decomposed rel pos with resized tables, pos-embed resize, layer scale, CLIP pre-norm,
BoB's final norm and scaled-q rel pos) at reduced size."""


import jax
import numpy as np
import pytest
from flax import nnx

from bob_jax import backbones
from bob_jax.convert import abstract_leaves
from bob_jax.detection import vitdet
from bob_jax.detection.necks import SimpleFeaturePyramid
from bob_jax.detection.vitdet import ViTDetBackbone
from bob_jax.testing.reference import redraw_leaves

_TINY = {"num_classes": 0, "depth": 3, "embed_dim": 32, "num_heads": 2}


pytestmark = pytest.mark.usefixtures("fast_compile")


def _randomize(model, seed):
    """Every parameter of an NNX model re-drawn at a natural scale (biases, norm scales, layer scale,
    rel-pos tables included), so that no code path hides behind a zero or 1e-5 init."""
    return redraw_leaves(model, seed, {r"\.rel_pos_": 0.3, r"^pos_embed$|_token$": 0.5})


@nnx.jit
def _features(model, x):
    return model(x)["features"]


def _images(n, size, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# resizing vs PyTorch
# ----------------------------------------------------------------------------------------------


@pytest.mark.reference
@pytest.mark.parametrize("old,new", [((14, 14), (64, 64)), ((37, 37), (64, 64)), ((14, 14), (10, 10)),
                                     ((7, 9), (12, 5))])
def test_resize_pos_embed_bicubic_matches_torch(reference, old, new):
    torch, _ = reference
    grid = np.random.default_rng(0).normal(size=(1, *old, 8)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(0, 3, 1, 2), size=new, mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1).numpy()
    # torch computes source coordinates in float32, we in float64: ~4e-6 apart when downsampling.
    np.testing.assert_allclose(vitdet.resize_pos_embed_bicubic_torch(grid, new), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(vitdet.resize_pos_embed_bicubic_torch(jax.numpy.asarray(grid), new)),
                               want, atol=1e-5)
    # jax.image.resize is a different kernel (A = -0.5): the reason this function exists.
    assert np.abs(np.asarray(jax.image.resize(grid, (1, *new, 8), "cubic")) - want).max() > 1e-3


@pytest.mark.reference
@pytest.mark.parametrize("n_in,n_out", [(27, 127), (127, 27), (5, 9), (9, 9)])
def test_linear_interpolation_matches_torch(reference, n_in, n_out):
    torch, _ = reference
    table = np.random.default_rng(1).normal(size=(n_in, 4)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(table).T[None], size=n_out, mode="linear").numpy()[0].T
    np.testing.assert_allclose(vitdet.linear_interpolation_matrix(n_in, n_out) @ table, want, atol=5e-6)


@pytest.mark.reference
def test_patch_kernel_resize_matches_eva_and_timm(reference):
    torch, _ = reference
    from timm.layers import resample_patch_embed

    w = np.random.default_rng(2).normal(size=(6, 3, 14, 14)).astype(np.float32)  # torch [out, in, kh, kw]
    hwio = w.transpose(2, 3, 1, 0)
    bicubic = torch.nn.functional.interpolate(torch.from_numpy(w), size=(16, 16), mode="bicubic",
                                              align_corners=False).numpy()
    np.testing.assert_allclose(vitdet.resize_patch_kernel(hwio, 16, "bicubic"), bicubic.transpose(2, 3, 1, 0),
                               atol=2e-6)
    pi = resample_patch_embed(torch.from_numpy(w), [16, 16]).numpy()
    np.testing.assert_allclose(vitdet.resize_patch_kernel(hwio, 16, "pi"), pi.transpose(2, 3, 1, 0), atol=1e-5)


def test_pi_patch_resize_preserves_tokens_of_resized_patches():
    """FlexiViT's property: <resize(x), w16> = <x, w14> for a 14x14 patch bicubic-antialias upsampled."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(14, 14, 3, 5))
    x = rng.normal(size=(14, 14, 3))
    x16 = np.asarray(vitdet.pos_embed_lib.resample_grid(x, (16, 16), antialias=True))
    w16 = vitdet.resize_patch_kernel(w, 16, "pi")
    np.testing.assert_allclose(np.einsum("hwc,hwco->o", x16, w16), np.einsum("hwc,hwco->o", x, w), rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# structure
# ----------------------------------------------------------------------------------------------


def test_default_global_blocks():
    assert vitdet.default_global_blocks("vitdet", 12) == (2, 5, 8, 11)
    assert vitdet.default_global_blocks("vitdet", 24) == (5, 11, 17, 23)
    assert vitdet.default_global_blocks("bob", 12) == (2, 5, 8, 11)
    assert vitdet.default_global_blocks("bob", 24) == (2, 5, 8, 11, 14, 17, 20, 23)
    with pytest.raises(ValueError, match="global_blocks=... explicitly"):
        vitdet.default_global_blocks("vitdet", 6)


def test_window_partition_round_trip_and_zero_padding():
    x = jax.numpy.asarray(np.random.default_rng(4).normal(size=(2, 5, 7, 3)).astype(np.float32))
    windows, padded = vitdet.window_partition(x, 4)
    assert windows.shape == (2 * 2 * 2, 4, 4, 3) and padded == (8, 8)
    # window (0, 1) of image 0 holds columns 4..7 of rows 0..3; column 7 is padding.
    np.testing.assert_array_equal(windows[1, :, :3], x[0, :4, 4:7])
    assert not np.any(windows[1, :, 3]) and not np.any(windows[3, 1:])
    np.testing.assert_array_equal(vitdet.window_unpartition(windows, 4, padded, (5, 7)), x)


def test_lr_decay_layer_id():
    ids = {p: vitdet.lr_decay_layer_id(p, 12) for p in
           ("patch_embed.proj.kernel", "pos_embed", "blocks.0.attn.qkv.kernel", "blocks.11.mlp.fc2.bias",
            "norm.scale")}
    assert ids == {"patch_embed.proj.kernel": 0, "pos_embed": 0, "blocks.0.attn.qkv.kernel": 1,
                   "blocks.11.mlp.fc2.bias": 12, "norm.scale": 13}


def test_from_vit_rejects_other_models_and_bad_sizes():
    vit = backbones.create("vit_small_patch16_224.augreg_in1k", **_TINY)
    with pytest.raises(TypeError, match="EVA-02"):
        ViTDetBackbone.from_vit(object(), img_size=64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ViTDetBackbone.from_vit(vit, img_size=72)
    with pytest.raises(ValueError, match="outside 0..2"):
        ViTDetBackbone.from_vit(vit, img_size=64, global_blocks=(3,))


# ----------------------------------------------------------------------------------------------
# identity with our ViT
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kw,global_blocks", [
    ("vit_small_patch16_224.augreg_in1k", {"img_size": 64}, (1,)),  # blocks 0, 2: one window = the grid
    ("vit_small_patch14_dinov2.lvd142m", {"img_size": 56}, (0, 1, 2)),  # layer scale, patch 14 kept
])
def test_identity_with_vit_when_windows_cover_the_grid(name, kw, global_blocks):
    vit = _randomize(backbones.create(name, class_token=False, global_pool="avg", **_TINY, **kw), 0)
    size, patch = vit.cfg.img_size[0], vit.cfg.patch_size
    det = ViTDetBackbone.from_vit(vit, img_size=size, window_size=size // patch, global_blocks=global_blocks,
                                  use_rel_pos=False, patch_size=None)
    x = _images(2, size)
    want = np.asarray(backbones.forward(vit, x)["features"][patch])
    got = np.asarray(_features(det, x)[patch])
    assert want.std() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_from_vit_copies_trained_weights_and_drops_tokens():
    vit = _randomize(backbones.create("vit_small_patch14_reg4_dinov2.lvd142m", **_TINY), 1)
    det = ViTDetBackbone.from_vit(vit, img_size=64, global_blocks=(1,))
    src, got = abstract_leaves(vit), abstract_leaves(det)
    for key in ("blocks.2.attn.qkv.kernel", "blocks.0.ls1.gamma", "blocks.1.mlp.fc2.bias", "pos_embed",
                "patch_embed.proj.bias"):
        np.testing.assert_array_equal(got[key], src[key])
    assert not any(k.endswith("_token") or k.startswith(("norm.", "head")) for k in got)
    assert det.cfg.pos_embed_prefix == 0 and det.cfg.pos_embed_grid == (37, 37)  # reg4: no class slot
    assert got["blocks.0.attn.rel_pos_h"].shape == (2 * 14 - 1, 16)  # window block
    assert got["blocks.1.attn.rel_pos_h"].shape == (2 * 4 - 1, 16)  # global block over the 4x4 grid
    assert not np.any(got["blocks.1.attn.rel_pos_w"])
    assert got["patch_embed.proj.kernel"].shape == (16, 16, 3, 32)
    assert jax.eval_shape(det, _images(1, 64))["features"][16].shape == (1, 4, 4, 32)
    bob = ViTDetBackbone.from_vit(vit, img_size=64, variant="bob")
    assert bob.cfg.global_blocks == (2,) and bob.pos_embed.shape == (1, 16, 32)  # resized to the 4x4 grid
    np.testing.assert_array_equal(bob.norm.scale[...], src["norm.scale"])  # BoB keeps the final norm
    avg = backbones.create("vit_small_patch16_224.augreg_in1k", global_pool="avg", **_TINY)  # fc_norm, no norm
    bob = ViTDetBackbone.from_vit(avg, img_size=64, variant="bob")
    np.testing.assert_array_equal(bob.norm.scale[...], 1.0)
    np.testing.assert_array_equal(bob.norm.bias[...], 0.0)


def test_patch14_kept_is_rejected_by_the_pyramid():
    vit = backbones.create("vit_small_patch14_dinov2.lvd142m", **_TINY)
    det = ViTDetBackbone.from_vit(vit, img_size=56, global_blocks=(2,), patch_size=None)
    assert det.feature_info == {14: 32}
    with pytest.raises(ValueError, match="patch_size=16"):
        SimpleFeaturePyramid(32, 8, in_stride=14, rngs=nnx.Rngs(0))


def test_drop_path_uses_the_key_in_train_mode():
    vit = backbones.create("vit_small_patch16_224.augreg_in1k", **_TINY)
    det = ViTDetBackbone.from_vit(vit, img_size=64, global_blocks=(2,), drop_path_rate=0.5)
    x = _images(4, 64)
    evaluated = _features(det, x)[16]
    det.train()
    train = nnx.jit(lambda m, x, key: m(x, rngs=nnx.Rngs(dropout=key))["features"][16])
    a, b, c = (train(det, x, jax.random.key(k)) for k in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3 and np.abs(a - evaluated).max() > 1e-3
    with pytest.raises(ValueError, match="no key"):
        jax.eval_shape(det, x)


# ----------------------------------------------------------------------------------------------
# against a torch re-implementation of detectron2's ViT
# ----------------------------------------------------------------------------------------------


def _torch_rel_pos(torch, size, table):
    """detectron2 get_rel_pos for q_size = k_size = size."""
    n = 2 * size - 1
    if table.shape[0] != n:
        table = torch.nn.functional.interpolate(table.T[None], size=n, mode="linear")[0].T
    coords = torch.arange(size)
    return table[(coords[:, None] - coords[None, :] + size - 1).long()]


def _torch_attention(torch, p, x, heads, scaled_q_rel):
    bw, h, w, c = x.shape
    hd = c // heads
    qkv = (x @ p["qkv.kernel"] + p["qkv.bias"]).reshape(bw, h * w, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, bw * heads, h * w, hd).unbind(0)
    attn = (q * hd ** -0.5) @ k.transpose(-2, -1)
    if "rel_pos_h" in p:
        r_q = (q * hd ** -0.5 if scaled_q_rel else q).reshape(bw * heads, h, w, hd)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, _torch_rel_pos(torch, h, p["rel_pos_h"]))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, _torch_rel_pos(torch, w, p["rel_pos_w"]))
        attn = (attn.view(-1, h, w, h, w) + rel_h[..., None] + rel_w[:, :, :, None, :]).view(-1, h * w, h * w)
    out = (attn.softmax(-1) @ v).view(bw, heads, h, w, hd).permute(0, 2, 3, 1, 4).reshape(bw, h, w, c)
    return out @ p["proj.kernel"] + p["proj.bias"]


def _torch_block(torch, p, x, cfg, window, act):
    F = torch.nn.functional
    c = x.shape[-1]
    y = F.layer_norm(x, (c,), p["norm1.scale"], p["norm1.bias"], cfg.norm_eps)
    h, w = y.shape[1], y.shape[2]
    if window:
        ph, pw = (window - h % window) % window, (window - w % window) % window
        y = F.pad(y, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        y = y.view(-1, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
        y = y.reshape(-1, window, window, c)
    y = _torch_attention(torch, {k[5:]: v for k, v in p.items() if k.startswith("attn.")}, y, cfg.num_heads,
                         cfg.rel_pos_scaled_q)
    if window:
        y = y.view(-1, hp // window, wp // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
        y = y.reshape(-1, hp, wp, c)[:, :h, :w]
    x = x + y * p.get("ls1.gamma", 1.0)
    m = act(F.layer_norm(x, (c,), p["norm2.scale"], p["norm2.bias"], cfg.norm_eps) @ p["mlp.fc1.kernel"]
            + p["mlp.fc1.bias"]) @ p["mlp.fc2.kernel"] + p["mlp.fc2.bias"]
    return x + m * p.get("ls2.gamma", 1.0)


def _torch_vitdet(torch, params, cfg, x_nhwc):
    F = torch.nn.functional
    p = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in params.items()}
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
    x = F.conv2d(x, p["patch_embed.proj.kernel"].permute(3, 2, 0, 1), p.get("patch_embed.proj.bias"),
                 stride=cfg.patch_size).permute(0, 2, 3, 1)
    d = cfg.embed_dim
    pos = p["pos_embed"][:, cfg.pos_embed_prefix:].reshape(1, *cfg.pos_embed_grid, d)
    if tuple(pos.shape[1:3]) != tuple(x.shape[1:3]):  # detectron2 get_abs_pos
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=tuple(x.shape[1:3]), mode="bicubic",
                            align_corners=False).permute(0, 2, 3, 1)
    x = x + pos
    if cfg.pre_norm:
        x = F.layer_norm(x, (d,), p["norm_pre.scale"], p["norm_pre.bias"], cfg.norm_eps)
    act = (lambda t: t * torch.sigmoid(1.702 * t)) if cfg.act_layer == "quick_gelu" else F.gelu
    for i in range(cfg.depth):
        block = {k[len(f"blocks.{i}."):]: v for k, v in p.items() if k.startswith(f"blocks.{i}.")}
        x = _torch_block(torch, block, x, cfg, 0 if i in cfg.global_blocks else cfg.window_size, act)
    if cfg.final_norm:
        x = F.layer_norm(x, (d,), p["norm.scale"], p["norm.bias"], cfg.norm_eps)
    return x.numpy()


@pytest.mark.reference
@pytest.mark.parametrize("name,variant", [
    ("vit_small_patch16_224.augreg_in1k", "vitdet"),  # class-token slot dropped, 14 -> 7 pos resize
    ("vit_base_patch16_clip_quickgelu_224.openai", "vitdet"),  # norm_pre, no patch bias, quick GELU
    ("vit_small_patch14_dinov2.lvd142m", "bob"),  # layer scale, 14 -> 16 patch, final norm, scaled-q rel pos
])
def test_matches_torch_detectron2_semantics(reference, name, variant):
    torch, _ = reference
    vit = backbones.create(name, **_TINY)
    # Built for 96 px (6x6 grid: global rel-pos tables of 11 rows) and run at 112 px (7x7): window 4 pads
    # 7 -> 8, the global block's tables are resized 11 -> 13 rows, the pos-embed goes to 7x7.
    det = ViTDetBackbone.from_vit(vit, img_size=96, window_size=4, global_blocks=(1,), variant=variant)
    det = _randomize(det, 5)
    x = _images(2, 112, seed=6)
    got = np.asarray(_features(det, x)[16])
    want = _torch_vitdet(torch, abstract_leaves(det), det.cfg, x)
    assert got.shape == (2, 7, 7, 32) and want.std() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
