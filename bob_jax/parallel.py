"""Device meshes, shardings and global batches: data parallelism and FSDP over named mesh axes.

bob_jax runs every jitted step over a `jax.sharding.Mesh` with named axes:
  * "data": data parallelism. The batch dimension is split over it; parameters are replicated.
  * "fsdp": fully-sharded data parallelism (ZeRO-3 style). The batch dimension is split over it as
    well (every device gets its own slice of the batch), and parameters and optimiser state are
    sharded over it by rules (below); XLA all-gathers each weight where it is used and
    reduce-scatters its gradient.
Both may be present (`{"data": 2, "fsdp": 4}`: 4-way parameter sharding inside each of 2 replicas,
the batch split 8 ways). The same code runs on one CPU device, 8 simulated devices in tests, one GPU,
or a pod slice: only the mesh (`--config.mesh=data=2,fsdp=4`, see `parse_mesh_spec`) changes. Data
loaders produce the process-local part of each global batch and `shard_batch` assembles the global
`jax.Array`.

Parameter sharding rules (as in big_vision): an ordered sequence of `(regex, spec)` pairs matched with
`re.fullmatch` against each parameter's dotted path (`path_str`, e.g. "blocks.3.attn.qkv.kernel");
the first match wins, a parameter no rule matches is replicated. A spec is
  * "fsdp": shard the largest dimension that the "fsdp" axis size divides over "fsdp"; replicate when
    no dimension divides, when the array has fewer than `min_size` elements (default 2**14: for tiny
    arrays such as biases and norm scales the per-array latency of the all-gather/reduce-scatter
    costs more than the memory it saves), or when the mesh has no "fsdp" axis;
  * "replicate": a copy on every device;
  * an explicit `PartitionSpec`, as a `PartitionSpec`, a tuple (`("fsdp", None)`) or a string of
    comma-separated entries per dimension: an axis name, `a+b` for several axes, `None` (or empty)
    for a replicated dimension, e.g. "fsdp,None" or "None,data+fsdp". A spec shorter than the array's
    rank replicates the remaining dimensions. Every named axis must exist in the mesh and its size
    must divide the dimension; otherwise the error names the parameter, its shape and the rule.
In a config, rules are strings "regex=spec" (`parse_rules`; the spec is after the last "=").
`DEFAULT_RULES` = everything "fsdp": sharded on a mesh with an "fsdp" axis, replicated otherwise.
Optimiser state follows the parameters it mirrors (`opt_state_shardings`); its scalars (step counts)
are replicated.

Memory (from the compiled fine-tuning step's `memory_analysis()`, tests/train/test_fsdp.py): with
fsdp=N each device holds about 1/N of the float32 parameters and AdamW moments (DINOv2-g on 8 devices:
1.6 GiB instead of 12.7 GiB). XLA keeps every layer's all-gathered weights from the forward to the
backward pass, so the step's temporary memory still holds about one full copy of the weights plus
the activations (DINOv2-g, 1 image of 224 px per device: 5.7 GiB); rematerialising blocks would trade
that for a second all-gather per layer.

The mesh is built with `jax.sharding.Mesh` directly (axis types "Auto"), not `jax.make_mesh`, whose
default axis types changed across jax releases; Auto keeps GSPMD propagation semantics on all
supported versions (jax 0.10.2 .. 0.12).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# Axes the batch dimension is split over, in this order when both are present.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Smallest array (in elements) that the automatic "fsdp" spec shards; see the module docstring.
FSDP_MIN_SIZE = 2**14
REPLICATE = "replicate"
AUTO_FSDP = "fsdp"
DEFAULT_RULES = ((".*", AUTO_FSDP),)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Build a mesh over `devices` (default: all devices).

    Args:
      shape: ordered mapping axis name -> size, e.g. {"data": -1} or {"data": 2, "fsdp": 4}. At most
        one size may be -1, meaning "all remaining devices". Default: a single "data" axis.
      devices: the devices to use (default `jax.devices()`); e.g. `jax.devices()[:1]` for a 1-device
        mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n == 0:
        raise ValueError("make_mesh: got an empty device list; pass at least one device.")
    shape = dict(shape) if shape is not None else {DATA_AXIS: -1}
    if not shape:
        raise ValueError("make_mesh: shape must name at least one axis, e.g. {'data': -1}.")
    for name, size in shape.items():
        if not isinstance(size, int | np.integer) or (size < 1 and size != -1):
            raise ValueError(f"make_mesh: axis {name!r} has size {size!r}; use a positive int or -1.")
    free = [k for k, v in shape.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"make_mesh: only one axis may be -1, got {free} in {shape}.")
    known = math.prod(v for v in shape.values() if v != -1)
    if free:
        if n % known:
            raise ValueError(
                f"make_mesh: cannot fill axis {free[0]!r}: the other axes use {known} devices, which does "
                f"not divide the {n} available devices. Choose axis sizes whose product divides {n}."
            )
        shape[free[0]] = n // known
    if math.prod(shape.values()) != n:
        raise ValueError(
            f"make_mesh: mesh shape {shape} needs {math.prod(shape.values())} devices but {n} devices "
            f"were given; make the product of the axis sizes equal {n} (or use -1 for one axis)."
        )
    sizes = tuple(shape.values())
    if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
        # All devices: let jax order them by physical topology (matters on TPU/multi-GPU hosts).
        from jax.experimental import mesh_utils

        try:
            device_array = mesh_utils.create_device_mesh(sizes, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            device_array = np.asarray(devices, dtype=object).reshape(sizes)
    else:
        device_array = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(device_array, tuple(shape.keys()))


def parse_mesh_spec(spec: str) -> dict[str, int] | None:
    """A config's mesh string -> `make_mesh` shape: "data=2,fsdp=4" -> {"data": 2, "fsdp": 4}.

    Empty -> None (every device on "data"). One size may be -1 ("the remaining devices"), e.g.
    "data=-1,fsdp=8" for 8-way parameter sharding inside each data replica on any device count."""
    spec = (spec or "").strip()
    if not spec:
        return None
    shape: dict[str, int] = {}
    for item in spec.split(","):
        name, sep, size = (s.strip() for s in item.partition("="))
        if not sep or not name:
            raise ValueError(f"mesh {spec!r}: {item!r} is not axis=size; write e.g. 'data=2,fsdp=4'.")
        if name not in BATCH_AXES:
            raise ValueError(
                f"mesh {spec!r}: unknown axis {name!r}; bob_jax's steps use the axes {BATCH_AXES} "
                "('data': data parallel, 'fsdp': parameters and optimiser state sharded)."
            )
        if name in shape:
            raise ValueError(f"mesh {spec!r}: axis {name!r} is given twice.")
        try:
            shape[name] = int(size)
        except ValueError:
            raise ValueError(f"mesh {spec!r}: size {size!r} of axis {name!r} is not an integer (or -1).") from None
    return shape


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over: "data" and/or "fsdp", whichever exist."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def num_data_shards(mesh: Mesh) -> int:
    """Number of shards the batch dimension is split into (product of the batch axes, 1 if none)."""
    return math.prod(int(mesh.shape[a]) for a in batch_axes(mesh))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Batch dimension (axis 0) split over the batch axes ("data", "fsdp"); other dimensions replicated."""
    axes = batch_axes(mesh)
    if not axes:
        raise ValueError(
            f"data_sharding: mesh axes {mesh.axis_names} have neither a {DATA_AXIS!r} nor an {FSDP_AXIS!r} "
            "axis to split the batch over; build the mesh with one of them."
        )
    # A single axis is spelled PartitionSpec("data"), as before FSDP existed (same sharding either way).
    return NamedSharding(mesh, PartitionSpec(axes[0] if len(axes) == 1 else axes))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def shard_global_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Like `shard_batch`, but every process passes the WHOLE global batch (host arrays that are the same
    everywhere, e.g. features gathered onto every process) and each device is fed its rows from it.

    Single-process this equals `shard_batch`; with several processes it spares callers the slicing of
    their own rows, which `shard_batch` expects."""
    sharding = data_sharding(mesh)
    shards = num_data_shards(mesh)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] != np.shape(next(iter(batch.values())))[0]:
            raise ValueError(
                f"shard_global_batch: {key!r} has shape {value.shape}; every entry needs the same leading "
                "(batch) dimension."
            )
        if value.shape[0] % shards:
            raise ValueError(
                f"shard_global_batch: batch size {value.shape[0]} (entry {key!r}) is not divisible by the "
                f"{shards} data shards of the mesh; pad it to a multiple of {shards} and mask the padding."
            )
        out[key] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
    return out


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Turn a dict of process-local numpy arrays into global arrays sharded over the batch axes.

    Every process passes its own slice of the global batch (the whole batch when single-process); the
    global batch size is the local size times the process count. It must divide evenly into the data
    shards of the mesh.
    """
    sharding = data_sharding(mesh)
    shards = num_data_shards(mesh)
    out = {}
    local_size = None
    for key, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"shard_batch: {key!r} is a scalar; every batch entry needs a batch dimension.")
        if local_size is None:
            local_size = value.shape[0]
        elif value.shape[0] != local_size:
            raise ValueError(
                f"shard_batch: {key!r} has batch size {value.shape[0]} but other entries have {local_size}; "
                "all entries of a batch must share the leading dimension."
            )
        global_size = value.shape[0] * jax.process_count()
        if global_size % shards:
            raise ValueError(
                f"shard_batch: global batch size {global_size} (entry {key!r}) is not divisible by the "
                f"{shards} data shards of the mesh; use a batch size that is a multiple of {shards} "
                "(pad and mask the last batch for evaluation)."
            )
        global_shape = (global_size,) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


