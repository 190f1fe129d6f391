"""Fine-tuning augmentations (bob_jax.data.augment / batch_augment) against timm's own code.

Per-element ops are checked bit for bit against timm's PIL ops with the random decisions fixed; the full
RandAugment and the batch ops run timm's classes with their random sources replaced by fakes that
replay our draws, so any difference in algorithm (order of draws, rounding, box arithmetic) shows up.
"""

from __future__ import annotations

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
    assert [op.name for op in timm_ra.ops] == list(ours.ops)
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


def _tv_adjust(img: Image.Image, which: int, factor: float) -> Image.Image:
    """torchvision.transforms._functional_pil adjust_brightness / contrast / saturation (torchvision is
    not installed here; these are its PIL bodies: one ImageEnhance call each)."""
    from PIL import ImageEnhance

    return (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[which](img).enhance(factor)


def test_color_jitter_fixed_factors(crops):
    for img in crops:
        cases = (((0.6, 1.4, 0.9), (0, 1, 2)), ((1.3, 0.7, 1.4), (2, 0, 1)), ((1.0, 1.0, 0.6), (1, 2, 0)))
        for factors, order in cases:
            expected = Image.fromarray(img)
            for i in order:
                expected = _tv_adjust(expected, i, factors[i])
            np.testing.assert_array_equal(A.color_jitter(img, *factors, order=order), np.asarray(expected))
        # Order matters (contrast uses the mean of the current image), so the op order is part of the draw.
        a = A.color_jitter(img, 1.4, 0.6, 1.0, order=(0, 1, 2))
        b = A.color_jitter(img, 1.4, 0.6, 1.0, order=(1, 0, 2))
        assert not np.array_equal(a, b)


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
