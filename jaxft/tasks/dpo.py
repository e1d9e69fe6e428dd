"""Preference tuning of a causal LM on (prompt, chosen, rejected) pairs: DPO and its cousins.

The data are pairs (`data/preference.py`): each example is two rows,
chosen and rejected, that go through the model in one batch; the loss reads
each response's summed log-probs (`preference_loss.py`, config.dpo.loss).

The reference model, for the losses that have one:
- with LoRA, the same weights with the adapters off (`lora.without_adapters`):
  no second copy in memory, one more forward pass per step;
- with config.dpo.precompute_reference, or without LoRA (a full fine-tune),
  the reference log-probs of every pair are computed once, before training,
  and travel with the data (`ref_logps`); without LoRA they come from the
  base checkpoint (read again if the run has already trained).
The model, its export and `jaxft chat` are the causal LM's.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import config as config_lib
from jaxft import metrics
from jaxft import sharding
from jaxft import steps
from jaxft.data import batches as batches_lib
from jaxft.data import preference
from jaxft.formats import hub
from jaxft.tasks import base
from jaxft.tasks import causal_lm
from jaxft.tasks import lm_logps
from jaxft.tasks import preference_loss
from jaxft.tuning import lora
from jaxft.tuning import trainable

ROW_KEYS = ("input_ids", "positions", "segment_ids", "loss_mask")
REFERENCE_KEY = "ref_logps"  # [pairs, 2] float32 reference log-probs, when precomputed.


def _rows(batch: dict) -> dict:
  """[pairs, 2, length] -> [2 x pairs, length]: chosen and rejected in one batch.

  Pair-major, so a device's share of the pairs stays on it."""
  return {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in ROW_KEYS}


def length_weights(rows: dict, pairs: int, ld_alpha: float) -> jax.Array:
  """float32 [2 x pairs, length - 1]: each scored token's weight in its response's log-prob.

  LD-DPO (Liu et al. 2024, TRL's `ld_alpha`): the first min(chosen, rejected)
  tokens of both responses weigh 1, the longer response's rest ld_alpha. At 1
  this is the plain sum; at 0 a pair is judged on equally many tokens, so a
  uniform drop in per-token log-prob no longer reads as "the shorter wins".
  """
  targets = causal_lm.loss_targets(rows)
  counts = jnp.sum(targets, axis=-1).reshape(pairs, 2)
  shared = jnp.repeat(jnp.min(counts, axis=-1), 2)[:, None]
  index = jnp.cumsum(targets, axis=-1)  # 1-based position within the response.
  return jnp.where(targets, jnp.where(index <= shared, 1.0, ld_alpha), 0.0).astype(jnp.float32)


def _forward(model, batch, deterministic, rngs, *, inline_reference: bool, ld_alpha: float = 1.0):
  """(policy log-probs, reference log-probs, response tokens), each [pairs, 2]."""
  rows = _rows(batch)
  pairs = batch["input_ids"].shape[0]
  weights = length_weights(rows, pairs, ld_alpha)
  def summed(m):
    return (lm_logps.token_logps(m, rows, deterministic, rngs) * weights).sum(-1).reshape(pairs, 2)
  logps = summed(model)
  counts = weights.sum(-1).reshape(pairs, 2)  # The averaged losses' divisor, weighted alike.
  if REFERENCE_KEY in batch:
    ref = batch[REFERENCE_KEY]
  elif inline_reference:
    ref = jax.lax.stop_gradient(summed(lora.without_adapters(model)))
  else:
    ref = jnp.zeros_like(logps)
  return logps, ref, counts


def _loss_sums(outputs, batch, *, settings: dict):
  del batch
  logps, ref, counts = outputs
  losses, chosen, rejected = preference_loss.pair_losses(logps, ref, counts, **settings)
  sums = {k: jnp.sum(v) for k, v in preference_loss.pair_metrics(logps, chosen, rejected).items()}
  return jnp.sum(losses), sums


def eval_step(params: nnx.State, frozen: nnx.State, batch: dict, *, graphdef: nnx.GraphDef,
              rest: nnx.State, objective: steps.Objective) -> tuple[jax.Array, ...]:
  """Per pair: (policy log-probs, reference log-probs, response tokens), dropout off."""
  return steps.model_outputs(objective, graphdef, params, frozen, rest, batch, None)


