"""Running a stack of identical blocks: a plain loop, `lax.scan`, and remat.

Every model family runs its layers through `run`, so two execution switches
apply to all of them without changing the model's parameter paths (rules,
LoRA targets and exports keep seeing `encoder/layer/3/...`):

- `scan`: the block body is traced and compiled once over the blocks'
  stacked parameters, so compile time stays flat in depth. The backward pass
  then runs through every block (also frozen bottom ones), so it trades some
  step time for compile time: worth it for deep models, not for MiniLM.
- `remat`: each block is wrapped in `jax.checkpoint`; its activations are
  recomputed in the backward pass instead of stored. `full` keeps only the
  block inputs, `dots` also keeps the outputs of the weight matmuls (not the
  attention scores), trading less recompute for more memory. Rematerialised
  blocks always run under `lax.scan` (stacking unstacked weights on the fly):
  in an unrolled loop XLA schedules the recomputation back into the forward
  pass and keeps the activations after all (MiniLM at 64 x 128: temporaries
  -5% looped, -70% scanned).

A model holds its choice in a `Options` attribute on the module that owns
the stack; `configure` sets it on every such module of a built model.

With scan, the train state also keeps the layers' parameters stacked
(`stack_state`: `encoder/layer/stacked/...kernel` of shape [layers, ...]
instead of one array per layer), so the optimizer update and the gradient
are one op per parameter kind rather than per layer: without that, compile
time still grows with depth. `unstack_state` is the exact inverse; the model
is always merged from unstacked states, and XLA folds the slice-then-stack
back into the stored array.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

# Keyed by config.REMAT.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class Options:
  """How a stack of blocks runs (static: part of the model's graph definition).

  Attributes:
    scan: one `lax.scan` over the blocks instead of a Python loop.
    remat: a key of REMAT_POLICIES.
  """
  scan: bool = False
  remat: str = "none"

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")


# A block's call on the running hidden state: (block, x, rngs) -> x.
BlockCall = Callable[[nnx.Module, Array, "nnx.Rngs | None"], Array]


def configure(model: nnx.Module, options: Options) -> nnx.Module:
  """Sets `options` on every module of `model` that runs a stack (in place)."""
  for _, module in nnx.iter_modules(model):
    if isinstance(getattr(module, "stack_options", None), Options):
      module.stack_options = options
  return model


def run(blocks: Sequence[nnx.Module], x: Array, call: BlockCall, *, options: Options,
        rngs: nnx.Rngs | None) -> Array:
  """`x` through every block in order, looped or scanned, with or without remat."""
  if not blocks:
    return x
  if not options.scan and options.remat == "none":
    for block in blocks:
      x = call(block, x, rngs)
    return x
  splits = [nnx.split(block) for block in blocks]
  # One dropout key per block: NNX's RNG counter cannot advance inside scan/remat.
  keys = None if rngs is None else jax.random.split(rngs.dropout(), len(blocks))

  def functional(graphdef: nnx.GraphDef, scanned: bool
                 ) -> Callable[[nnx.State, Array, Array | None], Array]:
    def body(state, h, key):
      return call(nnx.merge(graphdef, state), h, None if key is None else nnx.Rngs(dropout=key))
    if options.remat == "none":
      return body
    return jax.checkpoint(body, policy=REMAT_POLICIES[options.remat], prevent_cse=not scanned)

  graphdefs = [g for g, _ in splits]
  if all(g == graphdefs[0] for g in graphdefs[1:]):
    body = functional(graphdefs[0], scanned=True)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[s for _, s in splits])

    def step(h, xs):
      state, key = xs
      return body(state, h, key), None

    x, _ = jax.lax.scan(step, x, (stacked, keys))
    return x
  # Blocks that differ in structure (e.g. adapters on some only) cannot be stacked.
  for i, (graphdef, state) in enumerate(splits):
    x = functional(graphdef, scanned=False)(state, x, None if keys is None else keys[i])
  return x


# The key that replaces the layer index in a stacked state's paths.
STACKED = "stacked"


def layer_lists(model: nnx.Module) -> list[tuple[tuple, nnx.List]]:
  """(path, list) of each layer list that `run` executes (e.g. ('encoder', 'layer'))."""
  found = []
  for path, module in nnx.iter_modules(model):
    if isinstance(getattr(module, "stack_options", None), Options):
      found += [(tuple(path) + (name,), value) for name, value in vars(module).items()
                if isinstance(value, nnx.List)]
  return found


def containers(model: nnx.Module) -> list[tuple]:
  """Paths of the layer lists that `run` executes (e.g. ('encoder', 'layer'))."""
  return [path for path, _ in layer_lists(model)]


def _stacked_value(values: list[Any]) -> Any:
  first = values[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(values),) + first.shape, first.dtype)
  return jnp.stack(values)


def _with_value(var: nnx.Variable, value: Any, axes: tuple | None) -> nnx.Variable:
  var = var.replace(value)
  if axes is not None:
    var.set_metadata("logical_axes", axes)
  return var


def stack_state(state: nnx.State, paths: Sequence[tuple],
                group_of: Callable[[tuple], Any] = lambda path: None) -> nnx.State:
  """`state` with each layer list in `paths` stored stacked, where that is possible.

  A list is stacked only if the state holds the same leaves for layers
  0..n-1, with equal shapes and dtypes and equal `group_of(path)` (the
  optimizer rule: one array gets one rule); otherwise it stays as it is.
  """
  flat = list(nnx.to_flat_state(state))
  for prefix in paths:
    n = len(prefix)
    members = [(p, v) for p, v in flat if p[:n] == prefix and len(p) > n and isinstance(p[n], int)]
    groups: dict[tuple, dict[int, tuple]] = {}
    for p, v in members:
      groups.setdefault(p[n + 1:], {})[p[n]] = (p, v)
    count = len({p[n] for p, _ in members})
    if count < 2 or not all(_stackable(g, count, group_of) for g in groups.values()):
      continue
    flat = [(p, v) for p, v in flat if not (p[:n] == prefix and len(p) > n
                                            and isinstance(p[n], int))]
    for suffix, group in groups.items():
      variables = [group[i][1] for i in range(count)]
      axes = variables[0].get_metadata().get("logical_axes")
      value = _stacked_value([v.get_value() for v in variables])
      flat.append((prefix + (STACKED,) + suffix,
                   _with_value(variables[0], value, None if axes is None else (None,) + axes)))
  return nnx.from_flat_state(flat)


def _stackable(group: dict[int, tuple], count: int, group_of: Callable[[tuple], Any]) -> bool:
  if sorted(group) != list(range(count)):
    return False
  values = [group[i][1].get_value() for i in range(count)]
  return (len({(v.shape, v.dtype) for v in values}) == 1
          and len({group_of(group[i][0]) for i in range(count)}) == 1)


def unstack_state(state: nnx.State) -> nnx.State:
  """The inverse of `stack_state` (a state without stacked lists comes back as is)."""
  flat = list(nnx.to_flat_state(state))
  if not any(STACKED in p for p, _ in flat):
    return state
  out = []
  for path, var in flat:
    if STACKED not in path:
      out.append((path, var))
      continue
    at = path.index(STACKED)
    value = var.get_value()
    axes = var.get_metadata().get("logical_axes")
    for i in range(value.shape[0]):
      out.append((path[:at] + (i,) + path[at + 1:],
                  _with_value(var, value[i], None if axes is None else tuple(axes[1:]))))
  return nnx.from_flat_state(out)


def layer_path(path: str) -> str:
  """The path of layer 0's leaf for a stacked path string (`.../stacked/...`)."""
  return path.replace(f"/{STACKED}/", "/0/")
