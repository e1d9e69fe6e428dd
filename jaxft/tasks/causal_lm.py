"""Supervised fine-tuning of a decoder-only LM: its data, loss, eval and export.

Reads conversations (`messages`), prompt / completion pairs or plain text,
packed or padded into fixed-length rows. A row holds one or more documents:
`segment_ids` (1, 2, ... per document, 0 on padding) keep attention inside a
document and `positions` restart at 0 in each; `loss_mask` marks the tokens
to learn (the assistant's, by default). The loss is the mean next-token loss
per loss token of the global batch; evals report it with its perplexity,
write sample generations and, where a recipe asks, pass@1 or ROUGE-L.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Union

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxft import generate
from jaxft import metrics
from jaxft import sharding
from jaxft import steps
from jaxft.runtime import storage
from jaxft.data import batches as batches_lib
from jaxft.data import sft
from jaxft.formats import hf
from jaxft.formats import hub
from jaxft.models import layers
from jaxft.tasks import base
from jaxft.tasks import lm_loss
from jaxft.tasks import lm_metrics
from jaxft.tuning import lora


# The logits [batch, length, vocab], or (final hidden states, output layer)
# when the output layer is one matrix: lm_loss then never holds the logits.
Outputs = Union[jax.Array, tuple[jax.Array, layers.OutputLayer]]


def loss_targets(batch: dict) -> jax.Array:
  """Bool [batch, length - 1]: position i is scored on predicting token i + 1.

  True when token i + 1 carries loss and belongs to the same (non-padding)
  document as token i.
  """
  segments = batch["segment_ids"]
  return (batch["loss_mask"][:, 1:].astype(bool) & (segments[:, 1:] == segments[:, :-1])
          & (segments[:, 1:] != 0))


def token_loss_sum(outputs: Outputs, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token losses over loss tokens, number of loss tokens).

  `outputs` is what `_forward` returned: logits, or hidden states + output
  layer. Dividing the two sums over the whole global batch averages per
  token, not per row, so packing does not change the loss.
  """
  valid = loss_targets(batch)
  targets = batch["input_ids"][:, 1:]
  if isinstance(outputs, tuple):
    hidden, output = outputs
    # Position i predicts token i + 1; the last position predicts nothing.
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 1)))
    total = lm_loss.loss_sum(hidden, output, pad(targets), pad(valid))
  else:
    losses = optax.softmax_cross_entropy_with_integer_labels(outputs[:, :-1], targets)
    total = jnp.sum(jnp.where(valid, losses, 0.0))
  return total, jnp.sum(valid)


def _forward(model, batch, deterministic, rngs) -> Outputs:
  output = model.output_layer()
  call = functools.partial(model, batch["input_ids"], None, batch["positions"],
                           batch["segment_ids"], deterministic=deterministic, rngs=rngs)
  return call() if output is None else (call(hidden_only=True), output)


OBJECTIVE = steps.Objective(
    forward=_forward,
    loss_sums=lambda outputs, batch: (token_loss_sum(outputs, batch)[0], {}),
    units=lambda batch: jnp.sum(loss_targets(batch)).astype(jnp.float32))


def eval_step(params: nnx.State, frozen: nnx.State, batch: dict, *, graphdef: nnx.GraphDef,
              rest: nnx.State) -> tuple[jax.Array, jax.Array]:
  """(summed loss, loss tokens) of a batch, dropout off."""
  outputs = steps.model_outputs(OBJECTIVE, graphdef, params, frozen, rest, batch, None)
  total, count = token_loss_sum(outputs, batch)
  return total, count.astype(jnp.float32)


