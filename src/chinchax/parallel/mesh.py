"""Cluster presets → a jax Mesh with axes ('data', 'fsdp', 'tensor'), and one logical-axis rules table.

A Cerebras wafer-scale cluster trains by weight streaming: every CS-2 system computes on its shard of the
batch while each layer's weights stream in from MemoryX and the gradients are summed back. In JAX terms that
is FSDP (ZeRO-3): parameters and optimizer state sharded over the 'fsdp' axis, gathered per layer inside the
scan, gradients reduce-scattered. 'data' holds plain replicas, 'tensor' splits heads and the MLP (Megatron
style) on GPU/TPU pods. Parameters carry logical axis names (model.py); `LOGICAL_RULES` maps them to mesh
axes, and everything else (param/state/batch shardings, the jitted step) is derived from it. Shapes that do
not divide their mesh axes fail here, in one line, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from chinchax.config import ConfigError, kv_heads
from chinchax.model import gpt
from chinchax.parallel import hardware

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch is split over

# Logical axis → mesh axes, in priority order (flax semantics: a row applies when its mesh axes are still
# unused by the array's earlier rows). So an activation's 'embed' stays replicated because 'batch' already
# took 'fsdp', while a parameter's 'embed' is sharded over 'fsdp'.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),  # activations: data parallel across replicas and weight-streaming systems
    ("length", None),
    ("layers", None),  # the scan axis: each step of the scan gathers one layer
    ("embed", "fsdp"),  # parameters: every weight matrix has an embed dimension to shard (FSDP)
    ("heads", "tensor"),
    # Grouped-query attention's key/value heads split over 'tensor' beside the query heads that read them
    # (MaxText's rule; gpt.per_shard hands each device its own kv heads). A kv head count the tensor axis does
    # not divide is refused (`check_heads`), as Megatron refuses num_query_groups % tensor != 0, rather than
    # replicated (vLLM's way at inference, which needs each device to pick its query heads' kv head).
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),  # presets whose vocabulary does not divide list it in Preset.replicated
)

REST = -1  # in a preset shape: this axis takes the devices the other axes leave


@dataclasses.dataclass(frozen=True)
class Preset:
    """A cluster as data: its device model, how many devices, the (data, fsdp, tensor) shape, logical axes
    kept unsharded. A name with N (e.g. 'wse-N') is a family: 'wse-16' sets N = 16."""

    description: str
    device: hardware.Device
    devices: int | None  # None: all visible devices (a family: N × devices_per_n)
    shape: tuple[int, int, int]  # one entry may be REST
    replicated: tuple[str, ...] = ()  # LOGICAL_RULES rows this preset leaves out
    devices_per_n: int = 1  # a family's devices for each unit of N


D = hardware.DEVICES
# fmt: off
PRESETS: dict[str, Preset] = {
    "cpu":        Preset("local devices, data parallel", D["cpu"], None, (REST, 1, 1)),
    "wse-N":      Preset("N Cerebras CS-2 systems (Andromeda: 16), weight streaming = FSDP over N",
                         D["cs2"], None, (1, REST, 1)),
    "gpu-8":      Preset("one 8×H100 node: FSDP 4 × tensor 2 over NVLink", D["h100"], 8, (1, REST, 2), ("vocab",)),
    "gpu-h200-8": Preset("one 8×H200 node: FSDP 4 × tensor 2", D["h200"], 8, (1, REST, 2), ("vocab",)),
    "gpu-a100-8": Preset("one 8×A100 80 GB node: FSDP 4 × tensor 2", D["a100"], 8, (1, REST, 2), ("vocab",)),
    "gpu-8xN":    Preset("N 8×H100 nodes: data parallel across nodes, FSDP 4 × tensor 2 within each",
                         D["h100"], None, (REST, 4, 2), ("vocab",), devices_per_n=8),
    "gpu-a100-8xN": Preset("N 8×A100 80 GB nodes: data parallel across nodes, FSDP 4 × tensor 2 within each",
                           D["a100"], None, (REST, 4, 2), ("vocab",), devices_per_n=8),
    "tpu-v5e-N":  Preset("a TPU v5e slice of N chips: FSDP N/2 × tensor 2", D["tpu-v5e"], None, (1, REST, 2),
                         ("vocab",)),
    "tpu-v5p-N":  Preset("a TPU v5p slice of N chips (GCP type v5p-2N): FSDP over N", D["tpu-v5p"], None,
                         (1, REST, 1)),
    "tpu-v4-N":   Preset("a TPU v4 slice of N chips (GCP type v4-2N): FSDP over N", D["tpu-v4"], None,
                         (1, REST, 1)),
}
# fmt: on
# The GPT-2 vocabulary (50257) and the byte vocabulary (257) are odd: with tensor parallelism the token
# embedding (and an untied head) is sharded over 'fsdp' on its embed dimension only, and logits are split by
# batch only.


def preset(name: str) -> Preset:
    """The preset of a name; a family instantiates with its N: 'wse-16', 'gpu-8x4', 'tpu-v5p-64'."""
    if name in PRESETS and not name.endswith("N"):
        return PRESETS[name]
    for family, template in PRESETS.items():
        if family.endswith("N") and (match := re.fullmatch(re.escape(family[:-1]) + r"([1-9][0-9]*)", name)):
            return dataclasses.replace(template, devices=int(match.group(1)) * template.devices_per_n)
    raise ConfigError(f"unknown mesh preset {name!r}; known: {', '.join(PRESETS)} (N: a count, e.g. wse-16)")


def _mesh_config(spec: ml_collections.ConfigDict | str) -> tuple[str, dict[str, int]]:
    """(preset name, {axis: override or 0}) from cfg.mesh or a bare preset name."""
    if isinstance(spec, str):
        return spec, dict.fromkeys(AXES, 0)
    return spec.preset, {axis: int(spec[axis]) for axis in AXES}


def mesh_shape(spec: ml_collections.ConfigDict | str, device_count: int) -> dict[str, int]:
    """{'data': d, 'fsdp': f, 'tensor': t} for cfg.mesh (or a preset name) on `device_count` devices."""
    name, overrides = _mesh_config(spec)
    chosen = preset(name)
    if chosen.devices is not None and chosen.devices != device_count and not any(overrides.values()):
        raise ConfigError(f"mesh preset {name!r} needs {chosen.devices} devices, {device_count} are given")
    sizes = {axis: overrides[axis] or size for axis, size in zip(AXES, chosen.shape, strict=True)}
    rest = [axis for axis, size in sizes.items() if size == REST]
    if rest:
        known = math.prod(size for size in sizes.values() if size != REST)
        if device_count % known:
            raise ConfigError(f"mesh {name!r}: {device_count} devices do not split into {sizes}")
        sizes[rest[0]] = device_count // known
    if math.prod(sizes.values()) != device_count:
        shape = " × ".join(f"{a} {s}" for a, s in sizes.items())
        raise ConfigError(
            f"mesh {name!r} ({shape}) needs {math.prod(sizes.values())} devices, {device_count} are given"
        )
    return sizes


def make_mesh(spec: ml_collections.ConfigDict | str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The Mesh of cfg.mesh (or a preset name) over `devices` (default: all), axes ('data', 'fsdp', 'tensor').

    Axes are Auto (GSPMD propagates shardings; jax 0.10 defaults make_mesh to Explicit).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(spec, len(devices))
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def abstract_mesh(spec: ml_collections.ConfigDict | str, device_count: int) -> AbstractMesh:
    """The mesh's shape without devices: enough for param_specs and the checks (e.g. a 16-chip preset here)."""
    return abstract_mesh_of(mesh_shape(spec, device_count))


