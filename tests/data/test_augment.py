"""Fine-tuning augmentations (bob_jax.data.augment / batch_augment) against timm's own code.

Per-element ops are checked bit for bit against timm's PIL ops with the random decisions fixed; the full
RandAugment and the batch ops run timm's classes with their random sources replaced by fakes that
replay our draws, so any difference in algorithm (order of draws, rounding, box arithmetic) shows up.
"""

from __future__ import annotations

import functools
import pickle
import types

import numpy as np
import pytest
from PIL import Image

from bob_jax.backbones.preprocess import IMAGENET_MEAN, Preprocess
from bob_jax.data import augment as A

HPARAMS = A.rand_augment_hparams(224, IMAGENET_MEAN)  # what create_transform passes for a 224 model


@pytest.fixture
def old_pillow_posterize(monkeypatch):
    """timm's PosterizeIncreasing asks for 0 bits at magnitude 10; Pillow < 10 gave a black image, newer
    Pillow raises. Restore the old behaviour for the timm side of the comparisons."""
    from PIL import ImageOps

    original = ImageOps.posterize

    def posterize(image, bits):
        return image.point([0] * 256 * len(image.getbands())) if bits == 0 else original(image, bits)

    monkeypatch.setattr(ImageOps, "posterize", posterize)


@pytest.fixture(scope="module")
def crops():
    """Small real photographs (odd sizes, so centre/rounding conventions matter)."""
    from skimage import data

    return [
        np.ascontiguousarray(data.chelsea()[60:117, 150:221]),  # 57 x 71
        np.ascontiguousarray(data.coffee()[100:164, 200:250]),  # 64 x 50
    ]


def test_hparams_match_create_transform():
    assert HPARAMS == {"translate_const": 100, "img_mean": (124, 116, 104)}
    hp = A.rand_augment_hparams((256, 320), (0.5, 0.5, 0.5), "bicubic")
    assert hp == {"translate_const": 115, "img_mean": (128, 128, 128), "interpolation": "bicubic"}


def test_level_to_arg_matches_timm(reference):
    import timm.data.auto_augment as taa

    extra = {"TranslateX", "TranslateY", "PosterizeOriginal"}
    names = sorted(set(A.RAND_OPS + A.RAND_INCREASING_OPS) | extra)
    for name in names:
        fn = taa.LEVEL_TO_ARG[name]
        for level in (0.0, 0.4, 2.5, 5.0, 7.3, 9.0, 9.99, 10.0):
            for negate in (False, True):
                ours = A.level_to_arg(name, level, HPARAMS, negate)
                if fn is None:
                    assert ours == ()
                    continue
                # timm negates when random.random() > 0.5.
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(taa.random, "random", lambda: 1.0 if negate else 0.0)
                    theirs = fn(level, HPARAMS)
                assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-12), (name, level, negate)
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        A.level_to_arg("Cutout", 5)


@pytest.mark.reference
@pytest.mark.parametrize("name", A.RAND_INCREASING_OPS + ("Posterize", "Solarize", "Color", "TranslateX"))
def test_each_op_matches_timm(reference, crops, name, monkeypatch, old_pillow_posterize):
    import timm.data.auto_augment as taa

    for interp, pil in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
        hp = dict(HPARAMS, interpolation=pil, magnitude_std=0)
        for level in (3.0, 9.0, 10.0):
            op = taa.AugmentOp(name, prob=1.0, magnitude=level, hparams=hp)
            for negate in (False, True):
                monkeypatch.setattr(taa.random, "random", lambda: 1.0 if negate else 0.0)
                for img in crops:
                    expected = np.asarray(op(Image.fromarray(img)))
                    out = A.apply_op(img, name, level, negate=negate, hparams=HPARAMS, interpolation=interp)
                    assert out.dtype == np.uint8 and out.shape == img.shape
                    np.testing.assert_array_equal(out, expected, err_msg=f"{name} m={level} neg={negate}")
        if name not in A._GEOMETRIC:
            break  # the filter only matters for resampling ops


