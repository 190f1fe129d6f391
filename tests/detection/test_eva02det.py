"""EVA-02 detection trunk: RoPE tables vs a transcription of EVA-02's `VisionRotaryEmbeddingFast`, the
whole trunk vs a plain-torch transcription of EVA-02's detectron2 ViT (padded windows, two RoPE tables,
q/v biases without k bias, SwiGLU with and without sub-LN, pos-embed resize), the conversion from our
zoo EVA-02 (S: fused qkv and packed GluMlp; B: separate projections and SwiGLU), and a reduced EVA-02
through the Detector: trunk choice, lr decay ids, one Mask R-CNN fine-tuning step."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bob_jax import backbones
from bob_jax.backbones.preprocess import CLIP_MEAN
from bob_jax.convert import abstract_leaves
from bob_jax.detection import vitdet
from bob_jax.detection.eva02det import Eva02DetBackbone, rope_table
from bob_jax.testing.reference import redraw_leaves

S, B = "eva02_small_patch14_224.mim_in22k", "eva02_base_patch14_224.mim_in22k"
_SMALL = {"num_classes": 0, "embed_dim": 64, "num_heads": 4}

pytestmark = pytest.mark.usefixtures("fast_compile")


def _randomize(model, seed):
    """Every parameter re-drawn at a natural scale (biases and norm scales too), so no path hides
    behind a zero or unit init."""
    # q_bias / v_bias end in "bias" without the dot: caught by the same rule as ".bias" here.
    return redraw_leaves(model, seed, {r"bias$|_token$|^pos_embed$": 0.3})


def _images(n, size, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


@nnx.jit
def _features(model, x):
    return model(x)["features"]


# ----------------------------------------------------------------------------------------------
# plain-torch transcription of EVA-02/det/detectron2/modeling/backbone/{utils,vit}.py
# ----------------------------------------------------------------------------------------------


def _torch_rope(torch, dim, pt_seq_len, ft_seq_len):
    """`VisionRotaryEmbeddingFast(dim, pt_seq_len, ft_seq_len)`: (freqs_cos, freqs_sin), einops spelled out."""
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
    freqs = torch.einsum("..., f -> ... f", t, freqs)
    freqs = freqs.repeat_interleave(2, dim=-1)  # repeat('... n -> ... (n r)', r=2)
    n = freqs.shape[0]
    freqs = torch.cat([freqs[:, None, :].expand(n, n, -1), freqs[None, :, :].expand(n, n, -1)], dim=-1)  # broadcat
    freqs = freqs.reshape(-1, freqs.shape[-1])
    return freqs.cos(), freqs.sin()


def _torch_rotate_half(torch, x):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # rearrange('... (d r) -> ... d r', r=2)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _torch_attention(torch, p, x, heads, rope):
    F = torch.nn.functional
    b, h, w, c = x.shape
    x = x.view(b, -1, c)
    n = h * w
    q = F.linear(x, p["q_proj.kernel"].T, p["q_bias"]).reshape(b, n, heads, -1).permute(0, 2, 1, 3)
    k = F.linear(x, p["k_proj.kernel"].T, None).reshape(b, n, heads, -1).permute(0, 2, 1, 3)
    v = F.linear(x, p["v_proj.kernel"].T, p["v_bias"]).reshape(b, n, heads, -1).permute(0, 2, 1, 3)
    cos, sin = rope
    q = q * cos + _torch_rotate_half(torch, q) * sin
    k = k * cos + _torch_rotate_half(torch, k) * sin
    q = q * q.shape[-1] ** -0.5  # the non-xattn branch (xformers computes the same)
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(b, n, -1)
    return F.linear(x, p["proj.kernel"].T, p["proj.bias"]).view(b, h, w, c)


def _torch_block(torch, p, x, heads, window, rope):
    F = torch.nn.functional
    c = x.shape[-1]
    shortcut = x
    x = F.layer_norm(x, (c,), p["norm1.scale"], p["norm1.bias"], 1e-6)
    if window:
        h, w = x.shape[1], x.shape[2]
        ph, pw = (window - h % window) % window, (window - w % window) % window
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        x = x.view(-1, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, window, window, c)
    x = _torch_attention(torch, {k[5:]: v for k, v in p.items() if k.startswith("attn.")}, x, heads, rope)
    if window:
        x = x.view(-1, hp // window, wp // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, hp, wp, c)[:, :h, :w]
    x = shortcut + x
    y = F.layer_norm(x, (c,), p["norm2.scale"], p["norm2.bias"], 1e-6)
    hidden = F.silu(F.linear(y, p["mlp.w1.kernel"].T, p["mlp.w1.bias"])) * F.linear(
        y, p["mlp.w2.kernel"].T, p["mlp.w2.bias"])
    if "mlp.ffn_ln.scale" in p:
        hidden = F.layer_norm(hidden, (hidden.shape[-1],), p["mlp.ffn_ln.scale"], p["mlp.ffn_ln.bias"], 1e-6)
    return x + F.linear(hidden, p["mlp.w3.kernel"].T, p["mlp.w3.bias"])


def _torch_eva02_vit(torch, params, cfg, x_nhwc, window_block_indexes):
    """EVA-02 det `ViT.forward` at `img_size` = the input's size (pretrain_use_cls_token=True)."""
    F = torch.nn.functional
    p = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in params.items()}
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
    x = F.conv2d(x, p["patch_embed.proj.kernel"].permute(3, 2, 0, 1), p["patch_embed.proj.bias"],
                 stride=cfg.patch_size).permute(0, 2, 3, 1)
    h, w = x.shape[1], x.shape[2]
    size = cfg.pos_embed_grid[0]
    pos = p["pos_embed"][:, 1:].reshape(1, size, size, -1).permute(0, 3, 1, 2)  # get_abs_pos
    x = x + F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    half_head_dim = cfg.head_dim // 2
    rope_win = _torch_rope(torch, half_head_dim, cfg.rope_pt_seq_len, cfg.window_size)
    rope_glb = _torch_rope(torch, half_head_dim, cfg.rope_pt_seq_len, h)
    for i in range(cfg.depth):
        block = {k[len(f"blocks.{i}."):]: v for k, v in p.items() if k.startswith(f"blocks.{i}.")}
        windowed = i in window_block_indexes
        x = _torch_block(torch, block, x, cfg.num_heads, cfg.window_size if windowed else 0,
                         rope_win if windowed else rope_glb)
    return x.numpy()


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.reference
@pytest.mark.parametrize("head_dim,pt,ft", [(16, 16, 4), (64, 16, 16), (64, 16, 64), (64, 16, 96)])
def test_rope_tables_match_vision_rotary_embedding_fast(reference, head_dim, pt, ft):
    torch, _ = reference
    cos, sin = (t.numpy() for t in _torch_rope(torch, head_dim // 2, pt, ft))
    table = rope_table((ft, ft), head_dim, pt)
    assert table.shape == (ft * ft, 2 * head_dim)
    np.testing.assert_allclose(table[:, :head_dim], sin, atol=1e-6, rtol=0)
    np.testing.assert_allclose(table[:, head_dim:], cos, atol=1e-6, rtol=0)
    # applied to q: x * cos + rotate_half(x) * sin
    from bob_jax.models.eva import apply_rope

    x = np.random.default_rng(0).normal(size=(2, ft * ft, 3, head_dim)).astype(np.float32)  # [B, N, heads, hd]
    t = torch.from_numpy(x).permute(0, 2, 1, 3)
    want = (t * torch.from_numpy(cos) + _torch_rotate_half(torch, t) * torch.from_numpy(sin)).permute(0, 2, 1, 3)
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(x), table)), want.numpy(), atol=1e-4, rtol=0)


