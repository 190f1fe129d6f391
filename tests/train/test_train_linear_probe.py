"""Linear probe: head semantics, learning, exact masked evaluation, sharding invariance, crash-resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bob_jax import parallel
from bob_jax.tasks.linear_probe import (
    ECE_BINS,
    LinearProbeConfig,
    LinearProbeHead,
    create_train_state,
    head_logits_numpy,
    make_optimizer,
    make_schedule,
    make_train_dataset,
    make_train_step,
    run_linear_probe,
)

WORKER = Path(__file__).with_name("probe_worker.py")


def blobs(n, dim=32, classes=10, seed=0, sep=1.5):
    """Gaussian class blobs (linearly separable for sep=1.5), offset so BN has something to remove."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)) * sep
    y = rng.integers(0, classes, n)
    x = (means[y] + rng.normal(size=(n, dim)) + 2.0).astype(np.float32)
    return x, y


def numpy_metrics(logits, labels):
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    probs = np.exp(logp)
    conf, pred = probs.max(1), logits.argmax(1)
    correct = pred == labels
    ece = 0.0
    for b in range(ECE_BINS):
        sel = (conf > b / ECE_BINS) & (conf <= (b + 1) / ECE_BINS)
        ece += abs(correct[sel].sum() - conf[sel].sum())
    top5 = np.any(np.argsort(-logits, 1)[:, :5] == labels[:, None], 1)
    return {
        "top1": correct.mean(),
        "top5": top5.mean(),
        "nll": -logp[np.arange(len(labels)), labels].mean(),
        "ece": ece / len(labels),
    }


def test_head_init_and_torch_batchnorm_semantics():
    head = LinearProbeHead(256, 100, rngs=nnx.Rngs(0))
    kernel = np.asarray(head.fc.kernel[...])
    assert kernel.shape == (256, 100)
    assert abs(kernel.std() - 0.01) < 0.0005 and abs(kernel.mean()) < 0.0005
    np.testing.assert_array_equal(np.asarray(head.fc.bias[...]), 0.0)
    assert not isinstance(head.bn.mean, nnx.Param)  # non-affine BN: statistics only, nothing trained

    x = np.random.default_rng(0).normal(size=(8, 256)).astype(np.float32) * 3 + 1
    y = np.asarray(head.bn(jnp.asarray(x), train=True))
    mean, var = x.mean(0), x.var(0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-6), rtol=1e-4, atol=1e-4)
    # torch: running stats use momentum 0.1 and the UNBIASED batch variance.
    np.testing.assert_allclose(np.asarray(head.bn.mean[...]), 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(head.bn.var[...]), 0.9 + 0.1 * x.var(0, ddof=1), rtol=1e-5)
    # Eval mode normalises with the running statistics and leaves them untouched.
    before = np.asarray(head.bn.var[...]).copy()
    y_eval = np.asarray(head.bn(jnp.asarray(x), train=False))
    np.testing.assert_allclose(y_eval, (x - 0.1 * mean) / np.sqrt(before + 1e-6), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(head.bn.var[...]), before)
    assert LinearProbeHead(4, 3, use_bn=False, rngs=nnx.Rngs(0)).bn is None