def abstract_mesh_of(sizes: dict[str, int]) -> AbstractMesh:
    """An abstract mesh of these axis sizes ({'data': d, 'fsdp': f, 'tensor': t})."""
    return AbstractMesh(tuple(sizes[axis] for axis in AXES), AXES, axis_types=(AxisType.Auto,) * 3)


def rules(spec: ml_collections.ConfigDict | str) -> tuple:
    """LOGICAL_RULES without the rows the preset leaves out (for nn.logical_axis_rules)."""
    replicated = preset(_mesh_config(spec)[0]).replicated
    return tuple((name, axes) for name, axes in LOGICAL_RULES if name not in replicated)


def _axes_size(mesh: Mesh | AbstractMesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def check_heads(cfg: ml_collections.ConfigDict, mesh: Mesh | AbstractMesh) -> None:
    """ConfigError (one line, naming the field) when the query or key/value heads do not split over the mesh
    axes their rules give them ('tensor'), before any shape is traced."""
    table = dict(rules(cfg.mesh))
    m = cfg.model
    for field, count, logical in (
        ("model.n_heads", m.n_heads, "heads"),
        ("model.kv_heads", kv_heads(m), "kv_heads"),
    ):
        axes = table.get(logical)
        if count % _axes_size(mesh, axes):
            raise ConfigError(
                f"config {cfg.name!r} on mesh {_describe(cfg.mesh, mesh)}: {field}={count} is not divisible by "
                f"mesh axes {axes} = {_axes_size(mesh, axes)}; set --config.mesh.tensor=1 (FSDP instead) or "
                f"{field} to a multiple of it"
            )


def param_specs(cfg: ml_collections.ConfigDict, mesh: Mesh | AbstractMesh) -> dict:
    """The PartitionSpec of every parameter; ConfigError when the heads (`check_heads`) or any other dimension
    do not divide their mesh axes."""
    check_heads(cfg, mesh)
    logical = gpt.logical_axes(cfg.model)
    specs = nn.logical_to_mesh(logical, rules(cfg.mesh))

    def check(path, spec, names, shape):
        for dim, (axes, name, size) in enumerate(zip(spec, names, shape.shape, strict=False)):
            if size % _axes_size(mesh, axes):
                where = "/".join(str(k.key) for k in path)
                raise ConfigError(
                    f"config {cfg.name!r} on mesh {_describe(cfg.mesh, mesh)}: parameter {where} dim {dim} "
                    f"({name!r}) = {size} is not divisible by mesh axes {axes} = {_axes_size(mesh, axes)}"
                )
        return spec

    is_spec = lambda x: isinstance(x, PartitionSpec)
    return jax.tree_util.tree_map_with_path(
        check, specs, logical, gpt.param_shapes(cfg.model), is_leaf=is_spec
    )


def leaves(tree) -> list:
    """The leaves of a tree that may hold PartitionSpecs (themselves tuples), in tree order."""
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _describe(spec: ml_collections.ConfigDict | str, mesh: Mesh | AbstractMesh) -> str:
    shape = " × ".join(f"{a} {s}" for a, s in mesh.shape.items())
    return f"{_mesh_config(spec)[0]} ({shape})"


def param_shardings(cfg: ml_collections.ConfigDict, mesh: Mesh) -> dict:
    """A NamedSharding per parameter, by the rules."""
    is_spec = lambda x: isinstance(x, PartitionSpec)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh), is_leaf=is_spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars such as the step and optax's count)."""
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(cfg: ml_collections.ConfigDict, mesh: Mesh, state_shapes):
    """Shardings for a train state (or any pytree holding params): a leaf whose path ends in a parameter's
    path with that parameter's shape (params, Adam moments) takes the parameter's sharding; every other
    leaf (step, optax's count) is replicated explicitly, as an Auto mesh needs."""
    by_path = {}
    shardings = param_shardings(cfg, mesh)
    shapes = gpt.param_shapes(cfg.model)
    for (path, sharding), shape in zip(
        jax.tree_util.tree_leaves_with_path(shardings), jax.tree.leaves(shapes), strict=True
    ):
        by_path[tuple(k.key for k in path)] = (sharding, shape.shape)

    def choose(path, leaf):
        trailing = []
        for key in reversed(path):
            if not isinstance(key, jax.tree_util.DictKey):
                break
            trailing.insert(0, key.key)
        sharding, shape = by_path.get(tuple(trailing), (None, None))
        return sharding if shape == tuple(leaf.shape) else replicated(mesh)

    return jax.tree_util.tree_map_with_path(choose, state_shapes)


