"""Mask pasting (against torch's grid_sample), COCO result dicts and COCO AP on hand-built cases."""

import numpy as np
import pytest
from pycocotools import mask as mask_util

from bob_jax.detection.coco_eval import evaluate_coco, paste_masks, to_coco_results

# --------------------------------------------------------------------------------------------------
# paste_masks
# --------------------------------------------------------------------------------------------------


def test_paste_masks_hand_example():
    """M = 2, box (0, 0, 4, 4): pixel centres 0.5..3.5 sample cells u = -0.25, 0.25, 0.75, 1.25, so a
    mask with only cell (0, 0) set gives weights (0.75, 0.75, 0.25, 0) per axis (zero padding)."""
    mask = np.asarray([[[1.0, 0.0], [0.0, 0.0]]])
    soft = paste_masks(mask, np.asarray([[0.0, 0.0, 4.0, 4.0]]), (5, 6), threshold=None)
    w = np.asarray([0.75, 0.75, 0.25, 0.0])
    expected = np.zeros((5, 6))
    expected[:4, :4] = np.outer(w, w)
    np.testing.assert_allclose(soft[0], expected, atol=1e-7)
    hard = paste_masks(mask, np.asarray([[0.0, 0.0, 4.0, 4.0]]), (5, 6))
    assert hard.dtype == np.uint8
    np.testing.assert_array_equal(hard[0], expected >= 0.5)  # the 2x2 top-left block (0.5625)
    # A box of zero width pastes nothing.
    assert not paste_masks(np.ones((1, 2, 2)), np.asarray([[3.0, 1.0, 3.0, 4.0]]), (5, 6)).any()


def _torch_paste(torch, masks, boxes, height, width, dtype):
    """detectron2's `_do_paste_mask` over the whole image (GPU path, skip_empty=False)."""
    import torch.nn.functional as F

    masks = torch.as_tensor(masks, dtype=dtype)[:, None]
    boxes = torch.as_tensor(boxes, dtype=dtype)
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
    img_y = torch.arange(0, height, dtype=dtype) + 0.5
    img_x = torch.arange(0, width, dtype=dtype) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    n = masks.shape[0]
    gx = img_x[:, None, :].expand(n, height, width)
    gy = img_y[:, :, None].expand(n, height, width)
    grid = torch.stack([gx, gy], dim=3)
    return F.grid_sample(masks, grid, align_corners=False)[:, 0].numpy()


@pytest.mark.reference
def test_paste_masks_matches_torch_grid_sample(reference):
    torch, _ = reference
    rng = np.random.default_rng(0)
    height, width, n, m = 57, 83, 40, 28
    masks = rng.random((n, m, m))
    centre = rng.uniform([-10, -10], [width + 10, height + 10], (n, 2))  # some boxes leave the image
    size = np.exp(rng.uniform(np.log(0.5), np.log(120), (n, 2)))  # sub-pixel to larger than the image
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    # The same maths in float64 agrees to rounding; the float32 path detectron2 runs differs by up to
    # ~1e-4 on sub-pixel boxes (steep sampling slopes), so thresholds are compared away from 0.5.
    expected = _torch_paste(torch, masks, boxes, height, width, torch.float64)
    soft = paste_masks(masks, boxes, (height, width), threshold=None)
    np.testing.assert_allclose(soft, expected, atol=1e-6)  # soft output is float32
    torch32 = _torch_paste(torch, masks, boxes, height, width, torch.float32)
    hard = paste_masks(masks, boxes, (height, width))
    decided = np.abs(torch32 - 0.5) > 1e-3
    np.testing.assert_array_equal(hard[decided], (torch32 >= 0.5)[decided])
    assert hard.sum() > 1000 and decided.mean() > 0.999


# --------------------------------------------------------------------------------------------------
# to_coco_results
# --------------------------------------------------------------------------------------------------


