"""Synthetic shapes set, the COCO-format source and the fixed-shape detection transforms."""

import json
import math

import grain
import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from bob_jax.detection import synthetic
from bob_jax.detection.data import (
    LSJ,
    CocoDetection,
    MultiScaleResize,
    TestResize,
    crop_example,
    example_rng,
    hflip_example,
    resize_example,
)
from bob_jax.detection.synthetic import (
    MIN_VISIBLE_AREA,
    SHAPE_CLASSES,
    make_synthetic,
    write_coco_dataset,
)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_coco_dataset(root, "train", 12, seed=5, size=(96, 128))
    return root


@pytest.fixture(scope="module")
def shapes(shapes_root):
    return CocoDetection(shapes_root / "train" / "annotations.json", shapes_root / "train" / "images")


def _decode(ann):
    return mask_util.decode(ann["segmentation"])


def _mask_box(mask):
    """(x1, y1, x2, y2) pixel-edge box of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.asarray([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)


# --------------------------------------------------------------------------------------------------
# Synthetic set
# --------------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_per_seed_and_index():
    a, b = make_synthetic(6, seed=3, size=(80, 112)), make_synthetic(6, seed=3, size=(80, 112))
    assert json.dumps(a.coco).encode() == json.dumps(b.coco).encode()
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert a.images[0].shape == (80, 112, 3) and a.images[0].dtype == np.uint8
    prefix = make_synthetic(3, seed=3, size=(80, 112))  # image i depends on (seed, i) only
    assert all(np.array_equal(x, y) for x, y in zip(prefix.images, a.images[:3]))
    other = make_synthetic(6, seed=4, size=(80, 112))
    assert not any(np.array_equal(x, y) for x, y in zip(other.images, a.images))


def test_synthetic_annotations_are_exact_visible_masks_and_tight_boxes():
    data = make_synthetic(10, seed=0, size=96)
    coco = data.coco
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(SHAPE_CLASSES) + 1))
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    for image_entry, image in zip(coco["images"], data.images):
        anns = [a for a in coco["annotations"] if a["image_id"] == image_entry["id"]]
        assert anns, "every image shows at least one shape"
        union = np.zeros(image.shape[:2], int)
        for ann in anns:
            mask = _decode(ann)
            assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)
            assert ann["area"] == mask.sum() >= MIN_VISIBLE_AREA
            x, y, w, h = ann["bbox"]
            np.testing.assert_array_equal(_mask_box(mask), [x, y, x + w, y + h])  # tight
            np.testing.assert_array_equal(mask_util.toBbox(ann["segmentation"]), ann["bbox"])
            union += mask
            # one flat colour per visible part (normal domain) up to the pixel noise, unlike the background
            assert image[mask.astype(bool)].std(axis=0).max() < 12
        assert union.max() == 1, "visible masks do not overlap"


def test_shape_rasteriser_against_matplotlib_paths():
    height, width = 64, 80
    yy, xx = np.mgrid[0:height, 0:width]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1)
    for cls, name in enumerate(SHAPE_CLASSES):
        for k in range(4):
            aspect = 0.5 if name == "ellipse" else 1.0
            shape = synthetic._Shape(
                cls, 30.3 + 7.1 * k, 25.7 + 3.3 * k, 9.0 + 4.2 * k, 0.37 * (k + 1), aspect
            )
            mask = synthetic._rasterise(shape, height, width)
            if name in ("circle", "ellipse"):  # a 2000-gon is the ellipse to ~1e-5 px
                t = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
                u, v = shape.radius * np.cos(t), shape.radius * shape.aspect * np.sin(t)
                c, s = math.cos(shape.angle), math.sin(shape.angle)
                verts = np.stack([shape.cx + u * c - v * s, shape.cy + u * s + v * c], axis=1)
            else:
                verts = synthetic._polygon(shape)
            expected = MplPath(verts).contains_points(centres).reshape(height, width)
            assert np.sum(mask != expected) <= 1, (name, k)
            assert mask.sum() > 0


def test_shifted_twin_changes_colours_not_annotations():
    normal = make_synthetic(24, seed=0, size=64)
    twin = make_synthetic(24, seed=0, size=64, shift=True)
    normal_other = make_synthetic(24, seed=1, size=64)
    twin_other = make_synthetic(24, seed=1, size=64, shift=True)
    # Same seed: the same scenes (geometry stream shared), another look.
    assert twin.coco["annotations"] == normal.coco["annotations"]
    assert twin.coco["info"]["shift"] and not normal.coco["info"]["shift"]

    def colour_hist(images):  # joint RGB histogram, 4 levels per channel
        pixels = np.concatenate([im.reshape(-1, 3) for im in images]) // 64
        codes = pixels[:, 0] * 16 + pixels[:, 1] * 4 + pixels[:, 2]
        return np.bincount(codes, minlength=64) / len(codes)

    def tv(p, q):
        return 0.5 * np.abs(p - q).sum()

    same_domain = tv(colour_hist(normal.images), colour_hist(normal_other.images))
    across = tv(colour_hist(normal.images), colour_hist(twin_other.images))
    assert same_domain < 0.3 and across > 0.6 and across > 2 * same_domain, (same_domain, across)
    # Different seeds: the annotation statistics agree between domains (same geometry distribution).
    for a, b in ((normal, twin_other),):
        per_image = [len(x.coco["annotations"]) / len(x.coco["images"]) for x in (a, b)]
        mean_log_area = [np.mean([math.log(an["area"]) for an in x.coco["annotations"]]) for x in (a, b)]
        assert abs(per_image[0] - per_image[1]) < 1.2 and abs(mean_log_area[0] - mean_log_area[1]) < 0.5


def test_writer_round_trips_through_pycocotools(tmp_path):
    ann_path, image_dir = write_coco_dataset(tmp_path, "val", 4, seed=2, size=64, shift=True)
    data = make_synthetic(4, seed=2, size=64, shift=True)
    coco = COCO(str(ann_path))
    assert sorted(coco.getImgIds()) == [1, 2, 3, 4]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
    for entry, image in zip(data.coco["images"], data.images):
        np.testing.assert_array_equal(np.asarray(Image.open(image_dir / entry["file_name"])), image)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[entry["id"]])):
            np.testing.assert_array_equal(coco.annToMask(ann), _decode(ann))
    # Same parameters: the files are left alone; the bytes are reproducible in another root.
    stamp = ann_path.stat().st_mtime_ns
    assert write_coco_dataset(tmp_path, "val", 4, seed=2, size=64, shift=True) == (ann_path, image_dir)
    assert ann_path.stat().st_mtime_ns == stamp
    other_ann, other_dir = write_coco_dataset(tmp_path / "again", "val", 4, seed=2, size=64, shift=True)
    assert other_ann.read_bytes() == ann_path.read_bytes()
    assert (other_dir / "000003.png").read_bytes() == (image_dir / "000003.png").read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))


# --------------------------------------------------------------------------------------------------
# COCO-format source
# --------------------------------------------------------------------------------------------------


def test_coco_detection_matches_the_json(shapes, shapes_root):
    raw = json.loads((shapes_root / "train" / "annotations.json").read_text())
    assert len(shapes) == 12 and shapes.num_classes == 5 and shapes.class_names == SHAPE_CLASSES
    assert shapes.contiguous_to_coco == (1, 2, 3, 4, 5)
    item = shapes[3]
    anns = [a for a in raw["annotations"] if a["image_id"] == item["image_id"]]
    assert item["image"].shape == (96, 128, 3) and item["image"].dtype == np.uint8
    assert item["boxes"].dtype == np.float32 and item["classes"].dtype == np.int32
    np.testing.assert_array_equal(
        item["boxes"], [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
    )
    np.testing.assert_array_equal(item["classes"], [a["category_id"] - 1 for a in anns])
    np.testing.assert_array_equal(item["masks"], np.stack([_decode(a) for a in anns]))
    assert shapes.describe()["num_classes"] == 5


def test_category_selection_and_coco_id_gaps(shapes_root):
    stars = CocoDetection(
        shapes_root / "train" / "annotations.json", shapes_root / "train" / "images", category_names=("star",)
    )
    assert stars.num_classes == 1 and stars.contiguous_to_coco == (5,) and stars.class_names == ("star",)
    counts = [len(stars[i]["classes"]) for i in range(len(stars))]
    assert all((stars[i]["classes"] == 0).all() for i in range(len(stars))) and sum(counts) > 0
    with pytest.raises(ValueError, match="not in annotations.json"):
        CocoDetection(
            shapes_root / "train" / "annotations.json", shapes_root / "train", category_names=("car",)
        )


def _hand_coco(tmp_path):
    """COCO-style ids with gaps (1, 3, 90), polygons, uncompressed RLE, a crowd and a degenerate box."""
    h, w = 20, 30
    Image.fromarray(np.full((h, w, 3), 7, np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(np.full((h, w), 9, np.uint8)).save(tmp_path / "b.png")  # grey -> RGB
    square = np.zeros((h, w), np.uint8)
    square[5:10, 3:13] = 1
    flat = square.ravel(order="F")
    runs, value, run = [], 0, 0
    for v in flat:
        if v != value:
            runs.append(run)
            value, run = v, 0
        run += 1
    runs.append(run)
    anns = [
        {"id": 1, "image_id": 1, "category_id": 90, "bbox": [3, 5, 10, 5], "area": 50, "iscrowd": 0,
         "segmentation": [[3, 5, 13, 5, 13, 10, 3, 10]]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [3, 5, 10, 5], "area": 50, "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": runs}},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 30, 20], "area": 600, "iscrowd": 1,
         "segmentation": {"size": [h, w], "counts": [0, 600]}},
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [4, 4, 0.5, 6], "area": 3, "iscrowd": 0,
         "segmentation": [[4, 4, 4.5, 4, 4.5, 10, 4, 10]]},
    ]  # fmt: skip
    coco = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "height": h, "width": w},
            {"id": 7, "file_name": "b.png", "height": h, "width": w},
        ],
        "annotations": anns,
        "categories": [{"id": i, "name": n} for i, n in ((1, "person"), (3, "car"), (90, "toothbrush"))],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return path, square


def test_coco_detection_rules_on_a_hand_built_json(tmp_path):
    path, square = _hand_coco(tmp_path)
    src = CocoDetection(path, tmp_path)
    assert src.contiguous_to_coco == (1, 3, 90) and src.coco_to_contiguous == {1: 0, 3: 1, 90: 2}
    item = src[0]
    # The crowd and the 0.5-px-wide annotation are not training targets (mmdet's rules).
    np.testing.assert_array_equal(item["classes"], [2, 1])
    np.testing.assert_array_equal(item["boxes"], [[3, 5, 13, 10]] * 2)
    np.testing.assert_array_equal(item["masks"][1], square)  # uncompressed RLE
    assert item["masks"][0].sum() == 50 and item["masks"][0][5:10, 3:13].all()  # polygon
    grey = src[1]
    assert (
        grey["image"].shape == (20, 30, 3)
        and grey["boxes"].shape == (0, 4)
        and grey["masks"].shape == (0, 20, 30)
    )
    assert grey["image_id"] == 7
    assert len(CocoDetection(path, tmp_path, filter_empty=True)) == 1
    cars = CocoDetection(path, tmp_path, category_names=("car",), with_masks=False)
    assert cars.num_classes == 1 and "masks" not in cars[0]
    np.testing.assert_array_equal(cars[0]["classes"], [0])


def test_coco_detection_errors_name_the_problem(tmp_path):
    path, _ = _hand_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="annotation file"):
        CocoDetection(tmp_path / "nope.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="image directory"):
        CocoDetection(path, tmp_path / "nope")
    with pytest.raises(ValueError, match=r"category ids \[2\]"):
        CocoDetection(path, tmp_path, category_ids=[2])
    (tmp_path / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="b.png.*missing"):
        CocoDetection(path, tmp_path)[1]
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="5x5 but instances.json says 20x30"):
        CocoDetection(path, tmp_path)[1]


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def _check_fixed_example(out, size, max_instances, with_masks=True):
    assert out["image"].shape == (size, size, 3) and out["image"].dtype == np.uint8
    assert out["gt_boxes"].shape == (max_instances, 4) and out["gt_boxes"].dtype == np.float32
    assert out["gt_classes"].shape == (max_instances,) and out["gt_classes"].dtype == np.int32
    assert out["image_size"].dtype == np.int32 and out["image_id"].dtype == np.int64
    h, w = out["image_size"]
    assert not out["image"][h:].any() and not out["image"][:, w:].any(), "padding is zero"
    valid = out["gt_classes"] >= 0
    assert (valid[: valid.sum()]).all(), "valid instances come first"
    assert not out["gt_boxes"][~valid].any()
    boxes = out["gt_boxes"][valid]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
    if with_masks:
        masks = out["gt_masks"]
        assert masks.shape == (max_instances, size, size) and masks.dtype == np.uint8
        assert not masks[~valid].any() and not masks[:, h:].any() and not masks[:, :, w:].any()
        for mask, box in zip(masks[valid], boxes):
            _check_mask_box(mask, box, upscaled=out["scale"] >= 1)


def _check_mask_box(mask, box, upscaled):
    """The box of a nearest-resized, cropped or flipped mask is the transformed box within 1/2 px when
    every source pixel is sampled (scale >= 1); shrinking may skip thin parts (tips) but never grows it."""
    assert mask.any()
    mask_box = _mask_box(mask)
    if upscaled:
        np.testing.assert_allclose(mask_box, box, atol=0.5 + 1e-4)
    else:
        assert (mask_box[:2] >= box[:2] - 0.5 - 1e-4).all() and (mask_box[2:] <= box[2:] + 0.5 + 1e-4).all()


def test_flip_resize_crop_keep_boxes_and_masks_consistent(shapes):
    example = shapes[1]
    flipped = hflip_example(example)
    for mask, box in zip(flipped["masks"], flipped["boxes"]):
        np.testing.assert_array_equal(_mask_box(mask), box)  # exact
    np.testing.assert_array_equal(hflip_example(flipped)["image"], example["image"])
    for height, width in ((41, 57), (96, 128), (250, 313)):
        resized = resize_example(example, height, width)
        for mask, box in zip(resized["masks"], resized["boxes"]):
            if mask.any():
                _check_mask_box(mask, box, upscaled=height >= 96)
    cropped = crop_example(resize_example(example, 192, 256), 30, 50, 100, 120)
    assert cropped["image"].shape == (100, 120, 3)
    for mask, box in zip(cropped["masks"], cropped["boxes"]):
        _check_mask_box(mask, box, upscaled=True)
    whole = crop_example(example, 0, 0, 96, 128)
    assert all(np.array_equal(whole[k], example[k]) for k in ("image", "boxes", "classes", "masks"))


def test_crop_tightens_only_the_boxes_it_cuts():
    yy, xx = np.mgrid[0:40, 0:40] + 0.5
    disc = ((xx - 20) ** 2 + (yy - 20) ** 2 <= 100).astype(np.uint8)
    square = np.zeros((40, 40), np.uint8)
    square[2:6, 3:7] = 1
    example = {
        "image": np.zeros((40, 40, 3), np.uint8),
        "boxes": np.asarray([[10, 10, 30, 30], [3, 2, 7, 6]], np.float32),
        "classes": np.asarray([0, 1], np.int32),
        "masks": np.stack([disc, square]),
    }
    out = crop_example(example, 0, 0, 40, 15)
    np.testing.assert_array_equal(out["boxes"][0], _mask_box(disc[:, :15]))  # cut: tight to its mask
    assert out["boxes"][0][1] > 10 and out["boxes"][0][2] == 15
    np.testing.assert_array_equal(out["boxes"][1], [3, 2, 7, 6])  # inside the crop: unchanged
    gone = crop_example(example, 0, 20, 40, 20)  # the square is cropped away
    np.testing.assert_array_equal(gone["classes"], [0])


def test_nearest_mask_resize_is_the_exact_centre_rule():
    """Output pixel j reads source pixel floor((j + 1/2) * in / out), in exact rational arithmetic
    (PIL's NEAREST disagrees at exact ties through float rounding)."""
    from fractions import Fraction

    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w, out_h, out_w = (int(v) for v in rng.integers(2, 300, 4))
        masks = (rng.random((2, h, w)) < 0.5).astype(np.uint8)
        example = {"image": np.zeros((h, w, 3), np.uint8), "boxes": np.zeros((2, 4), np.float32),
                   "classes": np.zeros(2, np.int32), "masks": masks}  # fmt: skip
        rows = [min(math.floor(Fraction(2 * i + 1, 2) * h / out_h), h - 1) for i in range(out_h)]
        cols = [min(math.floor(Fraction(2 * j + 1, 2) * w / out_w), w - 1) for j in range(out_w)]
        np.testing.assert_array_equal(
            resize_example(example, out_h, out_w)["masks"], masks[:, rows][:, :, cols]
        )


@pytest.mark.parametrize("index", range(6))
def test_lsj_outputs_fixed_shapes_with_consistent_targets(shapes, index):
    lsj = LSJ(128, scale=(0.3, 2.0), max_instances=8)
    for epoch in range(3):
        out = lsj.apply(shapes[index], seed=11, index=index, epoch=epoch)
        _check_fixed_example(out, 128, 8)
        assert out["orig_size"].tolist() == [96, 128] and out["image_id"] == shapes.image_ids[index]
        h, w = out["image_size"]
        assert (h, w) == (min(round(96 * out["scale"]), 128), min(round(128 * out["scale"]), 128))


def test_lsj_keeps_masks_on_their_pixels(shapes):
    """Flat-coloured shapes: the mean colour under each transformed mask is the shape's colour."""
    from scipy.ndimage import binary_erosion

    example = shapes[5]
    colours = [example["image"][m.astype(bool)].mean(0) for m in example["masks"]]
    lsj = LSJ(128, scale=(1.2, 2.0), max_instances=10)
    for epoch in range(4):
        out = lsj.apply(example, seed=0, index=5, epoch=epoch)
        for mask, cls in zip(out["gt_masks"], out["gt_classes"]):
            if cls < 0:
                continue
            inner = binary_erosion(mask, iterations=1)
            if inner.sum() < 10:
                continue
            mean = out["image"][inner].mean(0)
            assert min(np.abs(mean - c).max() for c in colours) < 6


def test_source_pickles_without_its_index(shapes):
    import pickle

    clone = pickle.loads(pickle.dumps(shapes))
    assert clone.__dict__["_coco"] is None
    assert all(np.array_equal(clone[2][k], shapes[2][k]) for k in ("image", "boxes", "classes", "masks"))


def test_lsj_is_seeded_per_example_and_epoch(shapes):
    lsj = LSJ(128)
    a = lsj.apply(shapes[0], seed=1, index=0, epoch=0)
    b = lsj.apply(shapes[0], seed=1, index=0, epoch=0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    others = [lsj.apply(shapes[0], seed=1, index=0, epoch=e) for e in (1, 2, 3)]
    assert len({float(o["scale"]) for o in others} | {float(a["scale"])}) == 4


def test_lsj_crop_path_equals_resize_then_crop(shapes):
    from bob_jax.detection.data import _resize_and_crop

    example = shapes[2]
    fast = _resize_and_crop(example, 150, 200, 17, 40, 128, 128)
    slow = crop_example(resize_example(example, 150, 200), 17, 40, 128, 128)
    assert fast.keys() == slow.keys()
    assert all(np.array_equal(fast[k], slow[k]) for k in ("image", "boxes", "classes", "masks"))


def test_lsj_small_scale_drops_vanished_instances(shapes):
    lsj = LSJ(128, scale=(0.1, 0.1), flip_p=0.0)
    out = lsj.apply(shapes[0], seed=0, index=0)
    _check_fixed_example(out, 128, 100)
    assert tuple(out["image_size"]) == (10, 13)  # 96x128 fitted into 12.8 x 12.8


def test_multiscale_and_test_resize(shapes):
    example = shapes[4]
    ms = MultiScaleResize((48, 64, 80), max_size=112, max_instances=10)
    assert ms.pad_size == 128
    sizes = set()
    for i in range(8):
        out = ms.apply(example, seed=0, index=4, epoch=i)
        _check_fixed_example(out, 128, 10)
        sizes.add(tuple(out["image_size"]))
    assert sizes <= {(48, 64), (64, 85), (80, 107)} and len(sizes) >= 2  # int(x * s + 0.5)
    test = TestResize(200, pad_size=224)
    out = test.map(example)
    _check_fixed_example(out, 224, 100)
    assert tuple(out["image_size"]) == (150, 200) and out["scale"] == np.float32(200 / 128)
    expected = np.asarray(Image.fromarray(example["image"]).resize((200, 150), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out["image"][:150, :200], expected)
    n = len(example["classes"])
    np.testing.assert_allclose(
        out["gt_boxes"][:n] / out["scale"], example["boxes"], atol=1e-4
    )  # back to original
    np.testing.assert_array_equal(out["gt_classes"][:n], example["classes"])
    assert out["num_truncated"] == 0


def test_max_instances_truncates_and_counts(shapes):
    index = max(range(len(shapes)), key=lambda i: len(shapes[i]["classes"]))
    example = shapes[index]
    n = len(example["classes"])
    assert n >= 3
    out = TestResize(128, max_instances=2).map(example)
    assert out["num_truncated"] == n - 2 and (out["gt_classes"] >= 0).all()
    np.testing.assert_array_equal(out["gt_classes"], example["classes"][:2])


def test_transforms_run_in_a_grain_pipeline(shapes):
    ds = grain.MapDataset.source(shapes).seed(3).random_map(LSJ(128, max_instances=6)).batch(4)
    batch = ds[0]
    assert batch["image"].shape == (4, 128, 128, 3) and batch["gt_masks"].shape == (4, 6, 128, 128)
    assert batch["image_id"].dtype == np.int64
    again = grain.MapDataset.source(shapes).seed(3).random_map(LSJ(128, max_instances=6)).batch(4)[0]
    assert all(np.array_equal(batch[k], again[k]) for k in batch)


def test_example_rng_folds_seed_index_epoch():
    draws = {tuple(example_rng(s, i, e).random(2)) for s in (0, 1) for i in (0, 1) for e in (0, 1)}
    assert len(draws) == 8
    assert example_rng(3, 4, 5).random() == example_rng(3, 4, 5).random()
