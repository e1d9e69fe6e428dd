"""The optax optimizer: AdamW, warmup + decay schedule, clipping, decay mask."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from jaxft import params as params_lib



def decays(path: str) -> bool:
  """HF's convention: weight decay on everything but biases and norm parameters."""
  *modules, name = path.split("/")
  return name != "bias" and not any("norm" in m.lower() for m in modules)


def decay_mask(params: Any) -> Any:
  """True where AdamW weight decay applies."""
  return jax.tree.map(decays, params_lib.tree_paths(params))


def warmup_steps(config: ml_collections.ConfigDict) -> int:
  o = config.optim
  return o.warmup_steps or int(o.warmup_frac * config.train.num_steps)


def schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `optim.lr`, then linear / cosine decay to 0, or constant."""
  o, total = config.optim, config.train.num_steps
  warmup = warmup_steps(config)
  decay_steps = max(total - warmup, 1)
  after = {
      "linear": optax.linear_schedule(o.lr, 0.0, decay_steps),
      "cosine": optax.cosine_decay_schedule(o.lr, decay_steps),
      "constant": optax.constant_schedule(o.lr),
  }[o.schedule]
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), after], [warmup])


def build(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
  """AdamW with the config's schedule and clipping; `params` gives the decay mask."""
  o = config.optim
  adamw = optax.adamw(schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay, mask=decay_mask(params))
  if o.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
  return adamw
