"""Each transform alone (against direct PIL, and torchvision/timm under the `reference` marker) and
inside a grain pipeline."""

import math
import pickle

import grain
import numpy as np
import pytest
from PIL import Image

from bob_jax.backbones.preprocess import Preprocess
from bob_jax.data import transforms as T

# Eval configs from porting.md §10 (timm pretrained_cfg), plus a nearest / tiny-input case.
EVAL_CONFIGS = [
    Preprocess(224, 0.875, "bicubic"),  # convnext / tf_efficientnet_lite0: resize 256
    Preprocess(224, 0.95, "bicubic"),  # resnet50.a1_in1k: resize 235
    Preprocess(176, 0.875, "bilinear"),  # resnet50.tv2_in1k train size: resize 201
    Preprocess(224, 1.0, "bicubic"),  # clip laion2b / dinov2 style crop_pct 1.0
    Preprocess(33, 0.9, "nearest"),
]


def test_to_rgb():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for x in (grey, grey[..., None], np.stack([grey, 255 - grey], -1)):
        out = T.to_rgb(x)
        assert out.shape == (3, 4, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))
    rgba = np.random.default_rng(0).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    np.testing.assert_array_equal(T.to_rgb(rgba), np.asarray(Image.fromarray(rgba, "RGBA").convert("RGB")))
    rgb = rgba[..., :3].copy()
    assert T.to_rgb(rgb) is rgb
    np.testing.assert_array_equal(T.to_rgb(grey), np.asarray(Image.fromarray(grey).convert("RGB")))
    with pytest.raises(ValueError, match="uint8"):
        T.to_rgb(grey.astype(np.float32))
    with pytest.raises(ValueError, match="5 channels"):
        T.to_rgb(np.zeros((2, 2, 5), np.uint8))
    # Element dicts: only the image changes; the input dict is not mutated.
    el = {"image": grey, "label": np.int32(3)}
    out = T.ToRGB().map(el)
    assert out["image"].shape == (3, 4, 3) and out["label"] == 3 and el["image"] is grey


@pytest.mark.parametrize("interp", ["bicubic", "bilinear", "nearest"])
def test_resize_shorter_matches_pil(sample_images, interp):
    pil = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[interp]
    img = sample_images["chelsea"]  # 300 x 451 landscape
    out = T.resize_shorter(img, 256, interp)
    assert out.shape == (256, int(256 * 451 / 300), 3) == (256, 384, 3)
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(img).resize((384, 256), pil)))
    portrait = np.ascontiguousarray(img.transpose(1, 0, 2))
    out = T.resize_shorter(portrait, 100, interp)
    assert out.shape == (int(100 * 451 / 300), 100, 3)
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(portrait).resize((100, 150), pil)))
    # Upsampling a grey HxWx1 image keeps the channel axis.
    grey = sample_images["camera"][:20, :30, None]
    out = T.ResizeShorter(40, interp).map({"image": grey})["image"]
    assert out.shape == (40, 60, 1)
    np.testing.assert_array_equal(
        out[..., 0], np.asarray(Image.fromarray(grey[..., 0]).resize((60, 40), pil))
    )
    assert T.resize_shorter(img, 300) is img  # already the right size
    with pytest.raises(ValueError, match="interpolation 'lanczos'"):
        T.ResizeShorter(10, "lanczos")


def test_center_crop_rounding_and_padding():
    img = np.arange(7 * 9, dtype=np.uint8).reshape(7, 9)
    # (7-4)/2 = 1.5 -> round -> 2 (Python rounds half to even); (9-4)/2 = 2.5 -> 2.
    np.testing.assert_array_equal(T.center_crop(img, 4), img[2:6, 2:6])
    # (7-2)/2 = 2.5 -> 2; (9-2)/2 = 3.5 -> 4.
    np.testing.assert_array_equal(T.center_crop(img, 2), img[2:4, 4:6])
    np.testing.assert_array_equal(T.center_crop(img, (3, 5)), img[2:5, 2:7])
    # Larger than the image: zero padding as torchvision (left/top get the floor half).
    out = T.center_crop(img[:3, :4], 6)
    assert out.shape == (6, 6)
    np.testing.assert_array_equal(out[1:4, 1:5], img[:3, :4])
    assert out.sum() == img[:3, :4].sum()
    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(T.CenterCrop(8).map({"image": rgb})["image"], rgb[1:9, 2:10])