@pytest.mark.reference
@pytest.mark.parametrize("name", [B, S])  # B: sub-LN in the MLP; S: none
def test_matches_torch_eva02_det_vit(reference, name):
    torch, _ = reference
    eva = backbones.create(name, depth=4, **_SMALL)
    # 96 px: a 6x6 grid; window 4 pads it to 8x8 (4 windows); the global table spans 6, the window table 4;
    # the pos-embed (p14to16: 14x14) is resized to 6x6.
    det = _randomize(Eva02DetBackbone.from_eva(eva, img_size=96, window_size=4, global_blocks=(1, 3)), 3)
    assert det.cfg.subln == (name == B) and det.cfg.pos_embed_grid == (14, 14)
    x = _images(2, 96, seed=4)
    got = np.asarray(_features(det, x)[16])
    want = _torch_eva02_vit(torch, abstract_leaves(det), det.cfg, x, window_block_indexes=(0, 2))
    assert got.shape == (2, 6, 6, 64) and want.std() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", [S, B])
def test_from_eva_copies_the_classification_weights(name):
    eva = _randomize(backbones.create(name, depth=2, **_SMALL), 1)
    det = Eva02DetBackbone.from_eva(eva, img_size=64, window_size=4, global_blocks=(1,))
    src, got = abstract_leaves(eva), abstract_leaves(det)
    assert not any(k.endswith("_token") or k.startswith(("norm.", "fc_norm.", "head")) for k in got)
    assert det.cfg.rope_pt_seq_len == 16 and det.cfg.mlp_hidden == eva.cfg.mlp_hidden
    # p14to16: kernel and pos-embed resized as EVA-02's checkpoints (both functions checked against torch)
    np.testing.assert_array_equal(got["patch_embed.proj.kernel"],
                                  vitdet.resize_patch_kernel(src["patch_embed.proj.kernel"], 16))
    np.testing.assert_array_equal(got["pos_embed"][:, :1], src["pos_embed"][:, :1])
    pos = vitdet.resize_pos_embed_bicubic_torch(src["pos_embed"][:, 1:].reshape(1, 16, 16, 64), (14, 14))
    np.testing.assert_allclose(got["pos_embed"][:, 1:], np.reshape(pos, (1, 196, 64)), atol=1e-6)
    # each block computes what the classification block computes
    y = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 64)), jnp.float32)
    for src_block, block in zip(eva.blocks, det.blocks):
        np.testing.assert_allclose(block.mlp(y), src_block.mlp(y), atol=1e-5, rtol=1e-5)
        hd = det.cfg.head_dim
        identity = np.concatenate([np.zeros((9, hd)), np.ones((9, hd))], -1)  # sin 0, cos 1: no rotation
        np.testing.assert_allclose(block.attn(y.reshape(2, 3, 3, 64), identity).reshape(2, 9, 64),
                                   src_block.attn(y, None), atol=1e-5, rtol=1e-5)