class CausalLM(base.Task):
  """Supervised fine-tuning of a decoder-only LM (Llama, Mistral, Qwen2/3, GPT-2)."""
  name = model_kind = "causal_lm"
  generates_text = True
  per_example_eval = False
  peft_task_type = "CAUSAL_LM"

  objective = OBJECTIVE
  eval_step = staticmethod(eval_step)

  def prepare(self, model_path: str, labels: list[str] | None, *, need_train: bool) -> base.Data:
    del labels
    tokenizer = hub.load_tokenizer(model_path)
    train, evaluation = sft.prepare(self.config, tokenizer, need_train=need_train)
    for name, split in (("train", train), ("eval", evaluation)):
      if split is not None and split.truncated:
        metrics.log(f"{name}: {split.truncated} of {split.documents} documents are longer "
                    f"than max_length={self.config.data.max_length} and were cut")
    return base.Data(train and train.rows, evaluation and evaluation.rows,
                     samples=evaluation.samples if evaluation else [],
                     records=evaluation.records if evaluation else [], tokenizer=tokenizer)

  def describe(self, data: base.Data) -> str:
    return (f"{batches_lib.num_examples(data.train)} train rows of "
            f"{data.train['input_ids'].shape[1]} tokens")

  def abstract_batch(self, model_path: str) -> dict[str, jax.ShapeDtypeStruct]:
    del model_path
    shape = (self.config.train.batch_size, self.config.data.max_length)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32)
             for k in ("input_ids", "positions", "segment_ids")}
    batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.bool_)
    return batch

  def hf_config(self, model_path: str, labels: list[str] | None) -> Any:
    del labels
    return hub.load_hf_config(model_path)

  def evaluate(self, run: Any, data: base.Data, workdir: str | None = None) -> dict[str, Any]:
    """Mean loss per loss token over the eval split and its perplexity.

    With `config.eval.metric`, also the metric on greedy completions of every
    eval prompt. With a workdir, writes the completions (or, without a metric,
    those of the first `config.eval.num_samples` prompts) to
    DIR/samples/step_N.jsonl.
    """
    config = self.config
    total, count = 0.0, 0.0
    for batch in batches_lib.eval_batches(data.eval, config.train.eval_batch_size):
      weight = batch.pop("weight")
      batch["loss_mask"] = batch["loss_mask"] & (weight[:, None] > 0)  # Padding rows repeat one.
      batch = sharding.global_batch(batch, run.placement.batch)
      s, n = run.eval_fn(run.state["params"], run.state["frozen"], batch)
      total += float(sharding.to_host(s))
      count += float(sharding.to_host(n))
    loss = total / max(count, 1.0)
    result = {"tokens": int(count)}
    e = config.eval
    samples = data.samples if e.metric else data.samples[:e.num_samples]
    if samples and (e.metric or workdir is not None):
      completions = complete(run.model(), data.tokenizer, [p for p, _ in samples], config)
      if e.metric == "pass@1":
        result["pass@1"] = lm_metrics.pass_at_1(data.records, completions, timeout=e.timeout)
      elif e.metric == "rouge_l":
        result["rouge_l"] = lm_metrics.rouge_l([r for _, r in samples], completions)
      if workdir is not None:
        write_samples(run.step, samples, completions, workdir)
    return {**result, "loss": loss, "perplexity": math.exp(min(loss, 80.0))}

  def export(self, run: Any, model_path: str, out_dir: str) -> None:
    hf.export(lora.merge(run.model()), run.hf_config, self.model_kind, out_dir,
              tokenizer_path=model_path)


def complete(model: Any, tokenizer: Any, prompts: list[str], config: Any) -> list[str]:
  """Greedy completions of `prompts` by `model`, eval_batch_size at a time."""
  size = config.train.eval_batch_size
  out = []
  for start in range(0, len(prompts), size):
    # Lengths rounded up to 64 tokens: few distinct shapes, few compilations.
    out += generate.complete(model, tokenizer, prompts[start:start + size],
                             max_new_tokens=config.eval.max_new_tokens,
                             stop=tuple(config.eval.stop), pad_multiple=64)
  return out


def write_samples(step: int, samples: list[tuple[str, str]], completions: list[str],
                  workdir: str) -> None:
  """Prompts, references and completions in DIR/samples/step_N.jsonl (process 0)."""
  if jax.process_index() != 0:
    return
  folder = storage.join(workdir, "samples")
  storage.makedirs(folder)
  rows = [{"prompt": p, "reference": r, "generated": g} for (p, r), g in zip(samples, completions)]
  storage.write_text(storage.join(folder, f"step_{step}.jsonl"),
                     "".join(json.dumps(row) + "\n" for row in rows))
  metrics.add_samples(workdir, step, "eval/samples", rows)