@pytest.mark.parametrize("pp", EVAL_CONFIGS, ids=lambda p: f"{p.input_size}_{p.crop_pct}_{p.interpolation}")
def test_eval_transform_direct_pil(sample_images, pp):
    """EvalTransform == PIL resize of the shorter side to floor(size/crop_pct) + centre crop, by hand."""
    img = sample_images["coffee"]  # 400 x 600
    out = T.EvalTransform(pp).map({"image": img, "label": np.int32(1)})
    s = pp.resize_size
    w = int(s * 600 / 400)
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[
        pp.interpolation
    ]
    resized = np.asarray(Image.fromarray(img).resize((w, s), resample))
    top, left = int(round((s - pp.input_size) / 2.0)), int(round((w - pp.input_size) / 2.0))
    expected = resized[top : top + pp.input_size, left : left + pp.input_size]
    assert out["image"].shape == (pp.input_size, pp.input_size, 3) and out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["image"], expected)
    assert out["label"] == 1


@pytest.mark.reference
def test_eval_transform_matches_torchvision_and_timm(reference, sample_images):
    from timm.data import create_transform
    from torchvision import transforms as tvt

    modes = {
        "bicubic": tvt.InterpolationMode.BICUBIC,
        "bilinear": tvt.InterpolationMode.BILINEAR,
        "nearest": tvt.InterpolationMode.NEAREST,
    }
    for pp in EVAL_CONFIGS:
        tv = tvt.Compose(
            [
                tvt.Resize(pp.resize_size, modes[pp.interpolation], antialias=True),
                tvt.CenterCrop(pp.input_size),
            ]
        )
        timm_tf = create_transform(
            input_size=pp.input_size, crop_pct=pp.crop_pct, interpolation=pp.interpolation, is_training=False
        )
        # timm's eval transform = Resize + CenterCrop on PIL, then ToTensor/Normalize (done on device here).
        timm_pil = tvt.Compose(
            [t for t in timm_tf.transforms if type(t).__name__ in ("Resize", "CenterCrop")]
        )
        assert len(timm_pil.transforms) == 2, timm_tf
        for name, img in sample_images.items():
            ours = T.EvalTransform(pp).map(img)
            pil = Image.fromarray(img).convert("RGB")
            np.testing.assert_array_equal(ours, np.asarray(tv(pil)), err_msg=f"{name} {pp}")
            np.testing.assert_array_equal(ours, np.asarray(timm_pil(pil)), err_msg=f"timm {name} {pp}")