def test_to_coco_results_maps_back_to_original_pixels_and_coco_ids():
    boxes = np.asarray([[10, 20, 50, 60], [0, 0, 8, 4], [1, 1, 2, 2]], np.float32)
    masks = np.zeros((3, 30, 40), np.uint8)
    masks[0, 10:30, 5:25] = 1
    masks[1, 0:2, 0:4] = 1
    results = to_coco_results(
        9, boxes, [0.9, 0.3, 0.7], [1, 0, 2], masks, scale=2.0, category_ids=[1, 3, 90],
        valid=[True, True, False],
    )  # fmt: skip
    assert [r["category_id"] for r in results] == [3, 1] and [r["score"] for r in results] == [0.9, 0.3]
    assert results[0]["bbox"] == [5.0, 10.0, 20.0, 20.0] and results[1]["bbox"] == [0.0, 0.0, 4.0, 2.0]
    assert all(r["image_id"] == 9 for r in results)
    for r, mask in zip(results, masks):
        assert isinstance(r["segmentation"]["counts"], str)
        np.testing.assert_array_equal(mask_util.decode(r["segmentation"]), mask)
    # Anisotropic scale (scale_y, scale_x); classes < 0 are padding; no masks -> no segmentation.
    (r,) = to_coco_results(1, boxes[:2], [0.5, 0.5], [0, -1], scale=(2.0, 4.0), category_ids=[7])
    assert r["bbox"] == [2.5, 10.0, 10.0, 20.0] and "segmentation" not in r
    with pytest.raises(ValueError, match="class 3 has no COCO category"):
        to_coco_results(1, boxes[:1], [0.5], [3], scale=1.0, category_ids=[1, 2])


def test_to_coco_results_pastes_mask_probabilities():
    probs = np.zeros((1, 4, 4))
    probs[0, 1:3, 1:3] = 1.0
    boxes = np.asarray([[8.0, 4.0, 24.0, 20.0]])  # input pixels; scale 2 -> (4, 2, 12, 10) original
    (r,) = to_coco_results(1, boxes, [1.0], [0], probs, scale=2.0, category_ids=[1], image_hw=(16, 16))
    expected = paste_masks(probs, boxes / 2.0, (16, 16))[0]
    np.testing.assert_array_equal(mask_util.decode(r["segmentation"]), expected)
    assert expected[4:8, 6:10].all() and expected.sum() == 16


# --------------------------------------------------------------------------------------------------
# evaluate_coco
# --------------------------------------------------------------------------------------------------


def _rect_mask(height, width, x, y, w, h):
    mask = np.zeros((height, width), np.uint8)
    mask[y : y + h, x : x + w] = 1
    return mask