def test_ops_change_images(crops):
    img = crops[0]
    for name in A.RAND_INCREASING_OPS:
        out = A.apply_op(img, name, 9.0, hparams=HPARAMS)
        assert out.shape == img.shape and not np.array_equal(out, img), name
    # Geometric ops fill uncovered pixels with img_mean (a 30 degree rotation uncovers the corners).
    rot = A.apply_op(img, "Rotate", 10.0, hparams=HPARAMS, interpolation="bilinear")
    np.testing.assert_array_equal(rot[0, 0], HPARAMS["img_mean"])
    # Posterize to 0 bits (magnitude 10) is black, as with the Pillow of the original runs.
    assert not A.apply_op(img, "PosterizeIncreasing", 10.0).any()
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        A.apply_op(img, "Cutout", 5.0)
    with pytest.raises(ValueError, match="interpolation"):
        A.apply_op(img, "Rotate", 5.0, interpolation="lanczos")


class _ReplayRandom:
    """Stands in for Python's `random` and `np.random` inside timm's auto_augment module, drawing from a
    numpy Generator in exactly the order our RandAugment does."""

    def __init__(self, rng):
        self.rng = rng
        self.random_state = self  # np.random.choice lives on `np.random`

    def random(self):
        return float(self.rng.random())

    def gauss(self, mu, sigma):
        return float(self.rng.normal(mu, sigma))

    def uniform(self, a, b):
        return float(self.rng.uniform(a, b))

    def choice(self, seq, size=None, replace=True, p=None):
        if size is None:  # random.choice(interpolations)
            return seq[int(self.rng.integers(0, len(seq)))]
        assert replace and p is None
        return [seq[int(i)] for i in self.rng.integers(0, len(seq), size=size)]


class _NumpyWithRandom:
    def __init__(self, random):
        self.random = random

    def __getattr__(self, name):
        return getattr(np, name)


@pytest.mark.reference
@pytest.mark.parametrize("interpolation", ["random", "bicubic"])
def test_rand_augment_matches_timm_transform(
    reference, crops, interpolation, monkeypatch, old_pillow_posterize
):
    """timm's own `rand_augment_transform('rand-m9-mstd0.5-inc1', hparams)`, random sources replayed."""
    import timm.data.auto_augment as taa
    from timm.data.transforms import str_to_pil_interp

    hp = A.rand_augment_hparams(224, IMAGENET_MEAN, interpolation)
    timm_hp = dict(hp)
    if "interpolation" in timm_hp:
        timm_hp["interpolation"] = str_to_pil_interp(timm_hp["interpolation"])
    timm_ra = taa.rand_augment_transform("rand-m9-mstd0.5-inc1", timm_hp)
    ours = A.RandAugment("rand-m9-mstd0.5-inc1", hp)
    assert [op.name for op in timm_ra.ops] == list(ours.ops) == taa._RAND_INCREASING_TRANSFORMS
    assert list(A.RAND_OPS) == taa._RAND_TRANSFORMS
    assert (ours.magnitude, ours.magnitude_std, ours.num_layers, ours.prob) == (9, 0.5, 2, 0.5)
    changed = 0
    for seed in range(40):
        img = crops[seed % 2]
        replay = _ReplayRandom(np.random.default_rng(seed))
        monkeypatch.setattr(taa, "random", replay)
        monkeypatch.setattr(taa, "np", _NumpyWithRandom(replay))
        expected = np.asarray(timm_ra(Image.fromarray(img)))
        out = ours.augment(img, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, expected, err_msg=f"seed {seed}")
        changed += not np.array_equal(out, img)
    assert changed > 20  # P(no op applied) = 1/4


