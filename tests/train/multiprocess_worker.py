"""One process of the multi-host fine-tuning test (tests/train/test_multiprocess.py).

Usage: python tests/train/multiprocess_worker.py OUT_DIR WORKDIR NUM_DEVICES [COORDINATOR NUM_PROCESSES PROCESS_ID]
       python tests/train/multiprocess_worker.py --cli NUM_DEVICES <bob_jax.main flags>

Runs a short `run_finetune` of a tiny ViT on synthetic images (checkpoints in WORKDIR, resuming from them as
usual) over a mesh of all global devices, then `evaluate_model` on a second set. With the last three
arguments the process joins a `jax.distributed` run through `bob_jax.distributed.initialize` (a
loopback coordinator, gloo collectives on CPU). Then the frozen-feature path (`frozen`): features of a
random-init tiny ViT, kNN, linear probe and retrieval. Process 0 writes OUT_DIR/result.json and
OUT_DIR/params.npz; every process writes OUT_DIR/reads_<process>.json, the training-source positions
it read, and OUT_DIR/frozen_<process>.json + features_<process>.npz, its frozen-task results. With --cli it runs the real entry point instead (`cli`).
"""

import dataclasses
import json
import os
import sys
import threading

import numpy as np


def _setup_env(num_devices: int) -> None:
    # Set before jax is imported: CPU only, NUM_DEVICES simulated devices in this process.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"


class _Recording:
    """A source that records which positions this process read (thread-safe: grain reads in threads)."""

    def __init__(self, source):
        self.source, self.num_classes, self.read = source, source.num_classes, []
        self._lock = threading.Lock()

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        with self._lock:
            self.read.append(int(i))
        return self.source[int(i)]