def test_from_eva_rejects_other_models_and_bad_sizes():
    eva = backbones.create(S, depth=2, **_SMALL)
    vit = backbones.create("vit_small_patch16_224.augreg_in1k", num_classes=0, depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(TypeError, match="from_vit"):
        Eva02DetBackbone.from_eva(vit, img_size=64)
    with pytest.raises(TypeError, match="from_eva"):
        vitdet.ViTDetBackbone.from_vit(eva, img_size=64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        Eva02DetBackbone.from_eva(eva, img_size=72)
    with pytest.raises(ValueError, match="outside 0..1"):
        Eva02DetBackbone.from_eva(eva, img_size=64, global_blocks=(2,))
    with pytest.raises(ValueError, match="depths"):  # detectron2 / EVA-02 indices exist for 12, 24, 32
        Eva02DetBackbone.from_eva(eva, img_size=64)
    no_rope = backbones.create(S, depth=2, use_rot_pos_emb=False, **_SMALL)
    with pytest.raises(ValueError, match="RoPE"):
        Eva02DetBackbone.from_eva(no_rope, img_size=64, global_blocks=(1,))
    kept = Eva02DetBackbone.from_eva(eva, img_size=56, global_blocks=(1,), patch_size=None)  # patch 14 kept
    assert kept.feature_info == {14: 64} and kept.cfg.pos_embed_grid == (16, 16)


def test_detector_builds_the_eva02_trunk_and_finetunes_it_one_step(monkeypatch):
    from bob_jax import parallel
    from bob_jax.detection import train as train_lib
    from bob_jax.detection.model import Detector, DetectorConfig, set_train_mode

    create = backbones.create
    # A 3-block EVA-02-S (every third block global under the "bob" rule: block 2) keeps the step cheap.
    monkeypatch.setattr(backbones, "create", lambda name, **kw: create(name, depth=3, embed_dim=64, num_heads=4,
                                                                         **kw))
    cfg = DetectorConfig(
        backbone=S, weights=None, head="mask_rcnn", neck="bob", num_classes=3, image_size=64, window_size=2,
        drop_path_rate=0.1, neck_channels=16, box_head_convs=0, box_head_conv_dim=16, box_head_fc_dim=32,
        mask_head_convs=1, mask_head_conv_dim=8, rpn_pre_nms_topk=(32, 32), rpn_post_nms_topk=(16, 16),
        rpn_batch_size_per_image=32, roi_batch_size_per_image=8, detections_per_image=5,
    )
    det = Detector(cfg)
    assert det.plain_vit and type(det.trunk).__name__ == "Eva02DetBackbone"
    assert det.trunk.cfg.global_blocks == (2,) and det.trunk.cfg.window_size == 2 and det.trunk.cfg.depth == 3
    assert tuple(det.preprocess.mean) == tuple(CLIP_MEAN)  # EVA-02's own normalisation
    # layer decay: detectron2's / EVA-02's get_vit_lr_decay_rate on the trunk's names
    params = nnx.state(det, nnx.Param)
    scales = {path: v.get_value() for path, v in nnx.to_flat_state(train_lib.lr_scales(det, params, 0.5))}
    assert np.isclose(scales[("trunk", "pos_embed")], 0.5 ** 4)
    assert np.isclose(scales[("trunk", "blocks", 1, "attn", "q_bias")], 0.5 ** 2)
    assert all(v == 1.0 for path, v in scales.items() if path[0] != "trunk")
    # the frozen protocol trains no trunk parameter
    _, trainable, frozen, _ = train_lib.split_model(det, "frozen")
    assert not any(p[0] == "trunk" for p, _ in nnx.to_flat_state(trainable))
    assert any(p[:2] == ("trunk", "blocks") for p, _ in nnx.to_flat_state(frozen))

    # one fine-tuning step through the real train step: finite losses, the trunk moves
    set_train_mode(det)
    graphdef, params, frozen, rest = train_lib.split_model(det, "finetune")
    det.eval()
    tx = train_lib.make_optimizer(det, params, train_lib.TrainConfig(protocol="finetune", steps=10, batch_size=2,
                                                                     lr=1e-3, warmup_steps=0))
    step = train_lib.make_train_step(graphdef, tx, parallel.make_mesh(devices=jax.devices()[:1]))
    rng = np.random.default_rng(0)
    boxes = np.tile(np.array([[4, 6, 30, 40], [20, 10, 50, 30]], np.float32), (2, 1, 1))
    masks = np.zeros((2, 2, 64, 64), np.uint8)
    masks[:, 0, 6:40, 4:30] = masks[:, 1, 10:30, 20:50] = 1
    data = {"image": rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8),
            "image_size": np.array([[64, 64], [48, 56]], np.int32), "gt_boxes": boxes,
            "gt_classes": np.array([[0, 2], [1, 0]], np.int32), "gt_masks": masks}
    before = jax.tree.map(np.asarray, params)
    new, _, _, losses = step(params, frozen, rest, tx.init(params), jax.tree.map(jnp.asarray, data),
                             jax.random.key(0))
    assert {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"} <= set(losses)
    assert all(np.isfinite(float(v)) for v in losses.values())
    flat0 = {p: v.get_value() for p, v in nnx.to_flat_state(before)}
    flat1 = {p: v.get_value() for p, v in nnx.to_flat_state(new)}
    trunk = [p for p in flat0 if p[0] == "trunk"]
    moved = [p for p in trunk if not np.array_equal(flat0[p], flat1[p])]
    assert len(moved) == len(trunk)