def test_rand_augment_grain_reproducible(crops):
    import grain

    ra = A.RandAugment("rand-m9-mstd0.5-inc1", HPARAMS)
    assert isinstance(ra, grain.transforms.RandomMap)
    el = {"image": crops[0], "label": np.int32(4)}
    a = ra.random_map(el, np.random.default_rng(7))
    b = ra.random_map(el, np.random.default_rng(7))
    assert a["label"] == 4 and a["image"].dtype == np.uint8 and a["image"].shape == crops[0].shape
    np.testing.assert_array_equal(a["image"], b["image"])
    outs = [ra.augment(crops[0], np.random.default_rng(s)).tobytes() for s in range(12)]
    assert len(set(outs)) >= 8
    # Through grain: same seed -> same images, another seed -> different images.
    ds = grain.MapDataset.source([el] * 6).seed(3).random_map(ra)
    first = [x["image"] for x in ds]
    np.testing.assert_array_equal(np.stack(first), np.stack([x["image"] for x in ds]))
    other = [x["image"] for x in grain.MapDataset.source([el] * 6).seed(4).random_map(ra)]
    assert not np.array_equal(np.stack(first), np.stack(other))


def test_rand_augment_config_parsing():
    ra = A.RandAugment("rand-m7-n3-p0.8-mstd101-mmax12")
    assert (ra.magnitude, ra.num_layers, ra.prob, ra.magnitude_std, ra.magnitude_max) == (
        7, 3, 0.8, float("inf"), 12
    )
    assert ra.ops == A.RAND_OPS
    rng = np.random.default_rng(0)
    assert all(0 <= ra.sample_magnitude(rng) <= 7 for _ in range(50))  # uniform in [0, m]
    ra = A.RandAugment("rand-m9-mstd0.5-inc1")
    mags = np.array([ra.sample_magnitude(rng) for _ in range(2000)])
    assert mags.max() <= 10 and abs(mags.mean() - 9) < 0.05 and abs(mags.std() - 0.5) < 0.05
    for bad in ("augmix-m3", "rand-m9-q3"):
        with pytest.raises(ValueError, match="RandAugment config"):
            A.RandAugment(bad)
    with pytest.raises(ValueError, match="HxWx3"):
        ra.augment(np.zeros((4, 4), np.uint8), rng)


# --------------------------------------------------------------------------------------------------
# ColorJitter
# --------------------------------------------------------------------------------------------------


@pytest.mark.reference
def test_color_jitter_fixed_factors(reference, crops):
    """Against torchvision's functional adjust_brightness / contrast / saturation on PIL images."""
    import torchvision.transforms.functional as TF

    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for img in crops:
        cases = (((0.6, 1.4, 0.9), (0, 1, 2)), ((1.3, 0.7, 1.4), (2, 0, 1)), ((1.0, 1.0, 0.6), (1, 2, 0)))
        for factors, order in cases:
            expected = Image.fromarray(img)
            for i in order:
                expected = adjust[i](expected, factors[i])
            np.testing.assert_array_equal(A.color_jitter(img, *factors, order=order), np.asarray(expected))
        # Order matters (contrast uses the mean of the current image), so the op order is part of the draw.
        a = A.color_jitter(img, 1.4, 0.6, 1.0, order=(0, 1, 2))
        b = A.color_jitter(img, 1.4, 0.6, 1.0, order=(1, 0, 2))
        assert not np.array_equal(a, b)


@pytest.mark.reference
def test_color_jitter_matches_torchvision(reference, crops, monkeypatch):
    """torchvision `ColorJitter(0.4, 0.4, 0.4)` (as timm builds it), its parameter draw replaced by ours."""
    import torch
    from torchvision import transforms as tvt

    tv = tvt.ColorJitter(0.4, 0.4, 0.4)
    cj = A.ColorJitter(0.4, 0.4, 0.4)
    assert tv.hue is None and cj.ranges == (tuple(tv.brightness), tuple(tv.contrast), tuple(tv.saturation))
    for seed in range(6):
        rng = np.random.default_rng(seed)
        order = [int(i) for i in rng.permutation(3)]
        f = [float(rng.uniform(0.6, 1.4)) for _ in range(3)]
        fn_idx = torch.tensor(order[:1] + [3] + order[1:])  # hue (3) is drawn too but disabled
        monkeypatch.setattr(tvt.ColorJitter, "get_params", staticmethod(lambda *_: (fn_idx, *f, None)))
        img = crops[seed % 2]
        np.testing.assert_array_equal(
            cj.jitter(img, np.random.default_rng(seed)), np.asarray(tv(Image.fromarray(img)))
        )


