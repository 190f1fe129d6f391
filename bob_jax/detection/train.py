"""Training and COCO evaluation of a `Detector` (bob-spec 3.4; porting.md 12.6 and 13.4).

Recipe (the original's mmdet configs): AdamW (betas 0.9/0.999, eps 1e-8), weight decay 0.05, lr from
the grid {8e-5, 1e-4, 2e-4, 3e-4}, linear warm-up (1,000 iterations from lr x 0.001), lr x 0.1 after
27/36 and again after 33/36 of training (epochs 27 and 33 of 36), large-scale jitter.

Protocols:
- "frozen": the trunk is not trained. The model state is split with an nnx filter into the trainable
  parameters (neck, RPN, RoI heads), the trunk's parameters and the rest (BatchNorm statistics), so the
  trunk is not differentiated at all (no backward pass through it) and its BatchNorms stay in eval mode.
  Stochastic depth is off too (the trunk runs in eval mode, as mmdet's frozen stages do).
- "finetune": every parameter trains. The trunk gets layer-wise lr decay (scale decay ** (n - 1 - id)
  with the family's timm layer ids, `Family.layer_id`; plain ViTs use detectron2's ViTDet rule
  `vitdet.lr_decay_layer_id`, decay ** (depth + 1 - id)); neck and heads train at the full lr. Drop-path
  masks come from the per-step key; BatchNorm keeps its running statistics unless `bn_train`
  (mmdet's `norm_eval=True`: detection batches are too small for batch statistics).
No weight decay on biases and norm parameters (ndim <= 1) nor on `pos_embed` (detectron2's ViTDet).

Implementation: the train step is one pure jitted function over a Mesh: the batch is sharded on "data",
parameters and optimiser state are replicated; the model is split once and merged inside the step; the
trainable parameters, the rest and the optimiser state are donated. The input pipeline is grain over a
`CocoDetection` source (seeded shuffle, `LSJ` per example, batches), whose iterator state is saved with
each Orbax checkpoint (`bob_jax.checkpoint`), so a rerun resumes on exactly the next batch.

Evaluation: `detect` on `TestResize`d images -> COCO results in original pixels (boxes divided by each
axis' resize factor, 28x28 masks pasted bilinearly at the original-pixel boxes and thresholded at 0.5) ->
pycocotools bbox (and segm) AP (`coco_eval.evaluate_coco`), over the categories the source selects.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bob_jax import parallel, preemption
from bob_jax.detection import coco_eval
from bob_jax.detection.data import LSJ, TestResize
from bob_jax.detection.model import TRUNK, Detector, set_train_mode

PROTOCOLS = ("frozen", "finetune")
LR_GRID = (8e-5, 1e-4, 2e-4, 3e-4)  # the original's sweep (bob-spec 3.4)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training settings. Defaults: the original's schedule shape; `steps` and `batch_size` set the length
    (mmdet: 36 epochs at batch 16). `decay_at` are fractions of `steps`."""

    protocol: str = "frozen"
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 1000
    warmup_factor: float = 0.001
    decay_at: tuple[float, ...] = (27 / 36, 33 / 36)
    decay_factor: float = 0.1
    layer_decay: float = 0.7
    bn_train: bool = False
    lsj_scale: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5
    max_instances: int = 100
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end of training
    log_every: int = 50
    num_threads: int = 4

    def __post_init__(self):
        object.__setattr__(self, "decay_at", tuple(float(v) for v in self.decay_at))
        object.__setattr__(self, "lsj_scale", tuple(float(v) for v in self.lsj_scale))
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol={self.protocol!r} is not supported; use one of {PROTOCOLS}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must lie in (0, 1], got {self.layer_decay}")
        if not 0 <= self.warmup_steps or not 0 < self.warmup_factor <= 1:
            raise ValueError("warmup_steps must be >= 0 and warmup_factor in (0, 1]")
        if any(not 0 < f <= 1 for f in self.decay_at):
            raise ValueError(f"decay_at holds fractions of the run in (0, 1], got {self.decay_at}")


# --------------------------------------------------------------------------------------------------
# Optimiser
# --------------------------------------------------------------------------------------------------


