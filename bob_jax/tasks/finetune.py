"""End-to-end fine-tuning: BoB's classification fine-tuning recipe (bob-spec.md §3.1).

Source of the recipe: `bob-classification/train.py` (timm's training script with gradient
accumulation) and `model_configs/*_ft.yaml`:
  * AdamW (betas 0.9/0.999, eps 1e-8), lr 1e-3, weight decay 0.05, layer-wise lr decay 0.75 through
    timm's `param_groups_layer_decay` (layer ids from each model's `group_matcher(coarse=False)`;
    scale = decay ** (num_layers - 1 - layer_id); no weight decay for parameters with ndim <= 1).
  * cosine schedule with warm-up from 1e-4, min lr 1e-6; mixup 0.8 / cutmix 1.0 / switch 0.5, label
    smoothing 0.1 (soft-target cross-entropy), random erasing 0.25 (pixel); RandAugment; AMP.
  * the classifier head is replaced and re-initialised (`backbones.create(..., num_classes=K)`).

Implementation: the NNX model is put in train mode (BatchNorm uses batch statistics and updates its
running `mean` / `var`) and split once into `graphdef, params, rest`; the jitted step is a pure
function `(params, rest, opt_state, images, targets) -> (params, rest, opt_state, loss)` with the
batch sharded over the mesh's batch axes ("data", "fsdp") and the state placed by sharding rules
(`place_state`: replicated on a data-parallel mesh; parameters and optimiser state sharded on a mesh
with an "fsdp" axis, see `bob_jax.parallel`). Layer decay and the weight-decay mask are pytrees of
the same structure as `params`.

Differences to the original worth knowing:
  * The lr schedule is evaluated per optimiser update (timm steps it once per epoch); the formula is
    timm's `CosineLRScheduler` with `warmup_prefix=False`: linear from `warmup_lr` during warm-up,
    then `min_lr + (lr - min_lr) * (1 + cos(pi * t / T)) / 2` with t counted from the first update.
  * BatchNorm statistics are computed over the global batch (the original used per-GPU statistics).
  * drop-path (stochastic depth) is applied with the model's own rates: `finetune_model` creates the
    model with `config.drop_path_rate` (BoB: 0.1). Its masks come from the per-step key, so a resumed
    run draws the same masks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bob_jax import parallel, preemption

# --------------------------------------------------------------------------------------------------
# Layer-wise lr decay
# --------------------------------------------------------------------------------------------------


def _family(model: nnx.Module):
    from bob_jax.backbones import zoo

    name = getattr(model, "name", None)
    arch = name.split(".")[0] if isinstance(name, str) else None
    if arch not in zoo.ARCH_TO_FAMILY:
        raise ValueError(
            "layer decay and head re-initialisation need a model made by bob_jax.backbones.create "
            f"(with .name 'arch.tag'), got name {name!r}"
        )
    return zoo.ARCH_TO_FAMILY[arch]


def _family_and_cfg(model: nnx.Module):
    family = _family(model)
    arch = model.name.split(".")[0]
    if family.layer_id is None or family.num_layers is None:
        raise ValueError(
            f"family {family.name!r} declares no layer_id/num_layers; layer decay is unavailable for {arch}. "
            "Use layer_decay=1.0 or add layer_id to the family module."
        )
    return family, model.cfg


# Dotted parameter paths ("blocks.3.attn.qkv.kernel"): the spelling the sharding rules match too.
_path_str = parallel.path_str


def layer_ids(model: nnx.Module, params: Any | None = None) -> Any:
    """Pytree like `nnx.state(model, nnx.Param)` holding each parameter's timm layer id (int)."""
    family, cfg = _family_and_cfg(model)
    params = nnx.state(model, nnx.Param) if params is None else params
    return jax.tree.map_with_path(lambda path, _: family.layer_id(_path_str(path), cfg), params)


def layer_decay_scales(model: nnx.Module, layer_decay: float, params: Any | None = None) -> Any:
    """Per-parameter lr multiplier: layer_decay ** (num_layers - 1 - layer_id) (timm)."""
    family, cfg = _family_and_cfg(model)
    n = family.num_layers(cfg)
    ids = layer_ids(model, params)
    return jax.tree.map(lambda i: float(layer_decay ** (n - 1 - i)), ids)


