"""Per-parameter optimizer rules: which parameters train, and how fast.

`config.optim.rules` is an ordered list of `(regex, value)` pairs. Each regex
must match a parameter path in full; paths are the HF module names with `/`
for `.` (`encoder/layer/3/attention/self/query/kernel`,
`embeddings/word_embeddings/embedding`, `classifier/kernel`; `jaxft inspect
--params` lists them). The first matching rule decides; `value` is

  None                      frozen: no gradient, no optimizer state, no update
  0.5                       trainable, learning rate x 0.5
  dict(lr_mult=..., weight_decay=..., schedule=..., warmup_steps=...,
       start_step=...)      trainable with its own settings

`start_step` keeps the learning rate at zero until that step and starts the
group's warmup there (gradual unfreezing, ULMFiT-style). A parameter that no
rule matches, and a user rule that matches nothing, are errors.

LoRA and `optim.layer_decay` are expressed as generated rules in the same
list: LoRA's go first (adapters train, their base kernels freeze), layer
decay's after the user's, and with no user rules a default tail trains
everything (or, with LoRA, only the adapters and the classification head).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import ml_collections

from jaxft import config as config_lib
from jaxft.tuning import lora
from jaxft.errors import UserError


@dataclasses.dataclass(frozen=True)
class Rule:
  """One resolved rule.

  Attributes:
    pattern: regex matched in full against parameter paths.
    trainable: False for frozen parameters.
    lr_mult: learning-rate multiplier.
    weight_decay: AdamW decay (biases and norms never decay); None: optim's.
    schedule: decay after warmup; None: optim's.
    warmup_steps: None: optim's warmup.
    start_step: learning rate is zero before this step.
    origin: where the rule came from, e.g. `optim.rules[2]`, `lora`.
    required: whether matching nothing is an error (true for user rules).
  """
  pattern: str
  trainable: bool
  lr_mult: float = 1.0
  weight_decay: float | None = None
  schedule: str | None = None
  warmup_steps: int | None = None
  start_step: int = 0
  origin: str = "default"
  required: bool = False

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.pattern, path) is not None


def user_rules(config: ml_collections.ConfigDict) -> list[Rule]:
  """`config.optim.rules`, checked (config.rule_entries); UserError names the bad entry."""
  return [Rule(pattern, origin=where, required=True, **fields)
          for pattern, fields, where in config_lib.rule_entries(config.optim.rules)]


def _layer_index(path: str) -> tuple[str, int] | None:
  """('encoder/layer', 3) for `encoder/layer/3/...`: the stack and the index."""
  m = re.match(r"(.*?)/(\d+)/", path)
  return (m.group(1), int(m.group(2))) if m else None


def layer_decay_rules(paths: Sequence[str], decay: float) -> list[Rule]:
  """Layer i of L gets decay^(L-i), embeddings decay^(L+1), the rest (head) 1.

  Raises:
    UserError: the model has no single stack of numbered layers.
  """
  stacks = {s for s in map(_layer_index, paths) if s is not None}
  names = {name for name, _ in stacks}
  if len(names) != 1:
    raise UserError("config.optim.layer_decay needs one stack of numbered layers; "
                    f"this model has {sorted(names) or 'none'}")
  stack = names.pop()
  depth = 1 + max(i for _, i in stacks)
  origin = "optim.layer_decay"
  rules = [Rule(rf"{re.escape(stack)}/{i}/.*", True, decay ** (depth - i), origin=origin)
           for i in reversed(range(depth))]
  embeds = sorted({m.group(0) for p in paths if (m := re.match(r"(?:[^/]*/)*?embed[^/]*", p))
                   and _layer_index(p) is None})
  rules += [Rule(rf"{re.escape(e)}/.*", True, decay ** (depth + 1), origin=origin)
            for e in embeds]
  return rules + [Rule(".*", True, 1.0, origin=origin)]


def all_rules(config: ml_collections.ConfigDict, paths: Sequence[str],
              head_modules: Sequence[str]) -> list[Rule]:
  """The full ordered rule list for a model with these param paths."""
  rules = []
  if config_lib.lora_enabled(config):
    rules += [Rule(lora.ADAPTER_PATH, True, origin="lora"),
              Rule(lora.target_pattern(config.lora.targets), False, origin="lora")]
  given = user_rules(config)
  rules += given
  if config.optim.layer_decay:
    if config_lib.lora_enabled(config):
      raise UserError("config.optim.layer_decay and config.lora cannot be combined; "
                      "give LoRA runs per-layer rates with config.optim.rules")
    rules += layer_decay_rules(paths, config.optim.layer_decay)
  if not given:
    if config_lib.lora_enabled(config):
      if head_modules:  # A fresh head must learn; a language model's head stays as it was.
        heads = "|".join(map(re.escape, head_modules))
        rules.append(Rule(rf"(?:{heads})/.*", True, origin="default (lora: head)"))
      rules.append(Rule(".*", False, origin="default (lora: base)"))
    else:
      rules.append(Rule(".*", True))
  return rules


@dataclasses.dataclass(frozen=True)
class Assignment:
  """Each parameter path's rule (index into `rules`)."""
  rules: list[Rule]
  of: dict[str, int]

  def rule(self, path: str) -> Rule:
    return self.rules[self.of[path]]

  def trainable(self) -> set[str]:
    return {p for p in self.of if self.rule(p).trainable}