def test_color_jitter_random(crops):
    cj = A.ColorJitter(0.4, 0.4, 0.4)
    assert cj.ranges == ((0.6, 1.4),) * 3
    img = crops[1]
    outs = set()
    for seed in range(10):
        rng = np.random.default_rng(seed)
        order = rng.permutation(3)
        f = [rng.uniform(0.6, 1.4) for _ in range(3)]
        np.testing.assert_array_equal(
            cj.jitter(img, np.random.default_rng(seed)), A.color_jitter(img, *f, order=order)
        )
        outs.add(cj.random_map({"image": img}, np.random.default_rng(seed))["image"].tobytes())
    assert len(outs) == 10
    assert A.ColorJitter(0, 0, 0).jitter(img, np.random.default_rng(0)) is img
    with pytest.raises(ValueError, match="brightness"):
        A.ColorJitter(-0.1)


# --------------------------------------------------------------------------------------------------
# Batch ops (jax): random erasing, mixup / cutmix
# --------------------------------------------------------------------------------------------------


def _normalised_batch(crops, n=8, size=48):
    """n normalised NHWC float32 images cut from the photos."""
    imgs = []
    for i in range(n):
        src = crops[i % 2]
        y, x = (3 * i) % (src.shape[0] - size // 2), (5 * i) % (src.shape[1] - size // 2)
        tile = np.resize(src[y:, x:], (size, size, 3)).astype(np.float32)
        imgs.append((tile / 255.0 - np.array(IMAGENET_MEAN)) / 0.225)
    return np.stack(imgs).astype(np.float32)


class _ReplayPyRandom:
    """Python `random` for timm.data.random_erasing, replaying our uniforms; randint returns our box
    corner after checking that timm asks for the same range (so h and w agree)."""

    def __init__(self, params, area, log_ratio, height, width):
        self.p = {k: np.asarray(v) for k, v in params.items()}
        self.area, self.log_ratio, self.hw = area, log_ratio, (height, width)
        self.image, self.box, self.attempt, self.corner = -1, 0, 0, []

    def random(self):  # first draw per image: the apply decision
        self.image += 1
        self.box, self.attempt = 0, 0
        return float(self.p["u_apply"][self.image])

    def uniform(self, a, b):
        i, c, t = self.image, self.box, self.attempt
        if (a, b) == self.area:
            return a + (b - a) * float(self.p["u_area"][i, c, t])
        assert (a, b) == self.log_ratio
        self.attempt += 1
        return a + (b - a) * float(self.p["u_ratio"][i, c, t])

    def randint(self, a, b):
        i, c = self.image, self.box
        h, w = int(self.p["h"][i, c]), int(self.p["w"][i, c])
        if not self.corner:
            assert (a, b) == (0, self.hw[0] - h), "timm chose a different box height"
            self.corner.append(int(self.p["top"][i, c]))
            return self.corner[0]
        assert (a, b) == (0, self.hw[1] - w), "timm chose a different box width"
        top, left = self.corner[0], int(self.p["left"][i, c])
        self.corner = []
        self.last_box = (i, top, left, h, w)
        self.box += 1
        self.attempt = 0
        return left


ERASE_SHAPE = (64, 32, 32, 3)


@functools.cache
def _erase_fn():
    """One compiled random erasing (p 0.25, pixel mode) shared by the tests: compiling dominates."""
    import jax

    from bob_jax.data import batch_augment as BA

    return jax.jit(lambda k, x: BA.random_erasing(k, x, probability=0.25, return_params=True))


@pytest.mark.reference
def test_random_erasing_matches_timm(reference, crops, monkeypatch):
    import jax
    import timm.data.random_erasing as tre
    import torch

    x = _normalised_batch(crops, n=ERASE_SHAPE[0], size=ERASE_SHAPE[1])
    b, height, width, _ = x.shape
    out, params, noise = _erase_fn()(jax.random.key(3), x)
    out, noise = np.asarray(out), np.asarray(noise)

    timm_re = tre.RandomErasing(0.25, mode="pixel", max_count=1, device="cpu")
    replay = _ReplayPyRandom(params, (0.02, 1 / 3), timm_re.log_aspect_ratio, height, width)
    monkeypatch.setattr(tre, "random", replay)

    def get_pixels(per_pixel, rand_color, patch_size, dtype, device):
        assert per_pixel and tuple(patch_size) == (3, replay.last_box[3], replay.last_box[4])
        i, top, left, h, w = replay.last_box
        return torch.from_numpy(noise[i, top : top + h, left : left + w].transpose(2, 0, 1).copy())

    monkeypatch.setattr(tre, "_get_pixels", get_pixels)
    expected = timm_re(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(out, expected)
    erased = (out != x).any(axis=(1, 2, 3))
    assert replay.image == b - 1 and 5 <= erased.sum() <= 30
    np.testing.assert_array_equal(erased, np.asarray(params["apply"] & params["valid"][:, 0]))


def test_random_erasing_statistics():
    import jax

    from bob_jax.data import batch_augment as BA

    x = np.zeros(ERASE_SHAPE, np.float32) + 5.0  # far from N(0, 1) noise: erased pixels stand out
    outs = [np.asarray(_erase_fn()(jax.random.key(s), x)[0]) for s in range(8)]
    out = np.concatenate(outs)
    assert out.dtype == np.float32
    erased = out != 5.0
    per_image = erased.any(-1).mean(axis=(1, 2))
    frac_erased = (per_image > 0).mean()
    assert 0.19 < frac_erased < 0.31  # Binomial(512, 0.25): sd 0.019
    hit = per_image[per_image > 0]
    # Box areas lie in [0.02, 1/3] of the image up to rounding of the sides; mean area ~ 0.18.
    assert hit.min() >= 0.01 and hit.max() <= 0.4 and 0.12 < hit.mean() < 0.24
    noise = out[erased]
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
    # Every erased region is one axis-aligned box over all channels.
    for img in np.flatnonzero(per_image > 0)[:20]:
        m = erased[img].all(-1)
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        assert m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all() and m.sum() == len(rows) * len(cols)
    # Seeded: same key same output; the key changes the outcome.
    np.testing.assert_array_equal(outs[0], np.asarray(_erase_fn()(jax.random.key(0), x)[0]))
    assert not np.array_equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="mode"):
        BA.random_erasing(jax.random.key(0), x, mode="zeros")


def test_apply_random_erasing_boxes_and_modes():
    """Hand-made params: boxes drawn in order (the later on top), per-box colours ('rand'), skipped
    images and boxes without a valid try left alone."""
    from bob_jax.data import batch_augment as BA

    x = np.zeros((3, 6, 7, 2), np.float32)
    params = {
        "apply": np.array([True, False, True]),
        "valid": np.array([[True, True], [True, True], [False, True]]),
        "top": np.array([[0, 2]] * 3), "left": np.array([[1, 3]] * 3),
        "h": np.array([[3, 2]] * 3), "w": np.array([[4, 3]] * 3),
    }  # fmt: skip
    colours = np.arange(12, dtype=np.float32).reshape(3, 2, 2) + 1  # [B, count, C]
    out = np.asarray(BA.apply_random_erasing(x, params, colours))
    ref = x.copy()
    ref[0, 0:3, 1:5] = colours[0, 0]
    ref[0, 2:4, 3:6] = colours[0, 1]
    ref[2, 2:4, 3:6] = colours[2, 1]
    np.testing.assert_array_equal(out, ref)
    pixel = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    out = np.asarray(BA.apply_random_erasing(x, params, pixel))
    np.testing.assert_array_equal(out[0, 0:3, 1:5], pixel[0, 0:3, 1:5])
    np.testing.assert_array_equal(out[1], x[1])


class _ReplayNpRandom:
    """np.random for timm.data.mixup: rand() -> our u_mix, u_switch; beta -> our lam_raw;
    randint(0, H) / randint(0, W) -> our box centre."""

    def __init__(self, params, height, width):
        p = {k: np.asarray(v) for k, v in params.items()}
        self.rands = [float(p["u_mix"]), float(p["u_switch"])]
        self.lam = float(p["lam_raw"])
        self.ints = [(height, int(p["cy"])), (width, int(p["cx"]))]

    def rand(self):
        return self.rands.pop(0)

    def beta(self, a, b):
        return self.lam

    def randint(self, low, high, size=None):
        expected_high, value = self.ints.pop(0)
        assert (low, high, size) == (0, expected_high, None)
        return np.int64(value)


MIX = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.9, switch_prob=0.5)
MIX_SIDE = 37  # odd side: exercises the (cut + 1) // 2 box edge