def _carried_shardings(cfg: ml_collections.ConfigDict, mesh: Mesh, state_shapes):
    """The shardings `sharded_shapes` put on these shapes, else `state_shardings` by the rules."""
    carried = [getattr(leaf, "sharding", None) for leaf in jax.tree.leaves(state_shapes)]
    if all(isinstance(s, NamedSharding) and s.mesh == mesh for s in carried):
        return jax.tree.map(lambda leaf: leaf.sharding, state_shapes)
    return state_shardings(cfg, mesh, state_shapes)


def sharded_shapes(cfg: ml_collections.ConfigDict, mesh: Mesh, state_shapes):
    """ShapeDtypeStructs carrying `state_shardings`: an AOT input, or an orbax restore target."""
    shardings = _carried_shardings(cfg, mesh, state_shapes)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, shardings
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(microbatches, sequences, seq_len) arrays: sequences split over the batch axes ('data', 'fsdp')."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None))


def batch_shards(mesh: Mesh) -> int:
    """Into how many parts a microbatch of sequences is split."""
    return _axes_size(mesh, BATCH_AXES)


def padded_microbatch(mesh: Mesh, sequences: int) -> int:
    """A microbatch of `sequences` rounded up to split evenly over the batch shards and the processes feeding
    them; the rows added are padding that carries no loss (chinchax.model.loss.IGNORE targets), so the batch stays exact."""
    processes = jax.process_count()
    if sequences % processes:
        raise ConfigError(f"a microbatch of {sequences} sequences does not split over {processes} processes")
    unit = math.lcm(batch_shards(mesh), processes)
    return -(-sequences // unit) * unit


def process_batch_rows(mesh: Mesh, global_sequences: int) -> slice:
    """The rows (sequences) of a global microbatch that this process's devices hold: what it should load."""
    shape = (1, global_sequences, 1)
    rows = [index[1] for index in batch_sharding(mesh).addressable_devices_indices_map(shape).values()]
    start = min(r.start or 0 for r in rows)
    stop = max(global_sequences if r.stop is None else r.stop for r in rows)
    return slice(start, stop)


def global_batch(mesh: Mesh, local_batch: dict, global_sequences: int) -> dict:
    """One global, sharded batch from each process's rows (`process_batch_rows`), as numpy arrays."""
    sharding = batch_sharding(mesh)

    def make(local):
        shape = (local.shape[0], global_sequences, *local.shape[2:])
        return jax.make_array_from_process_local_data(sharding, np.asarray(local), shape)

    return jax.tree.map(make, local_batch)


def summed_over_replicas(fn: Callable) -> Callable:
    """fn(shared, batch) run by each 'data' replica on its own rows, its outputs summed over the replicas once.

    For gradient accumulation: under plain jit XLA reduces a gradient where it is made, so a loop over
    microbatches all-reduces over 'data' once per microbatch. Here fn is vmapped over the replicas (the
    vmapped axis on 'data'), so its loop sums each replica's own gradients and the replicas reduce once at
    the end. shared: a pytree the replicas share (the parameters); batch: (microbatches, sequences, ...)
    arrays split over 'data' on their sequences. Inside fn the logical rules leave 'data' to the vmap.
    """

    def run(shared, batch):
        mesh = jax.sharding.get_abstract_mesh()
        replicas = 1 if mesh.empty else mesh.shape["data"]
        if replicas == 1:
            return fn(shared, batch)

        def by_replica(x):
            """(microbatches, sequences, ...) → (replicas, microbatches, sequences / replicas, ...)"""
            return x.reshape(x.shape[0], replicas, x.shape[1] // replicas, *x.shape[2:]).swapaxes(0, 1)

        inside = tuple((name, _without(axes, "data")) for name, axes in nn.get_logical_axis_rules())
        with nn.logical_axis_rules(inside):
            per_replica = jax.vmap(lambda rows: fn(shared, rows), spmd_axis_name="data")
            outputs = per_replica(jax.tree.map(by_replica, batch))
        return jax.tree.map(lambda x: x.sum(0), outputs)

    return run


def _without(axes: str | tuple[str, ...] | None, axis: str) -> str | tuple[str, ...] | None:
    """A rules row's mesh axes with `axis` taken out (None when nothing is left)."""
    kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a != axis)
    return kept[0] if len(kept) == 1 else (kept or None)


@dataclasses.dataclass(frozen=True)
class ShardedStep:
    """A jitted train step that runs (and lowers) under the mesh and the logical rules."""

    jitted: Callable
    mesh: Mesh
    rules: tuple

    def __call__(self, state, batch):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted(state, batch)

    def lower(self, state, batch):
        """Lower against arrays or ShapeDtypeStructs (nothing allocated) for AOT compilation."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted.lower(state, batch)


def jit_train_step(
    cfg: ml_collections.ConfigDict, mesh: Mesh, step_fn: Callable, state_shapes
) -> ShardedStep:
    """jax.jit(step_fn) with state and batch placed by the rules, metrics replicated, the state donated.

    Checks before compiling that every parameter divides its mesh axes (a microbatch that does not split
    over the batch shards is padded by the caller: `padded_microbatch`).
    """
    state = _carried_shardings(cfg, mesh, state_shapes)
    jitted = jax.jit(
        step_fn,
        in_shardings=(state, batch_sharding(mesh)),
        out_shardings=(state, replicated(mesh)),
        donate_argnums=0,
    )
    return ShardedStep(jitted, mesh, rules(cfg.mesh))


def init_sharded_state(
    cfg: ml_collections.ConfigDict, mesh: Mesh, init_fn: Callable, rng: jax.Array, target=None
):
    """init_fn(cfg, rng) run under jit straight into its shardings (no full copy on one device).

    target: the state's `sharded_shapes` when the caller has them. Runs without the logical rules: flax's
    DenseGeneral constrains its kernel before reshaping it at init.
    """
    shapes = target if target is not None else jax.eval_shape(lambda: init_fn(cfg, rng))
    out = _carried_shardings(cfg, mesh, shapes)
    return jax.jit(lambda key: init_fn(cfg, key), out_shardings=out)(rng)