def assign(rules: list[Rule], paths: Sequence[str]) -> Assignment:
  """First match wins.

  Raises:
    UserError: a path matches no rule, a user rule matches no path, or layer
      decay is shadowed entirely by the user's rules.
  """
  of = {}
  for path in paths:
    index = next((i for i, r in enumerate(rules) if r.matches(path)), None)
    if index is None:
      raise UserError(f"parameter {path!r} matches no rule in config.optim.rules; "
                      "add one (e.g. ('.*', 1.0) last to train the rest)")
    of[path] = index
  used = set(of.values())
  for i, rule in enumerate(rules):
    if rule.required and i not in used:
      hint = _near_miss(rule, rules[:i], paths)
      raise UserError(f"config.{rule.origin}={rule.pattern!r} matches no parameter{hint}; "
                      f"paths look like {paths[0]!r} (see jaxft inspect --params)")
  decay = [i for i, r in enumerate(rules) if r.origin == "optim.layer_decay"]
  if decay and not used & set(decay):
    raise UserError("config.optim.layer_decay has no effect: earlier rules match every parameter")
  return Assignment(rules, of)


def _near_miss(rule: Rule, earlier: list[Rule], paths: Sequence[str]) -> str:
  """Why a rule matched nothing: shadowed by an earlier rule, or a typo."""
  hits = [p for p in paths if rule.matches(p)]
  if hits:
    first = next(r for r in earlier if r.matches(hits[0]))
    return f" not already taken by {first.origin}={first.pattern!r} (first match wins)"
  return ""


def decays(path: str) -> bool:
  """HF's convention: weight decay on everything but biases and norm parameters."""
  *modules, name = path.split("/")
  return name != "bias" and not any("norm" in m.lower() for m in modules)


def _describe(rule: Rule, default_decay: float, path: str | None = None) -> tuple[str, str]:
  if not rule.trainable:
    return "frozen", "-"
  decay = default_decay if rule.weight_decay is None else rule.weight_decay
  if path is not None and not decays(path):
    decay = 0.0
  return f"{rule.lr_mult:.4g}", f"{decay:g}"


def table(assignment: Assignment, sizes: dict[str, int], default_decay: float) -> str:
  """One line per rule: origin, pattern, params, trainable params, lr multiplier, decay.

  Rules that match nothing (shadowed generated rules) are left out; weight
  decay never applies to biases and norm parameters, whatever the rule says.
  """
  rows = [("rule", "pattern", "params", "trainable", "lr_mult", "weight_decay")]
  for i, rule in enumerate(assignment.rules):
    count = sum(n for p, n in sizes.items() if assignment.of[p] == i)
    if not any(assignment.of[p] == i for p in sizes):
      continue
    rows.append((rule.origin, rule.pattern, f"{count:,}", f"{count if rule.trainable else 0:,}",
                 *_describe(rule, default_decay)))
  total = sum(sizes.values())
  trained = sum(n for p, n in sizes.items() if assignment.rule(p).trainable)
  rows.append(("total", "", f"{total:,}", f"{trained:,}", "", ""))
  return _format(rows, right={2, 3, 4, 5})


def listing(assignment: Assignment, shapes: dict[str, tuple], default_decay: float) -> str:
  """One line per parameter: path, shape, rule, lr multiplier, weight decay."""
  rows = [("param", "shape", "rule", "lr_mult", "weight_decay")]
  for path, shape in shapes.items():
    rule = assignment.rule(path)
    rows.append((path, "x".join(map(str, shape)) or "scalar", rule.origin,
                 *_describe(rule, default_decay, path)))
  return _format(rows, right={3, 4})


def _format(rows: list[tuple[str, ...]], right: set[int]) -> str:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  cell = lambda i, s: s.rjust(widths[i]) if i in right else s.ljust(widths[i])
  return "\n".join("  ".join(cell(i, s) for i, s in enumerate(r)).rstrip() for r in rows)
