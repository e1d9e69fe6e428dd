"""Device meshes and where every array lives on them.

The mesh has three axes: `data` (replicas), `fsdp` (parameters, gradients and
optimizer state sharded, batch split) and `tensor` (Megatron-style: attention
heads and MLP columns split). Parameters carry logical axis names (`embed`,
`mlp`, `heads`, `kv`, `vocab`; see `models/layers.py`) and activations are
constrained by name too (`batch`, `length`, ...); `config.mesh.rules` maps
names to mesh axes, on top of `DEFAULT_RULES`. A mesh axis is used at most once
per array (first dimension wins), and a dimension that the mapped axes do not
divide stays whole, so every model runs on every mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxft.errors import UserError

AXES = ("data", "fsdp", "tensor")
Rules = dict[str, tuple[str, ...]]

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("length", None),
)


def mesh_shape(config: ml_collections.ConfigDict, device_count: int) -> dict[str, int]:
  """{axis: size} from config.mesh, with one -1 filled by the remaining devices.

  Raises:
    UserError: more than one -1, a size < 1, or a product that is not the
      device count.
  """
  sizes = {a: int(config.mesh[a]) for a in AXES}
  free = [a for a, n in sizes.items() if n == -1]
  if len(free) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
    raise UserError(f"config.mesh {sizes}: sizes must be >= 1, at most one may be -1")
  fixed = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if device_count % fixed:
      raise UserError(f"config.mesh {sizes}: {fixed} does not divide the device count "
                      f"({device_count})")
    sizes[free[0]] = device_count // fixed
  if math.prod(sizes.values()) != device_count:
    raise UserError(f"config.mesh {sizes} needs {math.prod(sizes.values())} devices; "
                    f"there are {device_count} (use -1 on one axis to fill)")
  return sizes


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """The mesh over `devices` (default: every device of every process).

  On several TPU slices (devices with distinct `slice_index`), the data axis
  spans the slices, so only data-parallel gradient reductions cross the
  slower data-center network; fsdp and tensor stay inside a slice's ICI.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(config, len(devices))
  # Auto axes: XLA propagates shardings from the annotated params and batch.
  axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
  slices = 1 + max(getattr(d, "slice_index", 0) or 0 for d in devices)
  if slices == 1:
    shape = tuple(sizes[a] for a in AXES)
    try:
      return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
      # A shape that no subset of a TPU torus's axes makes (32 x 2 on 4x4x4):
      # split a physical axis between two mesh axes.
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      return Mesh(grid, AXES, axis_types=axis_types)
  if sizes["data"] % slices:
    raise UserError(f"config.mesh {sizes} on {slices} slices: data must be a multiple of "
                    f"{slices} (data parallel over the data-center network), e.g. "
                    f"--config.mesh.data={slices}")
  ici = (sizes["data"] // slices, sizes["fsdp"], sizes["tensor"])
  grid = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)
  return Mesh(grid, AXES, axis_types=axis_types)


def logical_rules(config: ml_collections.ConfigDict) -> Rules:
  """DEFAULT_RULES updated by config.mesh.rules ((logical name, mesh axes) pairs)."""
  rules = {}
  for where, pairs in (("default", DEFAULT_RULES), ("config.mesh.rules", config.mesh.rules)):
    for pair in pairs:
      if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str):
        raise UserError(f"{where}: entries are (logical name, mesh axis or axes), got {pair!r}")
      axes = () if pair[1] is None else (pair[1],) if isinstance(pair[1], str) else tuple(pair[1])
      unknown = [a for a in axes if a not in AXES]
      if unknown:
        raise UserError(f"{where}: {pair!r} names mesh axis {unknown[0]!r}; axes are {AXES}")
      rules[pair[0]] = axes
  return rules


@dataclasses.dataclass
class Placement:
  """Where a run's arrays live: the mesh, the logical rules and the shardings.

  Attributes:
    mesh: the device mesh of config.mesh.
    rules: logical axis name -> mesh axes.
    state: shardings of the train state (same structure).
    batch: sharding of every batch array (rows split over data x fsdp).
  """
  mesh: Mesh
  rules: Rules
  state: Any
  batch: NamedSharding

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def traced_under_rules(self, fn):
    """`fn` with the activation constraints active while jit traces it."""
    def wrapped(*args, **kwargs):
      with activation_rules(self.mesh, self.rules):
        return fn(*args, **kwargs)
    return wrapped


def placement(mesh: Mesh, rules: Rules, abstract_state: Any) -> Placement:
  """The Placement of a train state (abstract arrays) on `mesh` under `rules`."""
  return Placement(mesh, rules, tree_shardings(abstract_state, mesh, rules),
                   batch_sharding(mesh, rules))