@functools.cache
def _mix_fn():
    import jax

    from bob_jax.data import batch_augment as BA

    return jax.jit(
        lambda k, x, y: BA.mixup_cutmix(k, x, y, 10, label_smoothing=0.1, return_params=True, **MIX)
    )


@pytest.mark.reference
def test_mixup_cutmix_matches_timm(reference, crops, monkeypatch):
    import jax
    import timm.data.mixup as tmix
    import torch

    x = _normalised_batch(crops, n=6, size=MIX_SIDE)
    labels = np.array([0, 3, 9, 3, 1, 7], np.int32)
    kinds = set()
    for seed in range(10):
        out, target, params = _mix_fn()(jax.random.key(seed), x, labels)
        monkeypatch.setattr(tmix, "np", _NumpyWithRandom(_ReplayNpRandom(params, MIX_SIDE, MIX_SIDE)))
        timm_mix = tmix.Mixup(num_classes=10, label_smoothing=0.1, mode="batch", correct_lam=True, **MIX)
        xt, tt = timm_mix(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels).long())
        np.testing.assert_allclose(np.asarray(out), xt.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(target), tt.numpy(), rtol=0, atol=1e-6)
        lam, use_cutmix = float(params["lam"]), bool(params["use_cutmix"])
        kinds.add("none" if lam == 1 else "cutmix" if use_cutmix else "mixup")
    assert {"mixup", "cutmix"} <= kinds