def lr_schedule(config: TrainConfig):
    """mmdet's `step` policy with linear warm-up: lr * (factor + (1 - factor) * t / warmup) during the
    warm-up, then lr * decay_factor ** (number of milestones round(f * steps) that t has reached)."""
    milestones = tuple(round(f * config.steps) for f in config.decay_at)
    lr, warmup, factor = config.lr, config.warmup_steps, config.warmup_factor

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = jnp.where(t < warmup, factor + (1.0 - factor) * t / max(warmup, 1), 1.0)
        decays = sum((t >= m).astype(jnp.float32) for m in milestones) if milestones else 0.0
        return lr * warm * config.decay_factor**decays

    return schedule


_path_str = parallel.path_str


def trainable_filter(protocol: str):
    """The nnx filter of the parameters that train: all of them, or all but the trunk's."""
    if protocol == "finetune":
        return nnx.Param
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains(TRUNK)))


def _trunk_layer_scale(model: Detector, layer_decay: float):
    """path-within-trunk -> lr scale of the trunk's parameters."""
    trunk = getattr(model, TRUNK)
    if layer_decay == 1.0:
        return lambda path: 1.0
    if model.plain_vit:
        from bob_jax.detection.vitdet import lr_decay_layer_id

        depth = trunk.cfg.depth
        return lambda path: float(layer_decay ** (depth + 1 - lr_decay_layer_id(path, depth)))
    from bob_jax.backbones import zoo

    family = zoo.ARCH_TO_FAMILY[trunk.name.split(".")[0]]
    if family.layer_id is None:
        raise ValueError(f"{trunk.name}: family {family.name} has no layer ids; use layer_decay=1.0")
    n = family.num_layers(trunk.cfg)
    return lambda path: float(layer_decay ** (n - 1 - family.layer_id(path, trunk.cfg)))


def lr_scales(model: Detector, params, layer_decay: float):
    """Per-parameter lr multipliers (pytree like `params`): layer decay in the trunk, 1 elsewhere."""
    trunk_scale = _trunk_layer_scale(model, layer_decay)

    def scale(path, _):
        name = _path_str(path)
        if name.startswith(TRUNK + "."):
            return trunk_scale(name[len(TRUNK) + 1 :])
        return 1.0

    return jax.tree.map_with_path(scale, params)


def weight_decay_mask(params):
    """True where weight decay applies: weights with ndim > 1 except position embeddings."""

    def mask(path, p):
        return bool(jnp.ndim(p) > 1 and not _path_str(path).endswith("pos_embed"))

    return jax.tree.map_with_path(mask, params)