def weight_decay_mask(params: Any) -> Any:
    """True where weight decay applies: timm excludes every parameter with ndim <= 1 (biases, norms)."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


# --------------------------------------------------------------------------------------------------
# Optimiser
# --------------------------------------------------------------------------------------------------


def warmup_cosine_lr(
    lr: float, total_steps: int, warmup_steps: int, *, warmup_lr: float = 1e-4, min_lr: float = 1e-6
):
    """timm CosineLRScheduler (warmup_prefix=False) evaluated per update (see the module docstring)."""
    if total_steps <= 0:
        raise ValueError(f"warmup_cosine_lr: total_steps must be positive, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_cosine_lr: warmup_steps={warmup_steps} must lie in [0, {total_steps}].")

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = warmup_lr + t * (lr - warmup_lr) / max(warmup_steps, 1)
        progress = jnp.clip(t / total_steps, 0.0, 1.0)
        cos = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(t < warmup_steps, warm, cos)

    return schedule


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by a fixed per-parameter factor (the layer-decay lr scale)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def adamw_layer_decay(
    schedule: optax.ScalarOrSchedule,
    *,
    weight_decay: float,
    lr_scales: Any,
    decay_mask: Any,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    accumulation_steps: int = 1,
) -> optax.GradientTransformation:
    """torch AdamW with timm's per-group lr scale: p -= lr * scale * (adam(g) + wd * mask * p).

    torch applies the decoupled decay as p *= 1 - lr * scale * wd before the Adam step, which is the
    same as adding wd * p to the Adam direction before the lr scaling. `accumulation_steps > 1` wraps
    the chain in `optax.MultiSteps` (gradients averaged over k micro-batches, one update)."""
    tx = optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        scale_by_tree(lr_scales),
        optax.scale_by_learning_rate(schedule),
    )
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}.")
    if accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulation_steps)
    return tx


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """timm SoftTargetCrossEntropy: mean over the batch of -sum(target * log_softmax(logits))."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(-jnp.sum(targets * logp, axis=-1))


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters; defaults are BoB's `*_ft.yaml` recipe. `batch_size` is the GLOBAL micro-batch
    (one jitted step); the effective batch is batch_size * accumulation_steps (lr is not rescaled,
    as in the original). `protocol='local'` (see `local`) shrinks everything for CPU runs."""

    epochs: int = 100
    warmup_epochs: int = 5
    batch_size: int = 128
    accumulation_steps: int = 1
    lr: float = 1e-3
    warmup_lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    reprob: float = 0.25
    drop_path_rate: float = 0.1  # applied when the model is made (`finetune_model`)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float | None = 0.4
    train_interpolation: str | None = "random"
    input_size: int | None = None  # None: the backbone's preprocess.input_size
    compute_dtype: str = "float32"  # "bfloat16" for AMP-like compute on accelerators
    seed: int = 42
    eval_batch_size: int | None = None
    num_threads: int = 4
    log_every_steps: int = 50

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"FinetuneConfig: epochs must be >= 1, got {self.epochs}.")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"FinetuneConfig: warmup_epochs={self.warmup_epochs} must lie in [0, {self.epochs}]."
            )
        if self.batch_size < 2 or self.batch_size % 2:
            raise ValueError(
                "FinetuneConfig: batch_size must be even and >= 2 (mixup pairs the batch), "
                f"got {self.batch_size}."
            )
        if self.accumulation_steps < 1:
            raise ValueError(
                f"FinetuneConfig: accumulation_steps must be >= 1, got {self.accumulation_steps}."
            )
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"FinetuneConfig: layer_decay must lie in (0, 1], got {self.layer_decay}.")
        if not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"FinetuneConfig: drop_path_rate must lie in [0, 1), got {self.drop_path_rate}.")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"FinetuneConfig: compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}."
            )

    @classmethod
    def local(cls, **overrides) -> FinetuneConfig:
        """Small CPU protocol: 32 px, 3 epochs, batch 32, no RandAugment (PIL ops dominate CPU time)."""
        base = dict(epochs=3, warmup_epochs=1, batch_size=32, input_size=32, auto_augment=None, num_threads=2,
                    log_every_steps=10)
        base.update(overrides)
        return cls(**base)

    @property
    def use_mixup(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


# --------------------------------------------------------------------------------------------------
# Pure train / eval steps
# --------------------------------------------------------------------------------------------------


def state_shardings(params, rest, tx, mesh, sharding_rules=None):
    """Shardings of the training state `(params, rest, opt_state)` on `mesh`: parameters by
    `sharding_rules` (`parallel.parse_rules`; default: FSDP-sharded on a mesh with an "fsdp" axis,
    else replicated), `rest` (BatchNorm statistics, small) replicated, the optimiser state like the
    parameters it mirrors. `params`/`rest` may be abstract (`jax.ShapeDtypeStruct`s)."""
    param_sh = parallel.tree_shardings(params, mesh, sharding_rules)
    opt_state = jax.eval_shape(tx.init, params)
    rep = parallel.replicated(mesh)
    return param_sh, jax.tree.map(lambda _: rep, rest), parallel.opt_state_shardings(tx, opt_state, param_sh, mesh)


def place_state(params, rest, tx, mesh, sharding_rules=None):
    """`(params, rest, opt_state), shardings`: the state put on `mesh` per `state_shardings`, the
    optimiser state made there (each device only ever holds its own shards)."""
    shardings = state_shardings(params, rest, tx, mesh, sharding_rules)
    params, rest = jax.device_put((params, rest), shardings[:2])
    opt_state = jax.jit(tx.init, out_shardings=shardings[2])(params)
    return (params, rest, opt_state), shardings


def make_train_step(graphdef, tx, mesh, preprocess, num_classes: int, config: FinetuneConfig,
                    state_shardings=None):
    """Jitted `step(params, rest, opt_state, images_uint8, labels, key) -> (params, rest, opt_state, loss)`.

    On the device: normalise -> random erasing (timm applies it per image after normalisation) ->
    mixup/cutmix with label smoothing -> forward in train mode (drop-path masks from the step key) ->
    soft-target CE -> AdamW update. `rest` holds the BatchNorm running statistics, updated by the
    forward pass. `state_shardings`: the `(params, rest, opt_state)` shardings (`state_shardings()`,
    e.g. FSDP-sharded parameters); the state keeps them across steps. Default: replicated."""
    from bob_jax.backbones.preprocess import normalize
    from bob_jax.data.batch_augment import mixup_cutmix, mixup_target, random_erasing
    from bob_jax.models.layers import uses_drop_path

    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    state = (rep, rep, rep) if state_shardings is None else tuple(state_shardings)

    def step(params, rest, opt_state, images, labels, key):
        k_erase, k_mix, k_drop = jax.random.split(key, 3)
        x = normalize(images, preprocess)
        if config.reprob > 0:
            x = random_erasing(k_erase, x, probability=config.reprob, mode="pixel")
        if config.use_mixup:
            x, targets = mixup_cutmix(
                k_mix, x, labels, num_classes,
                mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
                prob=config.mixup_prob, switch_prob=config.mixup_switch_prob,
                label_smoothing=config.label_smoothing,
            )
        else:
            targets = mixup_target(labels, num_classes, 1.0, config.label_smoothing)

        def loss_fn(p):
            # Fresh Variable objects at this trace level: merge reuses the ones it is given, and the
            # jit-level `rest` Variables may not be mutated from inside the grad trace.
            model = nnx.merge(graphdef, p, jax.tree.map(lambda v: v, rest))
            # Models without stochastic depth (e.g. user-registered ones) need not accept `rngs`.
            kwargs = {"rngs": nnx.Rngs(dropout=k_drop)} if uses_drop_path(model) else {}
            logits = model(x, **kwargs)["logits"]
            new_rest = nnx.split(model, nnx.Param, ...)[2]
            return soft_target_cross_entropy(logits, targets), new_rest

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, new_rest, opt_state, loss

    return jax.jit(
        step,
        in_shardings=(*state, data, data, rep),
        out_shardings=(*state, rep),
        donate_argnums=(0, 1, 2),
    )


ECE_BINS = 15


@functools.lru_cache(maxsize=8)
def make_eval_step(graphdef, mesh, preprocess, class_subset: tuple[int, ...] | None = None):
    """Jitted `eval(params, rest, images_uint8, labels, mask) -> masked sums` (eval-mode BatchNorm).

    `class_subset` (sorted class indices): only those logits are kept, as the original evaluates
    ImageNet-A/-R with 200 of the 1000 classes; labels are then positions in the subset. Cached, so
    evaluating one model on many shifted sets compiles once. `params`/`rest` keep the shardings they
    were placed with (replicated, or FSDP-sharded: `parallel.tree_shardings`); the batch is split over
    the mesh's batch axes."""
    from bob_jax.backbones.preprocess import normalize

    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    subset = None if class_subset is None else np.asarray(class_subset, np.int32)

    def step(params, rest, images, labels, mask):
        images, labels, mask = jax.lax.with_sharding_constraint((images, labels, mask), data)
        model = nnx.merge(graphdef, params, rest)
        logits = model(normalize(images, preprocess))["logits"].astype(jnp.float32)
        if subset is not None:
            logits = logits[:, subset]
        mask = mask.astype(jnp.float32)
        safe_labels = jnp.maximum(labels, 0)  # padded rows carry label -1; they are masked out
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
        correct = (jnp.argmax(logits, axis=-1) == safe_labels).astype(jnp.float32)
        conf = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
        bins = jnp.clip(jnp.ceil(conf * ECE_BINS).astype(jnp.int32) - 1, 0, ECE_BINS - 1)
        onehot = jax.nn.one_hot(bins, ECE_BINS) * mask[:, None]
        sums = {
            "count": jnp.sum(mask),
            "correct1": jnp.sum(correct * mask),
            "nll": jnp.sum(nll * mask),
            "bin_conf": jnp.sum(onehot * conf[:, None], axis=0),
            "bin_acc": jnp.sum(onehot * correct[:, None], axis=0),
        }
        return sums, correct

    # No in_shardings: the parameters' shardings are whatever the caller placed (a sharding tree is
    # not hashable, so it cannot key this cache); jit reads them from the committed arrays.
    return jax.jit(step, out_shardings=rep)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def evaluate(eval_step, params, rest, source, preprocess, *, batch_size: int, mesh, num_threads: int = 4,
             label_map=None):
    """Every example of `source` exactly once (padded final batch masked): top1, nll, ece, num_eval.
    `label_map(labels) -> labels` converts source labels (e.g. 1000-class ids to subset positions).

    `batch_size` is the global batch. With several processes each reads only its rows of every global
    batch (`eval_batches(process=...)`), so the global batches, and the sums, are the single-process
    ones; the replicated sums and the per-example correctness (gathered with the source positions)
    are the same on every process."""
    from jax.experimental import multihost_utils

    from bob_jax.data.pipelines import eval_batches
    from bob_jax.data.transforms import EvalTransform

    process = None
    if jax.process_count() > 1:
        unit = math.lcm(jax.process_count(), parallel.num_data_shards(mesh))
        batch_size = -(-batch_size // unit) * unit
        process = (jax.process_index(), jax.process_count())
    totals, correct_rows, index_rows = None, [], []
    for batch in eval_batches(source, EvalTransform(preprocess), batch_size, process=process,
                              num_threads=num_threads):
        labels = batch["label"].astype(np.int32)
        if label_map is not None:
            labels = np.where(batch["mask"], label_map(np.where(batch["mask"], labels, 0)), -1).astype(np.int32)
        b = parallel.shard_batch({"image": batch["image"], "label": labels, "mask": batch["mask"],
                                  "index": batch["index"].astype(np.int32)}, mesh)
        sums, correct = eval_step(params, rest, b["image"], b["label"], b["mask"])
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        # Source positions of the global batch's rows (-1: padding), whatever rows each process owns.
        index, correct = multihost_utils.process_allgather((b["index"], correct), tiled=True)
        keep = index >= 0
        correct_rows.append(correct[keep])
        index_rows.append(index[keep])
    if totals is None:
        raise ValueError("fine-tuning: the evaluation source is empty.")
    per_example = np.concatenate(correct_rows)[np.argsort(np.concatenate(index_rows), kind="stable")]
    totals = jax.tree.map(lambda v: np.asarray(v, np.float64), jax.device_get(totals))
    count = totals["count"]
    return {
        "top1": float(totals["correct1"] / count),
        "nll": float(totals["nll"] / count),
        "ece": float(np.sum(np.abs(totals["bin_acc"] - totals["bin_conf"])) / count),
        "num_eval": int(round(float(count))),
        # Correctness per example in source order (bootstrap intervals in the report).
        "per_example": per_example.astype(np.float64),
    }


def reinit_head(model: nnx.Module, seed: int = 0) -> list[str]:
    """Re-initialise the classifier head as the original's fine-tuning does: xavier-normal weights
    (torch `xavier_normal_`: std = sqrt(2 / (fan_in + fan_out))), zero bias. Returns the paths touched."""
    family = _family(model)
    rng = np.random.default_rng(seed)
    touched = []
    for path, var in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: _path_str(kv[0])):
        name = _path_str(path)
        if not name.startswith(family.head_prefixes):
            continue
        value = var.get_value()
        if value.ndim == 2:  # [fan_in, fan_out] kernel
            std = math.sqrt(2.0 / (value.shape[0] + value.shape[1]))
            new = rng.standard_normal(value.shape) * std
        else:
            new = np.zeros(value.shape)
        var.set_value(jnp.asarray(new, value.dtype))
        touched.append(name)
    if not touched:
        raise ValueError(f"{model.name}: no head parameters under {family.head_prefixes}; was it made with num_classes=0?")
    return touched