def test_mixup_target_and_statistics(crops):
    import jax

    from bob_jax.data import batch_augment as BA

    t = np.asarray(BA.mixup_target(np.array([2, 0]), 4, 0.7, 0.1))
    y = np.full((2, 4), 0.025)
    y[0, 2] = y[1, 0] = 0.925
    np.testing.assert_allclose(t, 0.7 * y + 0.3 * y[::-1], atol=1e-7)
    x = _normalised_batch(crops, n=6, size=MIX_SIDE)
    labels = np.arange(6)
    smooth = np.eye(10)[labels] * 0.9 + 0.01
    draws = []
    for seed in range(400):
        out, target, params = _mix_fn()(jax.random.key(seed), x, labels)
        p = {k: float(v) for k, v in params.items()}
        draws.append(p)
        np.testing.assert_allclose(np.asarray(target).sum(1), 1.0, atol=1e-6)
        if p["u_mix"] >= MIX["prob"]:  # not mixing: batch unchanged, plain smoothed targets
            assert p["lam"] == 1.0
            np.testing.assert_array_equal(np.asarray(out), x)
            np.testing.assert_allclose(np.asarray(target), smooth, atol=1e-7)
    p = {k: np.array([d[k] for d in draws]) for k in draws[0]}
    mixing = p["u_mix"] < MIX["prob"]
    assert 0.85 < mixing.mean() < 0.95
    cut = p["use_cutmix"].astype(bool)
    assert not cut[~mixing].any() and 0.4 < cut[mixing].mean() < 0.6
    # Beta(0.8, 0.8) and Beta(1, 1) both have mean 0.5 (sd ~0.3: 3 sd of a 180-draw mean ~ 0.07).
    mix = mixing & ~cut
    assert abs(p["lam"][mix].mean() - 0.5) < 0.07 and abs(p["lam_raw"][cut].mean() - 0.5) < 0.07
    np.testing.assert_array_equal(p["lam"][mix], p["lam_raw"][mix])
    area = (p["yh"] - p["yl"]) * (p["xh"] - p["xl"])
    np.testing.assert_allclose(p["lam"][cut], 1 - area[cut] / MIX_SIDE**2, atol=1e-6)
    # The corrected lam is never below the raw one: boxes shrink by flooring and by clipping at edges.
    assert (p["lam"][cut] >= p["lam_raw"][cut] - 1e-6).all()
    with pytest.raises(ValueError, match="even batch"):
        BA.mixup_cutmix(jax.random.key(1), x[:3], labels[:3], 10)


