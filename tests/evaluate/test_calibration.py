"""NLL and ECE: independent loop implementation, hand-computed cases, and agreement with the linear probe."""

import numpy as np
import pytest

from bob_jax.evaluate.calibration import (
    calibration_bins,
    calibration_metrics,
    ece_from_bins,
    expected_calibration_error,
    nll,
)


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _reference_ece(probs, labels, n_bins):
    # Straightforward Guo et al. (2017) loop: bins (lower, upper] over the max probability.
    conf = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    edges = [k / n_bins for k in range(n_bins + 1)]
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        members = [i for i in range(len(conf)) if lo < conf[i] <= hi]
        if members:
            acc = sum(pred[i] == labels[i] for i in members) / len(members)
            avg_conf = sum(conf[i] for i in members) / len(members)
            ece += len(members) / len(conf) * abs(acc - avg_conf)
    return ece


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_matches_reference_loop(n_bins):
    rng = np.random.default_rng(n_bins)
    logits = rng.normal(scale=3.0, size=(400, 7))
    labels = rng.integers(0, 7, size=400)
    labels[:200] = logits[:200].argmax(1)  # some accuracy so bins differ
    probs = _softmax(logits)
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(
        _reference_ece(probs, labels, n_bins), abs=1e-12
    )


def test_ece_hand_case_and_edges():
    # n_bins=2: bins (0, 0.5], (0.5, 1]. conf 0.5 sits on the edge and belongs to the lower bin.
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    labels = np.array([0, 0, 0, 1])
    # lower bin: {0.5 correct} -> |1 - 0.5| * 1/4; upper bin: confs 0.9, 0.8, 0.7, correct 1, 0, 1
    # -> |2/3 - 0.8| * 3/4 = 0.1.  ECE = 0.125 + 0.1 = 0.225
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.225)
    bins = calibration_bins(probs, labels, 2)
    np.testing.assert_allclose(bins["count"], [1, 3])
    np.testing.assert_allclose(bins["correct"], [1, 2])
    np.testing.assert_allclose(bins["confidence"], [0.5, 2.4])
    # A perfectly calibrated toy: confidence 1 and always right.
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_streaming_bins_add_up_and_valid_mask():
    rng = np.random.default_rng(3)
    probs = _softmax(rng.normal(size=(90, 5)))
    labels = rng.integers(0, 5, size=90)
    parts = [calibration_bins(probs[s : s + 30], labels[s : s + 30]) for s in (0, 30, 60)]
    total = {k: sum(p[k] for p in parts) for k in parts[0]}
    assert ece_from_bins(total) == pytest.approx(expected_calibration_error(probs, labels))
    valid = np.arange(90) < 50
    assert expected_calibration_error(probs, labels, valid=valid) == pytest.approx(
        expected_calibration_error(probs[:50], labels[:50])
    )


def test_nll_hand_and_reference():
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    labels = np.array([0, 0])
    # p = 1/2 and 3/4
    assert nll(logits, labels) == pytest.approx(-(np.log(0.5) + np.log(0.75)) / 2)
    rng = np.random.default_rng(4)
    big = rng.normal(scale=50.0, size=(20, 6))  # large logits: needs the stable log-softmax
    lab = rng.integers(0, 6, size=20)
    m = big.max(1, keepdims=True)
    want = np.mean(m[:, 0] + np.log(np.exp(big - m).sum(1)) - big[np.arange(20), lab])
    assert nll(big, lab) == pytest.approx(want, rel=1e-12)
    assert np.isfinite(nll(big, lab))


def test_errors():
    with pytest.raises(ValueError, match="probabilities"):
        expected_calibration_error(np.array([[2.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        nll(np.zeros((1, 2)), np.array([2]))
    with pytest.raises(ValueError, match="NaN"):
        nll(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(np.eye(2), np.arange(2), n_bins=0)


def test_matches_linear_probe_eval():
    """The linear probe's streamed jitted ECE/NLL equal this module's on the same logits."""
    import jax
    from flax import nnx

    from bob_jax import parallel
    from bob_jax.tasks.linear_probe import LinearProbeHead, evaluate, head_logits_numpy, make_eval_step

    rng = np.random.default_rng(5)
    x = rng.normal(size=(100, 8)).astype(np.float32)
    head = LinearProbeHead(8, 4, use_bn=False, rngs=nnx.Rngs(0))
    head.fc.kernel[...] = rng.normal(scale=1.5, size=(8, 4)).astype(np.float32)
    y = (x[:, :4].argmax(1) + (rng.random(100) < 0.3)) % 4
    graphdef, params, batch_stats = nnx.split(head, nnx.Param, nnx.BatchStat)
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    got = evaluate(
        make_eval_step(graphdef, mesh), params, batch_stats, x, y, batch_size=32, mesh=mesh, num_classes=4
    )
    logits = head_logits_numpy(nnx.state(head), x)
    want = calibration_metrics(logits, y)
    assert got["top1"] == pytest.approx(want["top1"])
    assert got["nll"] == pytest.approx(want["nll"], rel=1e-5)
    assert got["ece"] == pytest.approx(want["ece"], abs=1e-5)