# --------------------------------------------------------------------------------------------------
# Parameter sharding rules
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardingRule:
    """One rule: parameters whose dotted path fully matches `pattern` get `spec` ("fsdp", "replicate"
    or a PartitionSpec)."""

    pattern: str
    spec: str | PartitionSpec
    text: str | None = dataclasses.field(default=None, compare=False)  # as the user wrote it, for errors

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"sharding rule {self}: {self.pattern!r} is not a valid regex ({e}).") from None
        if not isinstance(self.spec, PartitionSpec) and self.spec not in (AUTO_FSDP, REPLICATE):
            raise ValueError(
                f"sharding rule {self}: spec must be {AUTO_FSDP!r}, {REPLICATE!r} or a PartitionSpec "
                "(parse_rules turns strings such as 'fsdp,None' into one)."
            )

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None

    def __str__(self) -> str:
        return self.text or f"{self.pattern}={self.spec if isinstance(self.spec, str) else repr(self.spec)}"


def _spec_str(spec: PartitionSpec) -> str:
    return ",".join("None" if e is None else e if isinstance(e, str) else "+".join(e) for e in spec)


def _parse_entry(entry: Any) -> str | tuple[str, ...] | None:
    """One dimension of a spec: None / "None" / "" (replicated), "fsdp", "data+fsdp" or ("data", "fsdp")."""
    if entry is None:
        return None
    if isinstance(entry, str):
        entry = entry.strip()
        if entry in ("", "None"):
            return None
        return tuple(a.strip() for a in entry.split("+")) if "+" in entry else entry
    if isinstance(entry, tuple | list) and all(isinstance(a, str) for a in entry):
        return tuple(entry)
    raise ValueError(f"sharding spec entry {entry!r}: use an axis name, 'a+b', a tuple of axis names or None.")