def test_rrc_params_sampling():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = T.rrc_params(300, 451, rng, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 451 and h > 0 and w > 0
        # Rounding h and w moves area and ratio only slightly outside the sampled ranges.
        assert 0.08 * 0.95 <= h * w / (300 * 451) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # scale=(1, 1) on a very wide image never fits: the central fallback with ratio clamped to 4/3.
    assert T.rrc_params(10, 100, rng, (1.0, 1.0)) == (0, (100 - 13) // 2, 10, 13)
    assert T.rrc_params(100, 10, rng, (1.0, 1.0)) == ((100 - 13) // 2, 0, 13, 10)
    # An image whose own ratio lies inside `ratio`: the fallback is the whole image (scale 2 never fits).
    assert T.rrc_params(30, 35, rng, (2.0, 2.0), (0.5, 2.0)) == (0, 0, 30, 35)


@pytest.mark.reference
def test_rrc_params_follow_torchvision(reference):
    """Same random draws -> the same crop box as torchvision's `RandomResizedCrop.get_params`."""
    torch, _ = reference
    from torchvision import transforms as tvt

    class TorchDraws:  # numpy-Generator-like facade over torch's global RNG, in torchvision's call order
        def uniform(self, lo, hi):
            return torch.empty(1).uniform_(lo, hi).item()

        def integers(self, lo, hi):
            return torch.randint(lo, hi, size=(1,)).item()

    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    for h, w in ((300, 451), (64, 64), (20, 400), (400, 20)):
        for seed in range(100):
            torch.manual_seed(seed)
            expected = tvt.RandomResizedCrop.get_params(torch.zeros(3, h, w), list(scale), list(ratio))
            torch.manual_seed(seed)
            assert T.rrc_params(h, w, TorchDraws(), scale, ratio) == tuple(expected), (h, w, seed)


@pytest.mark.reference
def test_resized_crop_matches_torchvision(reference, sample_images):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    img = sample_images["flower"]
    for interp, mode in (("bilinear", InterpolationMode.BILINEAR), ("bicubic", InterpolationMode.BICUBIC)):
        for box in ((10, 20, 200, 150), (0, 0, 427, 640), (100, 300, 37, 51)):
            ours = T.resized_crop(img, *box, 96, interp)
            theirs = F.resized_crop(Image.fromarray(img), *box, [96, 96], mode, antialias=True)
            np.testing.assert_array_equal(ours, np.asarray(theirs))


def test_random_resized_crop_and_flip():
    img = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    rrc = T.RandomResizedCrop(24, interpolation="bilinear")
    out = rrc.random_map({"image": img}, np.random.default_rng(5))["image"]
    box = T.rrc_params(40, 60, np.random.default_rng(5))
    np.testing.assert_array_equal(out, T.resized_crop(img, *box, 24, "bilinear"))
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    # Flip: p=0 never, p=1 always (an exact mirror), p=0.5 about half the time.
    never, always = T.RandomHorizontalFlip(0.0), T.RandomHorizontalFlip(1.0)
    np.testing.assert_array_equal(never.random_map(img, np.random.default_rng(0)), img)
    np.testing.assert_array_equal(always.random_map(img, np.random.default_rng(0)), img[:, ::-1])
    half = T.RandomHorizontalFlip()
    flips = sum(not np.array_equal(half.random_map(img, np.random.default_rng(s)), img) for s in range(200))
    assert 70 < flips < 130
    with pytest.raises(ValueError, match="scale"):
        T.RandomResizedCrop(24, scale=(0.5, 0.1))


def test_train_transform(sample_images):
    pp = Preprocess(32, 0.875, "bicubic")
    tf = T.TrainTransform(pp)
    grey = sample_images["camera"][:100, :150]
    a = tf.random_map({"image": grey, "label": np.int32(2)}, np.random.default_rng(3))
    b = tf.random_map({"image": grey, "label": np.int32(2)}, np.random.default_rng(3))
    c = tf.random_map({"image": grey, "label": np.int32(2)}, np.random.default_rng(4))
    assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.uint8 and a["label"] == 2
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])
    # Same draws by hand: RRC with the backbone's interpolation, then the flip.
    rng = np.random.default_rng(3)
    box = T.rrc_params(100, 150, rng)
    manual = T.resized_crop(T.to_rgb(grey), *box, 32, "bicubic")
    if rng.random() < 0.5:
        manual = manual[:, ::-1]
    np.testing.assert_array_equal(a["image"], manual)


def test_transforms_in_grain_pipeline(sample_images):
    images = [sample_images[k] for k in ("chelsea", "camera", "coffee", "flower")]
    items = [{"image": im, "label": np.int32(i)} for i, im in enumerate(images)]
    pp = Preprocess(48, 0.9, "bicubic")
    assert pp.resize_size == math.floor(48 / 0.9) == 53
    eval_tf = pickle.loads(pickle.dumps(T.EvalTransform(pp)))  # grain workers pickle transforms
    ds = grain.MapDataset.source(items).map(eval_tf).batch(4)
    batch = ds[0]
    assert batch["image"].shape == (4, 48, 48, 3) and batch["image"].dtype == np.uint8
    for i, im in enumerate(images):
        np.testing.assert_array_equal(
            batch["image"][i], T.center_crop(T.resize_shorter(T.to_rgb(im), 53), 48)
        )
    np.testing.assert_array_equal(batch["label"], [0, 1, 2, 3])
    # Random ops draw from grain's per-element rng: reproducible per seed, different across seeds.
    train_tf = pickle.loads(pickle.dumps(T.TrainTransform(pp)))
    first = grain.MapDataset.source(items).seed(1).random_map(train_tf).batch(4)[0]["image"]
    again = grain.MapDataset.source(items).seed(1).random_map(train_tf).batch(4)[0]["image"]
    other = grain.MapDataset.source(items).seed(2).random_map(train_tf).batch(4)[0]["image"]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.shape == (4, 48, 48, 3)


def test_squash_eval_transform_matches_timm(reference, sample_images):
    """crop_mode='squash' (EVA-02 448 fine-tunes): both sides resized, then centre crop, as timm does."""
    from timm.data import create_transform
    from torchvision import transforms as tvt

    pp = Preprocess(input_size=48, crop_pct=0.9, interpolation="bicubic", crop_mode="squash")
    timm_tf = create_transform(
        input_size=48, crop_pct=0.9, interpolation="bicubic", crop_mode="squash", is_training=False
    )
    pil_ops = tvt.Compose([t for t in timm_tf.transforms if type(t).__name__ in ("Resize", "CenterCrop")])
    assert len(pil_ops.transforms) == 2, timm_tf
    for name, img in sample_images.items():
        want = np.asarray(pil_ops(Image.fromarray(img).convert("RGB")))
        np.testing.assert_array_equal(T.EvalTransform(pp).map(img), want, err_msg=name)