class DPO(base.Task):
  """Direct preference optimisation (and IPO, hinge, SimPO, ORPO) of a causal LM."""
  name = "dpo"
  model_kind = causal_lm.CausalLM.model_kind
  generates_text = True
  peft_task_type = causal_lm.CausalLM.peft_task_type

  # The causal LM's model, config and export.
  hf_config = causal_lm.CausalLM.hf_config
  export = causal_lm.CausalLM.export

  @property
  def settings(self) -> dict[str, Any]:
    d = self.config.dpo
    return dict(loss=d.loss, beta=d.beta, label_smoothing=d.label_smoothing,
                simpo_gamma=d.simpo_gamma)

  @property
  def needs_reference(self) -> bool:
    return self.config.dpo.loss not in preference_loss.REFERENCE_FREE

  @property
  def precomputes_reference(self) -> bool:
    """Reference log-probs computed once before training (else inline, adapters off)."""
    return self.needs_reference and (self.config.dpo.precompute_reference
                                     or not config_lib.lora_enabled(self.config))

  @property
  def objective(self) -> steps.Objective:
    inline = self.needs_reference and not self.precomputes_reference
    return steps.Objective(
        forward=functools.partial(_forward, inline_reference=inline,
                                  ld_alpha=self.config.dpo.ld_alpha),
        loss_sums=functools.partial(_loss_sums, settings=self.settings),
        units=lambda batch: jnp.float32(batch["input_ids"].shape[0]))

  @property
  def eval_step(self):
    # Eval always computes the reference inline unless the data carry it.
    objective = steps.Objective(
        forward=functools.partial(_forward, inline_reference=self.needs_reference,
                                  ld_alpha=self.config.dpo.ld_alpha),
        loss_sums=None, units=None)
    return functools.partial(eval_step, objective=objective)

  # --- data ------------------------------------------------------------------

  def prepare(self, model_path: str, labels: list[str] | None, *, need_train: bool) -> base.Data:
    del labels
    tokenizer = hub.load_tokenizer(model_path)
    train, evaluation = preference.prepare(self.config, tokenizer, need_train=need_train)
    d = self.config.data
    limits = f"max_length={d.max_length}" + (
        f", max_prompt_length={d.max_prompt_length}" if d.max_prompt_length else "")
    for name, split in (("train", train), ("eval", evaluation)):
      if split is None:
        continue
      metrics.log(f"{name}: {split.pairs} pairs; {limits} cut the prompt of "
                  f"{split.prompt_truncated} (from the left) and a response of "
                  f"{split.response_truncated} (from the right)"
                  + (f"; {split.dropped_identical} pairs left identical by the cut were "
                     "dropped" if split.dropped_identical else ""))
    return base.Data(train and dict(train.rows), evaluation and dict(evaluation.rows),
                     tokenizer=tokenizer)

  def describe(self, data: base.Data) -> str:
    return (f"{batches_lib.num_examples(data.train)} train pairs of 2 x "
            f"{data.train['input_ids'].shape[-1]} tokens")

  def abstract_batch(self, model_path: str) -> dict[str, jax.ShapeDtypeStruct]:
    del model_path
    shape = (self.config.train.batch_size, 2, self.config.data.max_length)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ROW_KEYS}
    batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.bool_)
    if self.precomputes_reference:
      batch[REFERENCE_KEY] = jax.ShapeDtypeStruct(shape[:2], jnp.float32)
    return batch

  def tokens_per_example(self, hf_config: Any) -> int:
    # The reference's forward pass (LoRA) is not counted: MFU counts the trained model's work.
    return 2 * self.sequence_length(hf_config)

  def sequence_length(self, hf_config: Any) -> int:
    del hf_config
    return int(self.config.data.max_length)

  # --- the reference ---------------------------------------------------------

  def before_run(self, run: Any, data: base.Data, model_path: str) -> None:
    """Adds the reference log-probs to the data when the task precomputes them."""
    splits = [s for s in (data.train, data.eval) if s is not None and REFERENCE_KEY not in s]
    if not self.precomputes_reference or not splits:
      return
    params, frozen, source = run.state["params"], run.state["frozen"], "the run's model"
    if not config_lib.lora_enabled(self.config) and run.step > 0:
      # A full fine-tune has moved away from the reference: read the base again.
      loaded = self.load(model_path, run.hf_config, shardings=lambda s: sharding.tree_shardings(
          s, run.placement.mesh, run.placement.rules))
      split = trainable.split(loaded.model, self.config)
      params, frozen, source = split.params, split.frozen, self.config.model.path
    with_adapters = config_lib.lora_enabled(self.config)
    for examples in splits:
      # LoRA: the eval step's inline reference is the adapters-off model; else the
      # policy output of the unchanged base is the reference.
      policy, inline, _ = self._pair_outputs(run, examples, params, frozen)
      examples[REFERENCE_KEY] = inline if with_adapters else policy
    metrics.log(f"reference log-probs of {sum(len(s['input_ids']) for s in splits)} pairs "
                f"precomputed ({source}{', adapters off' if with_adapters else ''})")

  def _pair_outputs(self, run: Any, examples: dict, params: Any = None, frozen: Any = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(policy, reference, token count) [pairs, 2] of every pair in `examples`, in order."""
    params = run.state["params"] if params is None else params
    frozen = run.state["frozen"] if frozen is None else frozen
    outs, weights = [], []
    for batch in batches_lib.eval_batches(examples, self.config.train.eval_batch_size):
      weights.append(batch.pop("weight"))
      batch = sharding.global_batch(batch, run.placement.batch)
      outs.append([sharding.to_host(x) for x in run.eval_fn(params, frozen, batch)])
    keep = np.concatenate(weights) > 0
    return tuple(np.concatenate(parts)[keep].astype(np.float32) for parts in zip(*outs))

  # --- evaluation --------------------------------------------------------------

  def evaluate(self, run: Any, data: base.Data, workdir: str | None = None) -> dict[str, Any]:
    """The loss and TRL's reward metrics, averaged over every eval pair.

    `preference_accuracy` (= rewards/accuracies: the chosen response's reward
    beats the rejected one's; a tie counts half) and `reward_margin`
    (= rewards/margins) are the stable names.
    """
    del workdir
    logps, ref, counts = self._pair_outputs(run, data.eval)
    if self.needs_reference:
      data.eval[REFERENCE_KEY] = ref  # The reference does not train: later evals reuse it.
    losses, chosen, rejected = preference_loss.pair_losses(
        jnp.asarray(logps), jnp.asarray(ref), jnp.asarray(counts), **self.settings)
    result = {k: float(np.mean(v)) for k, v in preference_loss.pair_metrics(
        jnp.asarray(logps), chosen, rejected).items()}
    return {"pairs": len(logps), "loss": float(np.mean(losses)), **result,
            "preference_accuracy": result["rewards/accuracies"],
            "reward_margin": result["rewards/margins"]}