@pytest.mark.reference
def test_cutmix_box_matches_timm_rand_bbox(reference, monkeypatch):
    """Current timm's rand_bbox, and timm 0.6.12's (cy + cut // 2 edges) via `legacy=True`."""
    import timm.data.mixup as tmix

    from bob_jax.data import batch_augment as BA

    cases = ((0.3, 10, 30, 37, 41), (0.71, 0, 40, 37, 41), (0.05, 36, 3, 37, 41), (0.5, 12, 12, 24, 24))
    for lam, cy, cx, h, w in cases:
        ints = [cy, cx]
        fake = types.SimpleNamespace(randint=lambda lo, hi, size=None: ints.pop(0))
        monkeypatch.setattr(tmix, "np", _NumpyWithRandom(fake))
        expected = tmix.rand_bbox((3, h, w), lam)
        ours = [int(v) for v in BA.cutmix_box(lam, cy, cx, h, w)]
        assert ours == [int(v) for v in expected], (lam, cy, cx)
        cut_h, cut_w = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
        legacy = [int(v) for v in BA.cutmix_box(lam, cy, cx, h, w, legacy=True)]
        assert legacy == [
            max(0, cy - cut_h // 2), min(h, cy + cut_h // 2), max(0, cx - cut_w // 2), min(w, cx + cut_w // 2)
        ]


# --------------------------------------------------------------------------------------------------
# FinetuneTrainTransform
# --------------------------------------------------------------------------------------------------

PP32 = Preprocess(input_size=32, crop_pct=0.875, interpolation="bicubic", mean=(0.5, 0.5, 0.5))


def test_finetune_transform_chain(crops):
    from bob_jax.data import transforms as T

    tf = A.FinetuneTrainTransform(PP32)
    # RandAugment on: colour jitter off (timm), hparams from the backbone's size and mean.
    assert tf.color_jitter is None and tf.rand_augment is not None
    assert tf.rand_augment.hparams == {"translate_const": 14, "img_mean": (128, 128, 128)}
    assert tf.rand_augment.resample is None  # 'random': bilinear or bicubic per op
    for seed in range(6):
        img = crops[seed % 2]
        out = tf.random_map({"image": img, "label": np.int32(1)}, np.random.default_rng(seed))
        # The same chain by hand, drawing from the same generator in timm's order.
        rng = np.random.default_rng(seed)
        top, left, h, w = T.rrc_params(img.shape[0], img.shape[1], rng, (0.08, 1.0), (3 / 4, 4 / 3))
        interp = ("bilinear", "bicubic")[int(rng.integers(0, 2))]
        ref = T.resized_crop(img, top, left, h, w, 32, interp)
        if rng.random() < 0.5:
            ref = ref[:, ::-1]
        ref = tf.rand_augment.augment(np.ascontiguousarray(ref), rng)
        assert out["label"] == 1 and out["image"].dtype == np.uint8 and out["image"].shape == (32, 32, 3)
        np.testing.assert_array_equal(out["image"], ref)
    # No auto-augment: colour jitter 0.4 instead; a fixed interpolation reaches RandAugment's hparams.
    tf = A.FinetuneTrainTransform(PP32, auto_augment=None)
    assert tf.rand_augment is None and tf.color_jitter.ranges == ((0.6, 1.4),) * 3
    tf = A.FinetuneTrainTransform(PP32, interpolation=None)
    assert tf.interpolation == "bicubic" and tf.rand_augment.resample == Image.BICUBIC
    # Grey input goes through ToRGB first.
    grey = np.ascontiguousarray(crops[0][..., 0])
    assert tf.transform(grey, np.random.default_rng(0)).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="interpolation"):
        A.FinetuneTrainTransform(PP32, interpolation="lanczos")
    with pytest.raises(ValueError, match="hflip"):
        A.FinetuneTrainTransform(PP32, hflip=1.5)