def _gt(objects, height=200, width=200, images=(1,)):
    """A COCO dict: objects = [(image_id, category_id, mask)], boxes tight around the masks."""
    anns = []
    for i, (image_id, cat, mask) in enumerate(objects):
        rle = mask_util.encode(np.asfortranarray(mask))
        anns.append(
            {"id": i + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
             "bbox": mask_util.toBbox(rle).tolist(), "area": float(mask_util.area(rle)),
             "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()}}
        )  # fmt: skip
    return {
        "images": [{"id": i, "height": height, "width": width, "file_name": f"{i}.png"} for i in images],
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


def _predict(image_id, cat, mask, score, box=None):
    rle = mask_util.encode(np.asfortranarray(mask))
    return {
        "image_id": image_id,
        "category_id": cat,
        "bbox": list(box) if box is not None else mask_util.toBbox(rle).tolist(),
        "score": score,
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
    }


def test_perfect_predictions_score_one(capsys):
    objects = [(1, 1, _rect_mask(200, 200, 10, 10, 40, 40)), (1, 2, _rect_mask(200, 200, 100, 90, 50, 60)),
               (2, 1, _rect_mask(200, 200, 5, 120, 20, 20))]  # fmt: skip
    gt = _gt(objects, images=(1, 2))
    results = [_predict(i, c, m, 0.9) for i, c, m in objects]
    metrics = evaluate_coco(gt, results)
    for iou_type in ("bbox", "segm"):
        m = metrics[iou_type]
        for key in ("AP", "AP50", "AP75", "APs", "APm"):
            assert m[key] == pytest.approx(1.0, abs=1e-12)
        assert np.isnan(m["APl"])  # no large object: COCOeval's -1 -> NaN
    assert capsys.readouterr().out == "", "pycocotools' prints are captured"


def test_one_of_two_equal_objects_missed():
    """Recall 1/2 at precision 1, then nothing: 51 of COCO's 101 recall points (0, 0.01, .., 0.5) have
    precision 1 at every IoU threshold, so AP = AP50 = AP75 = 51/101."""
    a, b = _rect_mask(200, 200, 10, 10, 40, 40), _rect_mask(200, 200, 100, 100, 40, 40)
    gt = _gt([(1, 1, a), (1, 1, b)])
    metrics = evaluate_coco(gt, [_predict(1, 1, a, 0.8)])
    for iou_type in ("bbox", "segm"):
        for key in ("AP", "AP50", "AP75", "APm"):
            assert metrics[iou_type][key] == pytest.approx(51 / 101, abs=1e-12)


def test_shifted_box_with_known_iou():
    """A 100x100 object and a prediction shifted 20 px: IoU = 8000 / 12000 = 2/3, a match at the
    thresholds 0.50, 0.55, 0.60, 0.65 only: AP50 = 1, AP75 = 0, AP = 4/10."""
    gt = _gt([(1, 1, _rect_mask(200, 200, 50, 50, 100, 100))])
    pred = _predict(1, 1, _rect_mask(200, 200, 70, 50, 100, 100), 0.9)
    metrics = evaluate_coco(gt, [pred])
    for iou_type in ("bbox", "segm"):
        m = metrics[iou_type]
        # pycocotools' precision is tp / (tp + fp + eps): 1 - 2e-16, not 1.
        assert m["AP50"] == pytest.approx(1.0, abs=1e-12) and m["AP75"] == 0.0
        assert m["AP"] == pytest.approx(0.4, abs=1e-12)
        assert m["APl"] == pytest.approx(0.4, abs=1e-12)


def test_segm_scores_the_mask_not_the_box():
    """An L-shaped object: its box would give mask IoU 0.36 with the true mask. A perfect mask prediction
    that also carries a 'bbox' key scores 1 only if the segm pass drops that key (porting.md 13.4)."""
    mask = np.zeros((200, 200), np.uint8)
    mask[20:120, 20:40] = 1
    mask[100:120, 20:120] = 1
    gt = _gt([(1, 1, mask)])
    pred = _predict(1, 1, mask, 0.9)
    assert "bbox" in pred
    metrics = evaluate_coco(gt, [pred], iou_types=("segm",))
    assert list(metrics) == ["segm"]
    assert metrics["segm"]["AP"] == pytest.approx(1.0, abs=1e-12) == metrics["segm"]["APm"]


def test_empty_results_and_image_subsets(tmp_path):
    import json

    a, b = _rect_mask(200, 200, 10, 10, 40, 40), _rect_mask(200, 200, 60, 60, 40, 40)
    gt = _gt([(1, 1, a), (2, 1, b)], images=(1, 2))
    empty = evaluate_coco(gt, [])
    assert empty == {
        t: dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"), 0.0) for t in ("bbox", "segm")
    }
    only_first = [_predict(1, 1, a, 0.9)]
    assert evaluate_coco(gt, only_first, img_ids=[1])["bbox"]["AP"] == pytest.approx(1.0, abs=1e-12)
    assert evaluate_coco(gt, only_first)["bbox"]["AP"] == pytest.approx(51 / 101)  # image 2's object missed
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    assert evaluate_coco(str(path), only_first, iou_types=("bbox",), img_ids=[1]) == {
        "bbox": evaluate_coco(gt, only_first, img_ids=[1])["bbox"]
    }
    with pytest.raises(ValueError, match="image ids not in the ground truth"):
        evaluate_coco(gt, [_predict(5, 1, a, 0.9)])
    with pytest.raises(ValueError, match="no 'segmentation'"):
        evaluate_coco(gt, [{k: v for k, v in only_first[0].items() if k != "segmentation"}])


def test_synthetic_ground_truth_scores_itself(tmp_path):
    """The whole path on the synthetic set: GT instances turned into results via to_coco_results."""
    from bob_jax.detection.synthetic import make_synthetic

    data = make_synthetic(6, seed=1, size=96)
    results = []
    for image in data.coco["images"]:
        anns = [a for a in data.coco["annotations"] if a["image_id"] == image["id"]]
        boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]) * 1.5
        masks = np.stack([mask_util.decode(a["segmentation"]) for a in anns])
        classes = [a["category_id"] - 1 for a in anns]
        results += to_coco_results(
            image["id"],
            boxes,
            np.linspace(1, 0.5, len(anns)),
            classes,
            masks,
            scale=1.5,
            category_ids=[1, 2, 3, 4, 5],
        )
    metrics = evaluate_coco(data.coco, results)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
