"""How a model family's parameters are named in Hugging Face checkpoints.

Our parameter paths mirror the transformers module names with `/` for `.`;
our layouts differ from PyTorch's in known ways (Linear kernels are stored
(in, out), so transposed; LayerNorm says `scale`). A `CheckpointLayout` holds
the rules that translate between the two, per checkpoint format, plus the
family's base-model prefix and head modules: the one table loading and export
both read.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np


Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
  """A pair of inverse array maps between checkpoint and jaxft layouts.

  Attributes:
    to_ours: checkpoint layout -> ours.
    to_theirs: ours -> checkpoint layout.
    axes: when `to_ours` only permutes axes (`np.transpose(a, axes(a.ndim))`),
      that permutation by rank; then a slice of our param is `to_ours` of a
      slice of the checkpoint tensor, and loading reads only the slice. None
      for any other map: loading reads the whole tensor.
  """
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_theirs: Callable[[np.ndarray], np.ndarray]
  axes: Callable[[int], tuple[int, ...]] | None = None

  def our_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape `to_ours` gives a checkpoint tensor of `shape`; None if not a permutation."""
    if self.axes is None:
      return None
    return tuple(shape[a] for a in self.axes(len(shape)))

  def their_index(self, index: Index) -> Index | None:
    """The slice of the checkpoint tensor whose `to_ours` is `ours[index]`.

    `index` has one slice per dimension of our param, as
    `jax.make_array_from_callback` passes it; None if not a permutation.
    """
    if self.axes is None:
      return None
    theirs: list[slice] = [slice(None)] * len(index)
    for ours_dim, their_dim in enumerate(self.axes(len(index))):
      theirs[their_dim] = index[ours_dim]
    return tuple(theirs)


IDENTITY = Transform(to_ours=lambda a: a, to_theirs=lambda a: a,
                     axes=lambda ndim: tuple(range(ndim)))
TRANSPOSE = Transform(to_ours=lambda a: np.transpose(a),
                      to_theirs=lambda a: np.transpose(a),
                      axes=lambda ndim: tuple(reversed(range(ndim))))

# A conv kernel: PyTorch OIHW <-> our HWIO (the generic TRANSPOSE would swap
# height and width). A permutation, so sharded loads read only their slice.
CONV_HWIO = Transform(to_ours=lambda a: np.transpose(a, (2, 3, 1, 0)),
                      to_theirs=lambda a: np.transpose(a, (3, 2, 0, 1)),
                      axes=lambda ndim: (2, 3, 1, 0))


@dataclasses.dataclass(frozen=True)
class NameRule:
  """Our param path regex -> checkpoint key template (re.expand syntax).

  Expanded templates have `/` replaced by `.`, so a group captured from our
  path becomes a dotted module name.
  """
  ours: str
  theirs: str
  transform: Transform = IDENTITY

  def key_for(self, path: str) -> str | None:
    match = re.fullmatch(self.ours, path)
    return match.expand(self.theirs).replace("/", ".") if match else None


# PyTorch module names == our paths, modulo leaf names and kernel orientation.
# Only LayerNorm has a `scale`, so leaf names alone decide. Order matters: the
# first matching rule is the canonical (export) name; later ones are
# alternatives accepted on import.
TORCH_RULES: tuple[NameRule, ...] = (
    NameRule(r"(.*)/scale", r"\1/weight"),
    NameRule(r"(.*)/kernel", r"\1/weight", TRANSPOSE),
    NameRule(r"(.*)/embedding", r"\1/weight"),
    NameRule(r"(.*)/bias", r"\1/bias"),
    # LayerNorm names of TF-era checkpoints.
    NameRule(r"(.*)/scale", r"\1/gamma"),
    NameRule(r"(.*)/bias", r"\1/beta"),
)

# BatchNorm running statistics (`nnx.BatchStat`s of `layers.BatchNorm`) <->
# torch's BatchNorm buffers; its `scale` and `bias` follow TORCH_RULES.
BATCH_NORM_RULES: tuple[NameRule, ...] = (
    NameRule(r"(.*)/mean", r"\1/running_mean"),
    NameRule(r"(.*)/var", r"\1/running_var"),
    NameRule(r"(.*)/count", r"\1/num_batches_tracked"),
)

# transformers' old Flax checkpoints (flax_model.msgpack) used our exact layout.
FLAX_RULES: tuple[NameRule, ...] = (NameRule(r"(.*)", r"\1"),)


@dataclasses.dataclass(frozen=True)
class CheckpointLayout:
  """How one model family's params are named in HF checkpoints.

  Attributes:
    prefix: base-model prefix in HF task checkpoints (`bert`); params outside
      `head_modules` are written as `prefix.<name>` and read with or without it.
    head_modules: top-level modules of the task head, never prefixed.
    rules: per checkpoint format ("torch" for safetensors / .bin, "flax" for
      msgpack), candidate names for each param, canonical first.
  """
  prefix: str
  head_modules: tuple[str, ...]
  rules: dict[str, tuple[NameRule, ...]] = dataclasses.field(
      default_factory=lambda: {"torch": TORCH_RULES, "flax": FLAX_RULES})

  def _prefixed(self, path: str) -> bool:
    return bool(self.prefix) and path.split("/", 1)[0] not in self.head_modules

  def candidates(self, path: str, fmt: str) -> list[tuple[str, Transform]]:
    """Checkpoint keys that may hold our param `path`, most preferred first."""
    out = []
    for rule in self.rules[fmt]:
      key = rule.key_for(path)
      if key is None:
        continue
      names = [f"{self.prefix}.{key}", key] if self._prefixed(path) else [key]
      out.extend((name, rule.transform) for name in names
                 if name not in {n for n, _ in out})
    return out

  def export_name(self, path: str) -> tuple[str, Transform]:
    """The PyTorch key (with prefix) and transform that export writes."""
    for rule in self.rules["torch"]:
      key = rule.key_for(path)
      if key is not None:
        return (f"{self.prefix}.{key}" if self._prefixed(path) else key,
                rule.transform)
    raise KeyError(f"No checkpoint name rule matches param {path!r}.")