def finetune_model(name: str, weights, num_classes: int, config: FinetuneConfig | None = None, *, seed: int = 0,
                   **kwargs) -> nnx.Module:
    """`backbones.create(name, weights=..., num_classes=...)` with the head re-initialised (`reinit_head`).

    With `config`, the model gets its stochastic depth: `drop_path_rate=config.drop_path_rate` (an
    explicit `drop_path_rate` keyword wins). Without, the backbone's default applies (timm's: 0.1
    for Swin, 0 otherwise)."""
    from bob_jax import backbones

    if config is not None:
        kwargs.setdefault("drop_path_rate", config.drop_path_rate)
    model = backbones.create(name, weights=weights, seed=seed, num_classes=num_classes, **kwargs)
    reinit_head(model, seed)
    return model


def evaluate_model(model: nnx.Module, source, *, preprocess=None, batch_size: int = 64, mesh=None,
                   class_subset=None, label_map=None, num_threads: int = 4,
                   sharding_rules=None) -> dict[str, float]:
    """Top1 / NLL / ECE of a classifier `model` (eval mode) on `source`, e.g. a fine-tuned model on
    shifted test sets. `class_subset` / `label_map`: see `make_eval_step` / `evaluate`. Parameters
    are placed on `mesh` by `sharding_rules` (`parallel.parse_rules`; default: FSDP-sharded on a mesh
    with an "fsdp" axis, else replicated), other state replicated."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    preprocess = preprocess or model.preprocess
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.device_put(params, parallel.tree_shardings(params, mesh, sharding_rules))
    rest = jax.device_put(rest, parallel.replicated(mesh))
    subset = None if class_subset is None else tuple(int(i) for i in class_subset)
    step = make_eval_step(graphdef, mesh, preprocess, class_subset=subset)
    batch_size = -(-batch_size // parallel.num_data_shards(mesh)) * parallel.num_data_shards(mesh)
    return evaluate(step, params, rest, source, preprocess, batch_size=batch_size, mesh=mesh,
                    num_threads=num_threads, label_map=label_map)


def run_finetune(
    model: nnx.Module,
    train_source,
    test_source,
    *,
    num_classes: int,
    config: FinetuneConfig,
    mesh=None,
    workdir: str | None = None,
    progress: bool = True,
    sharding_rules=None,
) -> dict[str, Any]:
    """Fine-tune every parameter of `model` (a `backbones.create(..., num_classes=K)` model) on
    `train_source` and evaluate on `test_source`. Returns metrics plus `steps`, `losses` (per logged
    window mean), `train_seconds`. With `workdir`, the full training state and the grain iterator
    state are saved at every epoch end under `workdir/checkpoints`; a rerun with the same workdir
    resumes exactly (per-step augmentation keys are fold_in(seed, step)), also on a mesh of another
    shape: the checkpoint is restored onto this run's shardings. Parameters and optimiser state are
    placed on `mesh` by `sharding_rules` (`parallel.parse_rules`; default: FSDP-sharded on a mesh
    with an "fsdp" axis, else replicated)."""
    from bob_jax.backbones import set_compute_dtype
    from bob_jax.data.augment import FinetuneTrainTransform
    from bob_jax.data.pipelines import train_dataset

    if num_classes < 2:
        raise ValueError(f"run_finetune: num_classes must be >= 2, got {num_classes}.")
    cfg_classes = getattr(getattr(model, "cfg", None), "num_classes", None)
    if cfg_classes is not None and cfg_classes != num_classes:
        raise ValueError(
            f"run_finetune: the model's head has {cfg_classes} classes but num_classes={num_classes}; "
            f"create it with backbones.create(name, weights=..., num_classes={num_classes})."
        )
    mesh = parallel.make_mesh() if mesh is None else mesh
    if config.batch_size % parallel.num_data_shards(mesh):
        raise ValueError(
            f"run_finetune: batch_size {config.batch_size} is not divisible by the "
            f"{parallel.num_data_shards(mesh)} data shards of the mesh."
        )
    if config.batch_size % jax.process_count():
        raise ValueError(
            f"run_finetune: batch_size {config.batch_size} does not split over the {jax.process_count()} "
            f"processes; use a multiple of {jax.process_count()}."
        )
    preprocess = model.preprocess
    if config.input_size is not None and config.input_size != preprocess.input_size:
        preprocess = preprocess.replace(input_size=config.input_size)
    n_train = len(train_source)
    steps_per_epoch = n_train // config.batch_size
    if steps_per_epoch < config.accumulation_steps:
        raise ValueError(
            f"run_finetune: {n_train} training examples give {steps_per_epoch} batches of "
            f"{config.batch_size} per epoch, fewer than accumulation_steps={config.accumulation_steps}; "
            "lower the batch size."
        )
    total_steps = steps_per_epoch * config.epochs
    # Optimiser updates (every accumulation_steps micro-batches) drive the schedule.
    schedule = warmup_cosine_lr(
        config.lr, total_steps // config.accumulation_steps,
        steps_per_epoch * config.warmup_epochs // config.accumulation_steps,
        warmup_lr=config.warmup_lr, min_lr=config.min_lr,
    )

    # Remember each layer's compute dtype: bfloat16 applies to this run only.
    saved_dtypes = [(m, m.dtype) for _, m in nnx.iter_modules(model) if hasattr(m, "dtype")]
    if config.compute_dtype == "bfloat16":
        set_compute_dtype(model, jnp.bfloat16)
    model.eval()
    eval_graphdef = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    lr_scales = layer_decay_scales(model, config.layer_decay, params) if config.layer_decay < 1 else \
        jax.tree.map(lambda _: 1.0, params)
    tx = adamw_layer_decay(
        schedule, weight_decay=config.weight_decay, lr_scales=lr_scales, decay_mask=weight_decay_mask(params),
        accumulation_steps=config.accumulation_steps,
    )
    (params, rest, opt_state), shardings = place_state(params, rest, tx, mesh, sharding_rules)
    train_step = make_train_step(graphdef, tx, mesh, preprocess, num_classes, config, state_shardings=shardings)
    eval_step = make_eval_step(eval_graphdef, mesh, preprocess)

    transform = FinetuneTrainTransform(
        preprocess, auto_augment=config.auto_augment, color_jitter=config.color_jitter,
        interpolation=config.train_interpolation,
    )
    # Each process reads only its rows of every global batch; the global batches (and the iterator
    # state, global batches consumed) are those of a single-process run.
    ds = train_dataset(train_source, transform, config.batch_size, seed=config.seed, num_epochs=config.epochs,
                       num_threads=config.num_threads, process=(jax.process_index(), jax.process_count()))
    it = iter(ds)
    base_key = jax.random.key(config.seed)
    run_meta = {"task": "finetune", "model": str(getattr(model, "name", "")), "num_classes": int(num_classes),
                "num_train": int(n_train), "total_steps": int(total_steps),
                "config": dataclasses.asdict(config)}

    # The training state is checkpointed as a flat list of arrays: nnx.State / optax states hold
    # Variable nodes, and the leaf order of (params, rest, opt_state) is fixed by the graphdef.
    treedef = jax.tree.structure((params, rest, opt_state))
    ckpt, start_step = None, 0
    if workdir is not None:
        from bob_jax.checkpoint import Checkpointer, abstract_like

        # Synchronous saves: the state buffers are donated to the next step.
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2, async_save=False)
        latest = ckpt.latest_step()
        if latest is not None:
            saved = ckpt.metadata(latest)
            mismatched = sorted(k for k in run_meta if saved.get(k) != run_meta[k])
            if mismatched:
                ckpt.close()
                raise ValueError(
                    f"run_finetune: {workdir} holds a checkpoint of a different run "
                    f"(differs in {mismatched}); use a new workdir or delete the old one."
                )
            leaves = jax.tree.leaves((params, rest, opt_state))
            restored, data_state = ckpt.restore(latest, abstract_like({"leaves": leaves}))
            params, rest, opt_state = jax.tree.unflatten(treedef, restored["leaves"])
            it.set_state(data_state)
            start_step = latest

    losses, window = [], []
    start = time.perf_counter()
    step = start_step
    every = steps_per_epoch  # checkpoint once per epoch
    # SIGTERM / SIGUSR1 / SIGUSR2: checkpoint the current step and raise Preempted (bob_jax.preemption).
    try:
        with preemption.watch(enabled=ckpt is not None) as watcher:
            while step < total_steps:
                batch = next(it)
                step += 1
                labels = batch["label"].astype(np.int32)
                b = parallel.shard_batch({"image": batch["image"], "label": labels}, mesh)
                params, rest, opt_state, loss = train_step(
                    params, rest, opt_state, b["image"], b["label"], jax.random.fold_in(base_key, step)
                )
                window.append(loss)
                if step % config.log_every_steps == 0 or step == total_steps:
                    mean = float(np.mean(jax.device_get(window)))
                    if not math.isfinite(mean):
                        raise FloatingPointError(
                            f"run_finetune: the training loss became {mean} by step {step}.")
                    losses.append(mean)
                    window = []
                    if progress and jax.process_index() == 0:
                        lr_now = float(schedule(step // config.accumulation_steps))
                        print(f"finetune step {step}/{total_steps} loss {mean:.4f} lr {lr_now:.2e}",
                              flush=True)
                stop = watcher.should_stop(step)  # the same step on every process
                if ckpt is not None and (stop or step % every == 0 or step == total_steps):
                    ckpt.save(step, {"leaves": jax.tree.leaves((params, rest, opt_state))}, it.get_state(),
                              run_meta, force=True)
                if stop:
                    raise preemption.Preempted(step, ckpt.directory, watcher.signal_name)
    finally:
        if ckpt is not None:
            ckpt.close()
    train_seconds = time.perf_counter() - start
    metrics = evaluate(eval_step, params, rest, test_source, preprocess,
                       batch_size=config.eval_batch_size or config.batch_size, mesh=mesh,
                       num_threads=config.num_threads)
    # Write the trained state back so the caller's model object holds the fine-tuned weights.
    nnx.update(model, params, rest)
    model.eval()
    for module, dtype in saved_dtypes:
        module.dtype = dtype
    return {**metrics, "steps": step, "resumed_from": start_step, "losses": losses,
            "train_seconds": train_seconds,
            "num_train": n_train, "config": dataclasses.asdict(config)}
