"""The optax optimizer: per-rule groups of AdamW (or SGD), warmup + decay, clipping."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import optax

from jaxft.tuning import param_paths
from jaxft.tuning import rules as rules_lib
from jaxft.models import stack


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A run's learning-rate schedule: peak `lr`, decay `kind` (config.SCHEDULES),
  `warmup` steps and `total` steps."""
  lr: float
  kind: str
  warmup: int
  total: int

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> Schedule:
    """config.optim's schedule over config.train.num_steps (warmup_steps, else warmup_frac)."""
    o, total = config.optim, config.train.num_steps
    return cls(o.lr, o.schedule, o.warmup_steps or int(o.warmup_frac * total), total)


def schedule(spec: Schedule, rule: rules_lib.Rule | None = None) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then linear / cosine decay to 0, or constant.

  The peak is `spec.lr`; a `rule` multiplies it and may replace the decay
  kind, the warmup, and hold the rate at zero before its `start_step`.
  """
  lr, total = spec.lr, spec.total
  rule = rule or rules_lib.Rule(".*", True)
  kind = rule.schedule or spec.kind
  warmup = spec.warmup if rule.warmup_steps is None else rule.warmup_steps
  start = min(rule.start_step, total)
  decay_steps = max(total - start - warmup, 1)
  after = {
      "linear": optax.linear_schedule(lr, 0.0, decay_steps),
      "cosine": optax.cosine_decay_schedule(lr, decay_steps),
      "constant": optax.constant_schedule(lr),
  }[kind]
  pieces, bounds = [after], []
  if warmup:
    pieces, bounds = [optax.linear_schedule(0.0, lr, warmup), after], [warmup]
  if start:
    pieces, bounds = [optax.constant_schedule(0.0), *pieces], [start] + [start + b for b in bounds]
  base = pieces[0] if len(pieces) == 1 else optax.join_schedules(pieces, bounds)
  if rule.lr_mult == 1.0:
    return base
  # Scaling the base rate (not the peak) keeps a 0.5 multiplier an exact half.
  return lambda count: rule.lr_mult * base(count)


def _transform(config: ml_collections.ConfigDict, lr: optax.Schedule,
               weight_decay: float) -> optax.GradientTransformation:
  o = config.optim
  if o.optimizer == "adamw":
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=weight_decay)
  sgd = optax.sgd(lr, momentum=o.momentum or None)
  return optax.chain(optax.add_decayed_weights(weight_decay), sgd) if weight_decay else sgd


def labels(params: Any, assignment: rules_lib.Assignment) -> Any:
  """Each param's optimizer group: its rule's index, split by whether it decays."""
  def label(path: str) -> str:
    return f"{assignment.of[stack.layer_path(path)]}" + ("" if rules_lib.decays(path) else "/nodecay")
  return jax.tree.map(label, param_paths.tree_paths(params))


def build(config: ml_collections.ConfigDict, params: Any,
          assignment: rules_lib.Assignment | None = None) -> optax.GradientTransformation:
  """The optimizer over the trainable `params`: one group per rule, one clip.

  Args:
    config: the run's config (`optim.*`, `train.num_steps`).
    params: the trainable parameter tree (frozen ones are not in it).
    assignment: each param's rule; None trains every param alike.
  """
  o = config.optim
  if assignment is None:
    paths = jax.tree.leaves(param_paths.tree_paths(params))
    assignment = rules_lib.Assignment([rules_lib.Rule(".*", True)], dict.fromkeys(paths, 0))
  # Sorted: set order follows the per-process string hash, and a program that
  # changed with it would miss the compilation cache on every other run.
  groups = sorted(set(jax.tree.leaves(labels(params, assignment))))
  transforms = {}
  for group in groups:
    rule = assignment.rules[int(group.split("/")[0])]
    decay = 0.0 if group.endswith("/nodecay") else (
        o.weight_decay if rule.weight_decay is None else rule.weight_decay)
    transforms[group] = _transform(config, schedule(Schedule.of(config), rule), decay)
  tx = optax.multi_transform(transforms, labels(params, assignment))
  if o.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
  return tx