def _parse_spec(spec: Any, where: str) -> str | PartitionSpec:
    if isinstance(spec, PartitionSpec):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if text in (AUTO_FSDP, REPLICATE):
            return text
        if not text:
            raise ValueError(f"sharding rule {where}: empty spec; use 'fsdp', 'replicate' or e.g. 'fsdp,None'.")
        entries = [_parse_entry(part) for part in text.split(",")]
        while entries and entries[-1] is None:  # "fsdp," == "fsdp,None" == PartitionSpec("fsdp")
            entries.pop()
        return PartitionSpec(*entries)
    if isinstance(spec, tuple | list):
        return PartitionSpec(*(_parse_entry(e) for e in spec))
    raise ValueError(
        f"sharding rule {where}: spec {spec!r} must be 'fsdp', 'replicate', a PartitionSpec, a tuple such as "
        "('fsdp', None) or a string such as 'fsdp,None'."
    )


def parse_rules(rules: Any = None) -> tuple[ShardingRule, ...]:
    """Normalise sharding rules: None/empty -> `DEFAULT_RULES`; otherwise a sequence whose items are
    `ShardingRule`s, `(regex, spec)` pairs or "regex=spec" strings (spec after the last "=")."""
    if rules is None or (isinstance(rules, Sequence) and not isinstance(rules, str) and len(rules) == 0):
        rules = DEFAULT_RULES
    if isinstance(rules, str):
        raise ValueError(
            f"sharding rules {rules!r}: pass a sequence of rules, e.g. ('.*kernel=fsdp', '.*=replicate'), "
            "not one string."
        )
    out = []
    for item in rules:
        if isinstance(item, ShardingRule):
            out.append(item)
            continue
        if isinstance(item, str):
            pattern, sep, spec = item.rpartition("=")
            if not sep:
                raise ValueError(
                    f"sharding rule {item!r} is not 'regex=spec'; write e.g. 'blocks\\..*kernel=fsdp' or "
                    "'.*=replicate'."
                )
        elif isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str):
            pattern, spec = item
        else:
            raise ValueError(f"sharding rule {item!r}: expected 'regex=spec' or a (regex, spec) pair.")
        out.append(ShardingRule(pattern, _parse_spec(spec, repr(item)), text=item if isinstance(item, str) else None))
    return tuple(out)