class Blobs:
    """Synthetic 10-class images, each drawn from its own seed: a class-coloured square on noise at a
    random place (learnable within a few steps, and cheap: no data set to load)."""

    num_classes = 10

    def __init__(self, n: int, offset: int = 0, size: int = 32):
        self.n, self.offset, self.size = n, offset, size
        self.colors = np.random.default_rng(0).integers(0, 256, (10, 3))

    def __len__(self):
        return self.n

    def describe(self) -> dict:  # the feature cache key (bob_jax.features.cache_key)
        return {"name": "blobs", "n": self.n, "offset": self.offset, "size": self.size}

    def __getitem__(self, i):
        rng = np.random.default_rng(self.offset + int(i))
        label = int(rng.integers(10))
        image = rng.integers(0, 96, (self.size, self.size, 3))
        y, x = rng.integers(0, self.size // 2, 2)
        image[y:y + self.size // 2, x:x + self.size // 2] = self.colors[label]
        return {"image": image.astype(np.uint8), "label": label}


N_TRAIN, N_TEST, N_OOD = 80, 37, 21  # 37 and 21: the last evaluation batch is padded
TINY_VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32, "patch_size": 8}


def build():
    """(model, train, test, ood, config) of the compared run; imports jax (set the environment first)."""
    from bob_jax.tasks import finetune

    train, test, ood = _Recording(Blobs(N_TRAIN)), Blobs(N_TEST, 10_000), Blobs(N_OOD, 20_000)
    # 80 / 8 = 10 steps per epoch, 30 in all, a checkpoint at every epoch end (the last two kept).
    # Mixup, cutmix, random erasing, drop path and the PIL augmentations all stay on, so every source
    # of randomness is compared; lr 1e-2 without warm-up gets top1 ~0.6 within the 30 steps.
    config = finetune.FinetuneConfig.local(epochs=3, warmup_epochs=0, lr=1e-2, mixup_prob=0.5, batch_size=8,
                                           eval_batch_size=8, log_every_steps=1, num_threads=1, input_size=32)
    model = finetune.finetune_model("vit_small_patch16_224.augreg_in1k", None, 10, config, seed=3, **TINY_VIT)
    return model, train, test, ood, config


def configure_jax(jax) -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    # Halves compile time; every compared run uses the same setting.
    jax.config.update("jax_disable_most_optimizations", True)
    cache = os.environ.get("BOB_JAX_TEST_COMPILATION_CACHE")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def flat_params(model) -> dict[str, np.ndarray]:
    """Every parameter as a host array by dotted path, gathered when sharded over processes (a
    collective: every process calls it)."""
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    from bob_jax.tasks import finetune

    params = multihost_utils.process_allgather(nnx.state(model, nnx.Param), tiled=True)
    return {finetune._path_str(path): np.asarray(v) for path, v in jax.tree.leaves_with_path(params)}


def run(model, train, test, ood, config, mesh, workdir) -> dict:
    """Fine-tune (resuming from `workdir`'s checkpoints), then evaluate on the shifted set."""
    from bob_jax.tasks import finetune

    out = finetune.run_finetune(model, train, test, num_classes=10, config=config, mesh=mesh,
                                workdir=workdir, progress=False)
    shifted = finetune.evaluate_model(model, ood, preprocess=model.preprocess.replace(input_size=32),
                                      batch_size=8, mesh=mesh, num_threads=1)
    result = {k: out[k] for k in ("top1", "nll", "ece", "num_eval", "steps", "resumed_from", "losses")}
    result["per_example"] = [float(v) for v in out["per_example"]]
    result["shifted"] = {k: (float(v) if k != "per_example" else [float(x) for x in v])
                         for k, v in shifted.items()}
    return result


# The frozen-feature tasks: kNN (k and extra ks), a 4-epoch linear probe (with checkpoints) and retrieval.
KNN = {"k": 5, "extra_ks": [1, 10], "temperature": 0.07}
# LARS with a larger trust coefficient and lr than BoB's (0.001, 0.1), so that 20 steps reach top1 ~0.5.
PROBE = {"epochs": 4, "warmup_epochs": 1, "batch_size": 16, "eval_batch_size": 8, "base_lr": 50.0,
         "trust_coefficient": 0.02, "log_every_steps": 5}
RETRIEVAL = {"protocol": "split", "ks": [1, 5]}
# Pooled features (a CNN-style fallback): 2 lrs (x 16/256 batch scaling) x 2 pooling variants, 2 x 10
# SGD steps of 16.
MULTIHEAD = {"base_lrs": [5.0, 50.0], "n_last_blocks": [1], "avgpool": [False, True], "epochs": 2,
             "epoch_length": 10, "batch_size": 16}
MULTILABEL = {"epochs": 3, "warmup_epochs": 1, "batch_size": 16}


def multi_hot(labels):
    """Two positive labels per example (its class and the next), a multi-label target for the probe."""
    labels = np.asarray(labels)
    return (np.eye(10, dtype=np.float32)[labels] + np.eye(10, dtype=np.float32)[(labels + 1) % 10]).clip(0, 1)


def frozen(mesh, workdir) -> tuple[dict, dict]:
    """Features of a random-init tiny ViT (global batch 8; 37 test examples: a padded last batch), then
    kNN, linear probe and retrieval on them, as the battle job runs them. Returns (per-task metrics and
    per-example values, the arrays); every process computes all of it. The second extraction of the
    test set must come from the cache that process 0 wrote (`cached` reports it per process)."""
    from bob_jax import backbones
    from bob_jax import frozen as tasks
    from bob_jax.features import extract_features

    model = backbones.create("vit_small_patch16_224.augreg_in1k", weights=None, seed=5, num_classes=0, **TINY_VIT)
    kw = dict(preprocess=model.preprocess.replace(input_size=32), batch_size=8, mesh=mesh,
              cache_dir=os.path.join(workdir, "features"), progress=False)
    train = extract_features(model, Blobs(N_TRAIN, 30_000), **kw)
    test = extract_features(model, Blobs(N_TEST, 10_000), **kw)
    again = extract_features(model, Blobs(N_TEST, 10_000), **kw)
    common = dict(num_classes=10, mesh=mesh, progress=False)
    result = {"cached": [train.cached, test.cached, again.cached],
              "again_equal": bool(np.array_equal(again.features, test.features))}
    for name, cfg, run_dir in (("knn", KNN, None), ("linear_probe", PROBE, os.path.join(workdir, "probe")),
                               ("retrieval", RETRIEVAL, None)):
        metrics, per_example = tasks.TASKS[name].run(train, test, cfg=cfg, workdir=run_dir, **common)
        metrics.pop("train_seconds", None)  # wall time, not a result
        result[name] = {"metrics": metrics, "per_example": [float(v) for v in per_example]}
    # The two heads that train on host arrays held whole by every process (parallel.shard_global_batch).
    metrics, per_example = tasks.TASKS["linear_multihead"].run(
        train, test, cfg=MULTIHEAD, workdir=None, sources=None, **common)
    result["linear_multihead"] = {"metrics": metrics, "per_example": [float(v) for v in per_example]}
    multilabel = [dataclasses.replace(f, labels=multi_hot(f.labels)) for f in (train, test)]
    metrics, _ = tasks.TASKS["multilabel_probe"].run(*multilabel, cfg=MULTILABEL, workdir=None, sources=None,
                                                     **common)
    result["multilabel_probe"] = {"metrics": metrics}
    arrays = {"train_features": train.features, "train_labels": train.labels,
              "test_features": test.features, "test_labels": test.labels}
    return result, arrays


def main(out_dir, workdir, num_devices, coordinator=None, num_processes=None, process_id=None):
    _setup_env(int(num_devices))
    from bob_jax import distributed

    distributed.initialize(coordinator, None if num_processes is None else int(num_processes),
                           None if process_id is None else int(process_id), initialization_timeout=60)
    import jax

    configure_jax(jax)
    from bob_jax import parallel

    model, train, test, ood, config = build()
    result = run(model, train, test, ood, config, parallel.make_mesh(), workdir)
    pid = jax.process_index()
    with open(os.path.join(out_dir, f"reads_{pid}.json"), "w") as f:
        json.dump(sorted(train.read), f)
    flat = flat_params(model)
    # Every process writes what it computed: all processes must hold the same features and metrics.
    frozen_result, arrays = frozen(parallel.make_mesh(), workdir)
    np.savez(os.path.join(out_dir, f"features_{pid}.npz"), **arrays)
    with open(os.path.join(out_dir, f"frozen_{pid}.json"), "w") as f:
        json.dump(frozen_result, f)
    if pid == 0:
        np.savez(os.path.join(out_dir, "params.npz"), **flat)
        result.update(process_count=jax.process_count(), device_count=jax.device_count())
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)


def cli(num_devices, *flags):
    """`python -m bob_jax.main FLAGS` (multi-host flags included) with NUM_DEVICES devices, the
    workers' jax settings and every backbone cut to one block."""
    _setup_env(int(num_devices))
    import jax

    configure_jax(jax)
    from bob_jax import battle
    from bob_jax import main as bob_main

    original = battle.input_size_kwargs
    battle.input_size_kwargs = lambda name, config: {**original(name, config), "depth": 1}
    sys.argv = ["bob_jax.main", *flags]
    bob_main.run()


if __name__ == "__main__":
    if sys.argv[1] == "--cli":
        cli(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