def check_fits(mesh: Mesh, *, batch_size: int, grad_accum: int, eval_batch_size: int | None,
               num_heads: int | None) -> None:
  """Raises UserError when batches (config.train's sizes) or heads do not split over the mesh.

  `eval_batch_size` None: only the train step matters (inspect, plan). `num_heads`
  None: the model has no attention (a ConvNet).
  """
  split = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = batch_size // grad_accum
  if micro % split:
    raise UserError(f"config.train.batch_size={batch_size} / grad_accum={grad_accum} = "
                    f"{micro} rows per micro-batch do not split over data x fsdp = {split} "
                    f"devices: use a batch_size that is a multiple of {split * grad_accum}, "
                    "or tensor parallelism (config.mesh.tensor) for fewer rows")
  if eval_batch_size is not None and eval_batch_size % split:
    raise UserError(f"config.train.eval_batch_size={eval_batch_size} does not split over "
                    f"data x fsdp = {split} devices")
  if num_heads is not None and num_heads % mesh.shape["tensor"]:
    raise UserError(f"the model's {num_heads} attention heads do not split over "
                    f"config.mesh.tensor={mesh.shape['tensor']}")


def spec(axes: Sequence[str | tuple[str, ...] | None], shape: Sequence[int], mesh: Mesh,
         rules: Rules) -> PartitionSpec:
  """The PartitionSpec of an array whose dimensions have these logical names.

  A dimension named by a tuple of logical names splits over the mesh axes of
  all of them that are still free (a LoRA `lora_b`'s output columns: the
  base layer's output axis, and `embed`'s fsdp, which its rank cannot take).
  """
  used, out = set(), []
  for name, dim in zip(axes, shape):
    names = name if isinstance(name, tuple) else (name,)
    mesh_axes = dict.fromkeys(a for n in names for a in rules.get(n, ()))
    chosen = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
    if not chosen or dim % math.prod(mesh.shape[a] for a in chosen):
      out.append(None)
      continue
    used.update(chosen)
    out.append(chosen if len(chosen) > 1 else chosen[0])
  return PartitionSpec(*out)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _leaf_sharding(x: Any, mesh: Mesh, rules: Rules) -> Any:
  if _is_variable(x):
    value = x.get_value()
    if not hasattr(value, "shape"):  # optax's MaskedNode: a param another group owns.
      return x
    axes = x.get_metadata().get("logical_axes") or (None,) * len(value.shape)
    return x.replace(NamedSharding(mesh, spec(axes, value.shape, mesh, rules)))
  return NamedSharding(mesh, PartitionSpec())


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """Shardings for a state tree: nnx Variables by their logical axes (so the
  optimizer's moments, which keep their params' metadata, follow the params);
  any other leaf (step counters) replicated. Same structure as `tree`."""
  return jax.tree.map(lambda x: _leaf_sharding(x, mesh, rules), tree, is_leaf=_is_variable)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """Abstract arrays carrying their target shardings (for Orbax restore)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Rows over the axes `batch` maps to; everything else whole."""
  return NamedSharding(mesh, PartitionSpec(rules.get("batch") or None))


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A host batch as global arrays; each process copies only rows its devices hold.

  `batch` may be lazy in rows: any mapping whose values support `v[rows]`.
  """
  def put(v: Any) -> jax.Array:
    shape = tuple(v.shape)
    return jax.make_array_from_callback(shape, sharding, lambda index: np.asarray(v[index]))
  return {k: put(v) for k, v in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """The whole value of a (possibly multi-process) array on every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def bytes_per_device(tree: Any) -> int:
  """Bytes of `tree`'s arrays (or abstract arrays with shardings) on the fullest device."""
  per_device: dict[Any, int] = {}
  for x in jax.tree.leaves(tree):
    sharding = x.sharding
    shard = sharding.shard_shape(x.shape)
    nbytes = int(np.prod(shard)) * np.dtype(x.dtype).itemsize
    for device in sharding.device_set:
      per_device[device] = per_device.get(device, 0) + nbytes
  return max(per_device.values(), default=0)


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("jaxft_sharding", default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """While tracing inside this context, `constrain` pins activations to the mesh."""
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[Mesh, Rules] | None:
  """The (mesh, rules) of the `activation_rules` being traced inside, else None."""
  return _ACTIVE.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Constrains an activation by logical names; a no-op outside `activation_rules`."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(axes, x.shape, mesh, rules)))


def logical_size(name: str) -> int:
  """Devices the active rules split logical axis `name` over (1 outside `activation_rules`)."""
  active = _ACTIVE.get()
  if active is None:
    return 1
  mesh, rules = active
  return math.prod(mesh.shape[a] for a in rules.get(name, ()))