def test_finetune_transform_in_pipeline(crops):
    from bob_jax.data import pipelines as P

    source = [{"image": crops[i % 2][i : i + 48, 2 * i : 2 * i + 40], "label": i} for i in range(10)]
    tf = A.FinetuneTrainTransform(PP32)

    def take(ds, n):
        it = iter(ds)
        return [next(it) for _ in range(n)], it

    # Picklable, as grain's worker processes need.
    img = source[0]["image"]
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(tf)).transform(img, np.random.default_rng(0)),
        tf.transform(img, np.random.default_rng(0)),
    )
    first, it = take(P.train_dataset(source, tf, 4, seed=1, num_threads=1), 3)
    for b in first:
        assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8
        assert b["label"].dtype == np.int32 and (b["label"] == b["index"]).all()
    again, _ = take(P.train_dataset(source, tf, 4, seed=1, num_threads=1), 3)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    other, _ = take(P.train_dataset(source, tf, 4, seed=2, num_threads=1), 3)
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, other, strict=True))
    # Exact resume from a stored iterator state.
    state = it.get_state()
    nxt = next(it)
    resumed = iter(P.train_dataset(source, tf, 4, seed=1, num_threads=1))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], nxt["image"])


class _ReplayTimmTransforms:
    """Python `random` for timm.data.transforms (RandomResizedCropAndInterpolation)."""

    def __init__(self, rng):
        self.rng = rng

    def uniform(self, a, b):
        return float(self.rng.uniform(a, b))

    def randint(self, a, b):
        return int(self.rng.integers(a, b + 1))

    def choice(self, seq):
        return seq[int(self.rng.integers(0, len(seq)))]


@pytest.mark.reference
def test_finetune_transform_matches_timm(reference, crops, monkeypatch, old_pillow_posterize):
    """timm's own `transforms_imagenet_train(..., auto_augment='rand-m9-mstd0.5-inc1', color_jitter=0.4,
    interpolation='random')` PIL stages, every random source replaying one generator."""
    import timm.data.auto_augment as taa
    import timm.data.transforms as ttr
    import torchvision.transforms.functional as TF
    from timm.data.transforms_factory import transforms_imagenet_train

    primary, secondary, _ = transforms_imagenet_train(
        32, scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="random", mean=PP32.mean, std=PP32.std, separate=True,
    )  # fmt: skip
    rrc, flip = primary.transforms
    (timm_ra,) = secondary.transforms  # no ColorJitter next to RandAugment
    expected_hp = {"translate_const": 14, "img_mean": (128, 128, 128), "magnitude_std": 0.5}
    assert timm_ra.ops[0].hparams == expected_hp
    tf = A.FinetuneTrainTransform(PP32)
    for seed in range(16):
        img = crops[seed % 2]
        rng = np.random.default_rng(seed)
        replay = _ReplayRandom(rng)
        monkeypatch.setattr(ttr, "random", _ReplayTimmTransforms(rng))
        monkeypatch.setattr(taa, "random", replay)
        monkeypatch.setattr(taa, "np", _NumpyWithRandom(replay))
        expected = rrc(Image.fromarray(img))
        if rng.random() < flip.p:  # torchvision's flip draws torch.rand(1) < p
            expected = TF.hflip(expected)
        expected = np.asarray(timm_ra(expected))
        out = tf.transform(img, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, expected, err_msg=f"seed {seed}")