def test_probe_learns_and_masked_eval_counts_each_example_once():
    x, y = blobs(1024 + 250)
    config = LinearProbeConfig(epochs=10, warmup_epochs=1, batch_size=64, base_lr=20.0, eval_batch_size=64)
    result = run_linear_probe(
        x[:1024],
        y[:1024],
        x[1024:],
        y[1024:],
        num_classes=10,
        config=config,
        progress=False,
        return_state=True,
    )
    assert result["steps"] == 10 * 16 and result["lr"] == pytest.approx(5.0)
    assert result["top1"] > 0.95
    assert result["train_loss_final"] < 1.0
    # 250 test examples in 4 batches of 64: 6 padded rows must not count.
    assert result["num_eval"] == 250
    want = numpy_metrics(head_logits_numpy(result["head_state"], x[1024:]), y[1024:])
    for key in ("top1", "top5", "nll", "ece"):
        np.testing.assert_allclose(result[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)


def _train_on(mesh, x, y, config, steps_per_epoch):
    tx = make_optimizer(config, steps_per_epoch)
    # Initialise once (random-init compiles are slow on CPU), then place on each mesh.
    graphdef, state = _initial_state(config, x.shape[1], tx)
    state = jax.device_put(state, parallel.replicated(mesh))
    step_fn = make_train_step(
        graphdef, tx, mesh, steps_per_epoch, lr_schedule=make_schedule(config, steps_per_epoch)
    )
    ds = make_train_dataset(x, y, batch_size=config.batch_size, epochs=config.epochs, seed=config.seed)
    losses = []
    for batch in ds:
        state, metrics = step_fn(state, parallel.shard_batch(batch, mesh), None)
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(
        nnx.to_pure_dict(nnx.merge_state(state["params"], state["batch_stats"]))
    )


_INITIAL = {}


def _initial_state(config, dim, tx):
    if dim not in _INITIAL:
        mesh1 = parallel.make_mesh(devices=jax.devices()[:1])
        graphdef, state = create_train_state(config, dim, 10, tx, mesh1)
        _INITIAL[dim] = graphdef, jax.device_get(state)
    return _INITIAL[dim]


def test_eight_devices_match_one_device():
    x, y = blobs(512, sep=1.0)
    config = LinearProbeConfig(epochs=4, warmup_epochs=1, batch_size=64, base_lr=20.0)
    mesh8 = parallel.make_mesh()
    mesh1 = parallel.make_mesh(devices=jax.devices()[:1])
    assert parallel.num_data_shards(mesh8) == 8
    loss8, head8 = _train_on(mesh8, x, y, config, 512 // 64)
    loss1, head1 = _train_on(mesh1, x, y, config, 512 // 64)
    assert len(loss8) == 32 and loss8[-1] < loss8[0] - 0.1  # it trained, the comparison is not vacuous
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(head8), jax.tree.leaves(head1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_uncached_feature_fn_path_matches_cached_features():
    rng = np.random.default_rng(0)
    x, y = blobs(256 + 64, dim=12, classes=4, sep=2.0)
    # A frozen "backbone": uint8 images whose pixels encode the features, then a fixed linear map.
    images = np.clip(np.round((x - x.min()) / (x.max() - x.min()) * 255), 0, 255).astype(np.uint8)
    images = images.reshape(-1, 2, 2, 3)
    proj = rng.normal(size=(12, 6)).astype(np.float32)

    def feature_fn(params, imgs):
        return (imgs.reshape(imgs.shape[0], -1).astype(jnp.float32) / 255.0) @ params["proj"]

    # use_bn=False here (the BN path is covered by the other tests): BoB skips the BN for some backbones.
    config = LinearProbeConfig(epochs=3, warmup_epochs=1, batch_size=32, base_lr=20.0, use_bn=False)
    uncached = run_linear_probe(
        images[:256],
        y[:256],
        images[256:],
        y[256:],
        num_classes=4,
        config=config,
        progress=False,
        feature_fn=feature_fn,
        feature_params={"proj": proj},
        return_state=True,
    )
    feats = (images.reshape(len(images), -1).astype(np.float32) / 255.0) @ proj
    cached = run_linear_probe(
        feats[:256],
        y[:256],
        feats[256:],
        y[256:],
        num_classes=4,
        config=config,
        progress=False,
        return_state=True,
    )
    assert "top5" not in cached  # fewer than 5 classes
    assert sorted(nnx.to_pure_dict(cached["head_state"])) == ["fc"]
    init_kernel = np.asarray(LinearProbeHead(6, 4, use_bn=False, rngs=nnx.Rngs(0)).fc.kernel[...])
    trained_kernel = np.asarray(nnx.to_pure_dict(cached["head_state"])["fc"]["kernel"])
    assert np.abs(trained_kernel - init_kernel).max() > 1e-3  # it trained: the comparison is not vacuous
    for key in ("top1", "nll", "train_loss_final"):
        np.testing.assert_allclose(uncached[key], cached[key], rtol=1e-4, err_msg=key)
    for a, b in zip(
        jax.tree.leaves(uncached["head_state"]), jax.tree.leaves(cached["head_state"]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bad_inputs_give_clear_errors():
    x, y = blobs(64, dim=4, classes=3)
    with pytest.raises(ValueError, match="not divisible by the 8 data shards"):
        run_linear_probe(x, y, x, y, num_classes=3, config=LinearProbeConfig(batch_size=12), progress=False)
    with pytest.raises(ValueError, match="outside"):
        run_linear_probe(x, y + 5, x, y, num_classes=3, progress=False)
    with pytest.raises(ValueError, match="fewer than one batch"):
        run_linear_probe(x, y, x, y, num_classes=3, config=LinearProbeConfig(batch_size=128), progress=False)
    with pytest.raises(ValueError, match="warmup_epochs"):
        LinearProbeConfig(epochs=5, warmup_epochs=6)


def _wait(proc, timeout, log):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"worker did not finish in {timeout} s; log:\n{Path(log).read_text()[-3000:]}")
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{Path(log).read_text()[-3000:]}"


def _finalised_steps(ckpt_dir):
    if not ckpt_dir.is_dir():
        return []
    # Orbax finalises a step by renaming "<step>.orbax-checkpoint-tmp-*" to "<step>".
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def test_sigkill_resume_is_bitwise_identical(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def start(workdir, out, sleep="0"):
        log = tmp_path / f"{out}.log"
        f = open(log, "w")
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path / workdir), str(tmp_path / out), sleep],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        f.close()
        return proc, log

    reference, ref_log = start("ref_wd", "ref")  # uninterrupted run, concurrently
    victim, victim_log = start("wd", "victim", sleep="0.15")  # slowed down so it is killed mid-run
    ckpt_dir = tmp_path / "wd" / "checkpoints"
    deadline = time.monotonic() + 120
    while not _finalised_steps(ckpt_dir):
        if victim.poll() is not None:
            pytest.fail(f"worker exited before its first checkpoint:\n{victim_log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            victim.kill()
            victim.wait()
            pytest.fail(f"no checkpoint within 120 s:\n{victim_log.read_text()[-3000:]}")
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    killed_at = _finalised_steps(ckpt_dir)
    assert killed_at and max(killed_at) < 72, killed_at  # it really was interrupted mid-training
    assert not (tmp_path / "victim.json").exists()

    resumed, resumed_log = start("wd", "resumed")
    _wait(resumed, 180, resumed_log)
    _wait(reference, 180, ref_log)

    ref = json.loads((tmp_path / "ref.json").read_text())
    res = json.loads((tmp_path / "resumed.json").read_text())
    assert ref == res  # bitwise: floats are compared exactly
    ref_head, res_head = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(ref_head.files) == sorted(res_head.files) == ["bn/mean", "bn/var", "fc/bias", "fc/kernel"]
    for key in ref_head.files:
        np.testing.assert_array_equal(ref_head[key], res_head[key], err_msg=key)
    assert ref["top1"] > 0.9

    # The resumed run logged the steps after the checkpoint; a different config on the same workdir is
    # refused instead of silently mixing runs.
    records = [json.loads(line) for line in (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 72 and "eval/top1" in records[-1]
    sys.path.insert(0, str(WORKER.parent))
    try:
        import probe_worker
    finally:
        sys.path.remove(str(WORKER.parent))
    xtr, ytr, xte, yte = probe_worker.synthetic_problem()
    with pytest.raises(ValueError, match="different run"):
        run_linear_probe(
            xtr,
            ytr,
            xte,
            yte,
            num_classes=4,
            config=LinearProbeConfig(epochs=7, warmup_epochs=1, batch_size=32, base_lr=160.0),
            workdir=str(tmp_path / "wd"),
            progress=False,
        )


@pytest.mark.reference
def test_train_steps_match_torch_mae_linprobe(reference):
    """Same init + batches through torch (BatchNorm1d(affine=False) + Linear, MAE's LARS, per-iteration
    lr): losses, weights and BN running statistics agree."""
    torch, _ = reference
    x, y = blobs(256, dim=16, classes=5)
    config = LinearProbeConfig(epochs=3, warmup_epochs=1, batch_size=32, base_lr=20.0, weight_decay=0.01)
    spe = 256 // 32
    mesh1 = parallel.make_mesh(devices=jax.devices()[:1])
    tx = make_optimizer(config, spe)
    graphdef, state = create_train_state(config, 16, 5, tx, mesh1)
    init = jax.device_get(nnx.to_pure_dict(state["params"]))
    schedule = make_schedule(config, spe)
    step_fn = make_train_step(graphdef, tx, mesh1, spe, lr_schedule=schedule)

    bn = torch.nn.BatchNorm1d(16, affine=False, eps=1e-6)
    fc = torch.nn.Linear(16, 5)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(np.asarray(init["fc"]["kernel"]).T.copy()))
        fc.bias.copy_(torch.from_numpy(np.array(init["fc"]["bias"])))
    model = torch.nn.Sequential(bn, fc).double().train()
    mu = {id(p): torch.zeros_like(p) for p in fc.parameters()}

    ds = make_train_dataset(x, y, batch_size=32, epochs=3, seed=config.seed)
    for k, batch in enumerate(ds):
        state, metrics = step_fn(state, parallel.shard_batch(batch, mesh1), None)
        # torch step, with MAE's adjust_learning_rate and util/lars.py LARS.step().
        lr = float(schedule(k))
        logits = model(torch.from_numpy(batch["inputs"]).double())
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["labels"]).long())
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in fc.parameters():
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=config.weight_decay)
                    pn, un = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(pn)
                    q = torch.where(pn > 0.0, torch.where(un > 0, 0.001 * pn / un, one), one)
                    dp = dp.mul(q)
                mu[id(p)].mul_(0.9).add_(dp)
                p.add_(mu[id(p)], alpha=-lr)
        np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-4, err_msg=f"step {k}")
    got = jax.device_get(nnx.to_pure_dict(nnx.merge_state(state["params"], state["batch_stats"])))
    np.testing.assert_allclose(got["fc"]["kernel"], fc.weight.detach().numpy().T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["fc"]["bias"], fc.bias.detach().numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["bn"]["mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["bn"]["var"], bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