def path_str(path) -> str:
    """Dotted path of a pytree key path, e.g. "blocks.3.attn.qkv.kernel" (the `.value` attribute of
    NNX Variables is dropped; same spelling as the fine-tuning's layer-decay paths)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            continue
        parts.append(str(k.key if isinstance(k, jax.tree_util.DictKey) else getattr(k, "idx", k)))
    return ".".join(parts)


def _auto_fsdp_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int) -> PartitionSpec:
    size = mesh.shape.get(FSDP_AXIS, 1)
    if size == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    # Largest dimension first; among equal sizes the earliest.
    for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
        if shape[dim] % size == 0:
            return PartitionSpec(*([None] * dim + [FSDP_AXIS]))
    return PartitionSpec()


def _check_spec(name: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh, rule: ShardingRule) -> None:
    def fail(problem):
        raise ValueError(f"sharding rule '{rule}' for parameter {name} of shape {shape}: {problem}")

    if len(spec) > len(shape):
        fail(f"the spec has {len(spec)} entries but the parameter has {len(shape)} dimensions.")
    per_dim = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec]
    seen = set()
    for axis in (a for axes in per_dim for a in axes):
        if axis not in mesh.axis_names:
            fail(f"axis {axis!r} is not in the mesh {dict(mesh.shape)}.")
        if axis in seen:
            fail(f"axis {axis!r} is used for two dimensions.")
        seen.add(axis)
    for dim, axes in enumerate(per_dim):
        n = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % n:
            fail(
                f"dimension {dim} (size {shape[dim]}) is not divisible by {n} (axes {axes} of the mesh "
                f"{dict(mesh.shape)}); choose another dimension, 'fsdp' (picks one that divides) or 'replicate'."
            )


def partition_spec(name: str, shape: Sequence[int], mesh: Mesh, rules: Any = None, *,
                   min_size: int = FSDP_MIN_SIZE) -> tuple[PartitionSpec, ShardingRule | None]:
    """The spec of one parameter (`name`: dotted path) and the rule that chose it (None: no rule
    matched, replicated)."""
    shape = tuple(int(d) for d in shape)
    for rule in parse_rules(rules):
        if not rule.matches(name):
            continue
        if rule.spec == REPLICATE:
            return PartitionSpec(), rule
        if rule.spec == AUTO_FSDP:
            return _auto_fsdp_spec(shape, mesh, min_size), rule
        _check_spec(name, shape, rule.spec, mesh, rule)
        return rule.spec, rule
    return PartitionSpec(), None


def tree_shardings(tree: Any, mesh: Mesh, rules: Any = None, *, min_size: int = FSDP_MIN_SIZE) -> Any:
    """A pytree like `tree` (arrays or `jax.ShapeDtypeStruct`s, e.g. an `nnx.State` of parameters)
    holding each leaf's `NamedSharding` under `rules` (see the module docstring)."""
    rules = parse_rules(rules)

    def leaf(path, x):
        return NamedSharding(mesh, partition_spec(path_str(path), np.shape(x), mesh, rules, min_size=min_size)[0])

    return jax.tree.map_with_path(leaf, tree)


def opt_state_shardings(tx: Any, opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of an optax state (real or `jax.eval_shape`d): every copy of the parameter tree in it
    (Adam moments, accumulated gradients) gets the parameters' shardings; everything else (step
    counts) is replicated. `tx` is the optax transformation (or its `init`) that made `opt_state`."""
    import optax

    rep = replicated(mesh)
    return optax.tree_map_params(tx, lambda _, s: s, opt_state, param_shardings,
                                 transform_non_params=lambda _: rep)


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds for `tree` placed with `shardings` (the largest shard per leaf)."""

    def leaf(x, s):
        shard = s.shard_shape(tuple(np.shape(x)))
        return math.prod(shard) * np.dtype(x.dtype).itemsize

    return int(sum(jax.tree.leaves(jax.tree.map(leaf, tree, shardings))))


def describe(tree: Any, mesh: Mesh, rules: Any = None, *, min_size: int = FSDP_MIN_SIZE,
             max_rows: int | None = None) -> str:
    """A table: each parameter's path, shape, spec and the rule that chose it, then the totals
    (elements, bytes per device sharded vs replicated). For logs and for checking a rule set."""
    rules = parse_rules(rules)
    rows, total, local = [], 0, 0
    for path, x in jax.tree.leaves_with_path(tree):
        name, shape = path_str(path), tuple(np.shape(x))
        spec, rule = partition_spec(name, shape, mesh, rules, min_size=min_size)
        nbytes = math.prod(shape) * np.dtype(x.dtype).itemsize
        total += nbytes
        local += math.prod(NamedSharding(mesh, spec).shard_shape(shape)) * np.dtype(x.dtype).itemsize
        rows.append(f"{name:60s} {str(shape):22s} {_spec_str(spec) or 'replicated':20s} "
                    f"{'(no rule)' if rule is None else str(rule)}")
    if max_rows is not None and len(rows) > max_rows:
        rows = rows[:max_rows] + [f"... {len(rows) - max_rows} more"]
    rows.append(f"mesh {dict(mesh.shape)}: {total / 2**20:.1f} MiB in total, {local / 2**20:.1f} MiB per device")
    return "\n".join(rows)