def make_optimizer(model: Detector, params, config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with the schedule, per-parameter lr scales (`lr_scales`) and weight-decay mask."""
    return _optimizer(config, jax.tree.structure(params), tuple(jax.tree.leaves(lr_scales(
        model, params, config.layer_decay))), tuple(jax.tree.leaves(weight_decay_mask(params))))


@functools.lru_cache(maxsize=8)
def _optimizer(config: TrainConfig, treedef, scales: tuple[float, ...], decay_mask: tuple[bool, ...]):
    # Cached on hashable inputs, so a second run of the same detector gets the same optimiser and,
    # through `make_train_step`'s cache, the same compiled step (e.g. a resumed run in one process).
    from bob_jax.tasks.finetune import adamw_layer_decay

    return adamw_layer_decay(
        lr_schedule(config),
        weight_decay=config.weight_decay,
        lr_scales=jax.tree.unflatten(treedef, scales),
        decay_mask=jax.tree.unflatten(treedef, decay_mask),
    )


# --------------------------------------------------------------------------------------------------
# Pure steps
# --------------------------------------------------------------------------------------------------

BATCH_KEYS = ("image", "image_size", "gt_boxes", "gt_classes", "gt_masks")


def split_model(model: Detector, protocol: str):
    """(graphdef, trainable params, frozen params, rest) of the model in its current mode."""
    return nnx.split(model, trainable_filter(protocol), nnx.Param, ...)


@functools.lru_cache(maxsize=8)
def make_train_step(graphdef, tx, mesh):
    """Jitted `step(params, frozen, rest, opt_state, batch, key) -> (params, rest, opt_state, losses)`.

    `batch`: {"image" uint8 [B, S, S, 3], "image_size" [B, 2], "gt_boxes", "gt_classes"[, "gt_masks"]}
    sharded on the mesh's "data" axis; losses: the model's loss dict plus "total"."""
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)

    def step(params, frozen, rest, opt_state, batch, key):
        targets = {k: batch[k] for k in ("gt_boxes", "gt_classes", "gt_masks") if k in batch}

        def loss_fn(p):
            # Fresh Variable objects at this trace level (as tasks/finetune.py): merge reuses the ones it
            # is given, and the jit-level `rest` may not be mutated from inside the grad trace.
            model = nnx.merge(graphdef, p, frozen, jax.tree.map(lambda v: v, rest))
            losses = model.losses(batch["image"], batch["image_size"], targets, key)
            new_rest = nnx.split(model, nnx.Param, ...)[2]
            return sum(losses.values()), (losses, new_rest)

        (total, (losses, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, new_rest, opt_state, {**losses, "total": total}

    return jax.jit(
        step,
        in_shardings=(rep, rep, rep, rep, data, rep),
        out_shardings=(rep, rep, rep, rep),
        donate_argnums=(0, 2, 3),
    )


@functools.lru_cache(maxsize=8)
def make_detect_step(graphdef, mesh):
    """Jitted `detect(params, frozen, rest, images, image_sizes) -> detections` (eval-mode graphdef)."""
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)

    def detect(params, frozen, rest, images, image_sizes):
        return nnx.merge(graphdef, params, frozen, rest).detect(images, image_sizes)

    return jax.jit(detect, in_shardings=(rep, rep, rep, data, data), out_shardings=data)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


class _ImageOnly(grain.transforms.Map):
    """Drops the ground truth before the test transform (evaluation reads it from the json)."""

    def map(self, example):
        return {"image": example["image"], "boxes": np.zeros((0, 4), np.float32),
                "classes": np.zeros((0,), np.int32), "image_id": example["image_id"]}


class _Targets(grain.transforms.Map):
    """Keeps the arrays the train step reads (drops image ids and resize bookkeeping)."""

    def __init__(self, keys):
        self.keys = tuple(keys)

    def map(self, element):
        return {k: element[k] for k in self.keys if k in element}


def train_dataset(source, transform, batch_size: int, *, seed: int, num_threads: int = 4) -> grain.IterDataset:
    """Endless, per-epoch reshuffled, augmented batches; `iter(ds)` has get_state()/set_state()."""
    if len(source) == 0:
        raise ValueError("the detection training source holds no images (with filter_empty, none has a box)")
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None).random_map(transform)
    ds = ds.map(_Targets(BATCH_KEYS)).batch(batch_size, drop_remainder=True)
    threads = max(1, num_threads)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))


def eval_batches(source, transform, batch_size: int, *, num_threads: int = 4):
    """Every image once, in order, in batches of exactly `batch_size`; the last one padded with copies of
    its first example and `mask` False."""
    ds = grain.MapDataset.source(source).map(_ImageOnly()).map(transform).batch(batch_size, drop_remainder=False)
    threads = max(1, num_threads)
    for batch in ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)):
        batch = {k: np.asarray(v) for k, v in batch.items()}
        n = len(batch["image"])
        batch["mask"] = np.arange(batch_size) < n
        if n < batch_size:
            batch = {k: (v if k == "mask" else np.concatenate([v, np.repeat(v[:1], batch_size - n, 0)]))
                     for k, v in batch.items()}
        yield batch


def evaluation_ground_truth(source) -> Any:
    """COCOeval ground truth: the source's json, restricted to its selected categories when it selects
    a subset (otherwise unselected categories would count as classes never detected)."""
    coco = source.coco
    selected = set(source.contiguous_to_coco)
    if selected == set(coco.getCatIds()):
        return coco
    data = coco.dataset
    return {
        **{k: v for k, v in data.items() if k not in ("annotations", "categories")},
        "categories": [c for c in data["categories"] if c["id"] in selected],
        "annotations": [a for a in data["annotations"] if a["category_id"] in selected],
    }


def evaluate(detect_step, state, source, *, image_size: int, batch_size: int, mesh, mask_on: bool,
             num_threads: int = 4) -> dict[str, Any]:
    """COCO AP of the detections on every image of `source` (a `CocoDetection`).

    Returns {"bbox": {AP, AP50, ...}[, "segm": {...}], "num_images", "num_detections", "seconds"}."""
    t0 = time.perf_counter()
    params, frozen, rest = state
    transform = TestResize(image_size, pad_size=image_size, max_instances=1)
    shards = parallel.num_data_shards(mesh)
    batch_size = -(-batch_size // shards) * shards
    results = []
    for batch in eval_batches(source, transform, batch_size, num_threads=num_threads):
        sharded = parallel.shard_batch({"image": batch["image"], "image_size": batch["image_size"]}, mesh)
        dets = jax.device_get(detect_step(params, frozen, rest, sharded["image"], sharded["image_size"]))
        for i in np.flatnonzero(batch["mask"]):
            scale = batch["image_size"][i] / batch["orig_size"][i]  # per axis: sizes are rounded
            results += coco_eval.to_coco_results(
                int(batch["image_id"][i]), dets["boxes"][i], dets["scores"][i], dets["classes"][i],
                dets["masks"][i] if mask_on else None, scale=(float(scale[0]), float(scale[1])),
                category_ids=source.contiguous_to_coco, valid=dets["valid"][i],
                image_hw=tuple(int(v) for v in batch["orig_size"][i]),
            )
    iou_types = ("bbox", "segm") if mask_on else ("bbox",)
    metrics = coco_eval.evaluate_coco(evaluation_ground_truth(source), results, iou_types,
                                      img_ids=source.image_ids)
    return {**metrics, "num_images": len(source), "num_detections": len(results),
            "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainedDetector:
    """A trained model's state (split as `split_model`) with its eval step, and what training did."""

    model: Detector
    state: tuple[Any, Any, Any]  # (trainable params, frozen params, rest)
    detect_step: Any
    steps: int
    resumed_from: int
    losses: list[dict[str, float]]
    train_seconds: float
    step_seconds: float | None  # mean wall time of a train step after the first (compiling) one

    def evaluate(self, source, *, batch_size: int, mesh, num_threads: int = 4) -> dict[str, Any]:
        return evaluate(self.detect_step, self.state, source, image_size=self.model.config.image_size,
                        batch_size=batch_size, mesh=mesh, mask_on=self.model.config.mask_on,
                        num_threads=num_threads)


def _run_meta(model: Detector, source, config: TrainConfig) -> dict[str, Any]:
    return {"task": "detection", "model": dataclasses.asdict(model.config), "train": dataclasses.asdict(config),
            "weights_id": model.weights_id, "num_train": len(source)}


def train(model: Detector, source, config: TrainConfig, *, mesh=None, workdir: str | None = None,
          progress: bool = True) -> TrainedDetector:
    """Train `model` on `source` (a `CocoDetection`, ideally with `filter_empty=True`) for `config.steps`.

    With `workdir`, the training state and the grain iterator state are checkpointed under
    `workdir/checkpoints` every `checkpoint_every` steps and at the end; a rerun resumes exactly, and a
    finished run is restored without training."""
    from bob_jax.checkpoint import Checkpointer, abstract_like

    mesh = parallel.make_mesh() if mesh is None else mesh
    shards = parallel.num_data_shards(mesh)
    if config.batch_size % shards:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {shards} data shards of the "
                         "mesh; choose a multiple")
    if model.config.mask_on and not getattr(source, "with_masks", True):
        raise ValueError("a mask head needs instance masks: load the source with with_masks=True, or use "
                         "head='cascade_rcnn' for box-only data")
    frozen_trunk = config.protocol == "frozen"
    model.eval()
    eval_graphdef = split_model(model, config.protocol)[0]
    if frozen_trunk:  # heads in train mode (no BN/drop path there today); the trunk stays in eval mode
        for name, module in vars(model).items():
            if name != TRUNK and isinstance(module, nnx.Module):
                set_train_mode(module, bn_train=config.bn_train)
    else:
        set_train_mode(model, bn_train=config.bn_train)
    graphdef, params, frozen, rest = split_model(model, config.protocol)
    model.eval()
    tx = make_optimizer(model, params, config)
    rep = parallel.replicated(mesh)
    params, frozen, rest = jax.device_put((params, frozen, rest), rep)
    opt_state = jax.jit(tx.init, out_shardings=rep)(params)
    train_step = make_train_step(graphdef, tx, mesh)

    transform = LSJ(model.config.image_size, config.lsj_scale, max_instances=config.max_instances,
                    flip_p=config.flip_p)
    it = iter(train_dataset(source, transform, config.batch_size, seed=config.seed,
                            num_threads=config.num_threads))
    treedef = jax.tree.structure((params, rest, opt_state))
    ckpt, start_step = None, 0
    meta = _run_meta(model, source, config)
    if workdir is not None:
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2, async_save=False)
        latest = ckpt.latest_step()
        if latest is not None:
            saved = ckpt.metadata(latest)
            mismatched = sorted(k for k in meta if saved.get(k) != _jsonish(meta[k]))
            if mismatched:
                ckpt.close()
                raise ValueError(f"{workdir} holds a checkpoint of a different detection run (differs in "
                                 f"{mismatched}); use a new workdir or delete the old one")
            restored, data_state = ckpt.restore(latest, abstract_like({"leaves": jax.tree.leaves(
                (params, rest, opt_state))}))
            params, rest, opt_state = jax.tree.unflatten(treedef, restored["leaves"])
            it.set_state(data_state)
            start_step = latest

    base_key = jax.random.key(config.seed)
    schedule = lr_schedule(config)
    losses, window, step_times = [], [], []
    start = time.perf_counter()
    step = start_step
    # SIGTERM / SIGUSR1 / SIGUSR2: checkpoint the current step and raise Preempted (bob_jax.preemption).
    try:
        with preemption.watch(enabled=ckpt is not None) as watcher:
            while step < config.steps:
                batch = next(it)
                step += 1
                t = time.perf_counter()
                sharded = parallel.shard_batch(batch, mesh)
                params, rest, opt_state, out = train_step(params, frozen, rest, opt_state, sharded,
                                                          jax.random.fold_in(base_key, step))
                window.append(out)
                if step % config.log_every == 0 or step == config.steps:
                    means = {k: float(np.mean([float(w[k]) for w in window])) for k in window[0]}
                    if not math.isfinite(means["total"]):
                        raise FloatingPointError(
                            f"detection training: the loss became {means['total']} by step {step}")
                    losses.append({"step": step, **means})
                    window = []
                    if progress:
                        print(f"detection step {step}/{config.steps} loss {means['total']:.4f} "
                              f"lr {float(schedule(step)):.2e}", flush=True)
                jax.block_until_ready(out["total"])
                step_times.append(time.perf_counter() - t)
                stop = watcher.should_stop(step)  # the same step on every process
                periodic = config.checkpoint_every and step % config.checkpoint_every == 0
                if ckpt is not None and (stop or periodic or step == config.steps):
                    ckpt.save(step, {"leaves": jax.tree.leaves((params, rest, opt_state))}, it.get_state(),
                              meta, force=True)
                if stop:
                    raise preemption.Preempted(step, ckpt.directory, watcher.signal_name)
    finally:
        if ckpt is not None:
            ckpt.close()
    state = (params, frozen, rest)
    nnx.update(model, params, frozen, rest)
    return TrainedDetector(
        model=model, state=state, detect_step=make_detect_step(eval_graphdef, mesh), steps=step,
        resumed_from=start_step, losses=losses, train_seconds=time.perf_counter() - start,
        step_seconds=float(np.mean(step_times[1:])) if len(step_times) > 1 else None,
    )


def _jsonish(value):
    """The value as it reads back from the checkpoint's JSON metadata (tuples become lists)."""
    import json

    return json.loads(json.dumps(value))
