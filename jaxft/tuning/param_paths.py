"""Parameter paths: the one naming that checkpoint tables and optimizer rules share.

A path mirrors the HF module names with `/` for `.`, e.g.
`encoder/layer/3/attention/self/query/kernel`.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx


def path_str(keypath: tuple) -> str:
  """`encoder/layer/3/attention/self/query/kernel` from a jax tree key path.

  The `.value` attribute that nnx Variables add as the last key is dropped.
  """
  parts = []
  for k in keypath:
    if isinstance(k, jax.tree_util.GetAttrKey):
      if k.name != "value":
        parts.append(k.name)
    elif isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def tree_paths(tree: Any) -> Any:
  """A tree of the same structure whose leaves are their own path strings."""
  return jax.tree_util.tree_map_with_path(lambda kp, _: path_str(kp), tree)


def named_variables(state: nnx.State) -> list[tuple[str, nnx.Variable]]:
  """[(path, Variable)] of an nnx State, in a fixed (sorted-key) order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return [(path_str(kp), var) for kp, var in leaves]
