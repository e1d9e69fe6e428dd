"""RL of a causal LM with rewards a program checks: GRPO (DeepSeekMath, Shao et al. 2024).

Every `config.grpo.num_iterations` steps the current model samples
`num_generations` completions of each of `train.batch_size` prompts with
the jitted KV-cache generator (`generate.py`: temperature, top-p); a reward
function scores them (`rewards.py`: a final number, unit tests, or the
user's own); the rewards become advantages relative to each prompt's group,
and the steps minimise the clipped policy-ratio loss plus beta x KL to the
reference (`grpo_loss.py`). Generation and updates use the same parameters
in memory: the generator merges the run's state into a model, no copy.

The reference of the KL is the model with its LoRA adapters off (so beta > 0
needs LoRA). The ratio's old log-probs are those of the model that sampled:
with one update per generated batch, the current ones (ratio 1 in value);
with more, computed once right after sampling.

A generated batch is a pure function of the parameters, the prompts (the
seeded data order) and its seed (config.train.seed, the batch's number).
Prompts are rows with `messages` (chat-templated, ready for the reply) or
`prompt` (used as is, as TRL's standard format), plus whatever the reward
reads. The eval completes every eval prompt greedily and reports the mean
`reward`, and `accuracy` when the rewards are pass / fail.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import generate
from jaxft import metrics
from jaxft import steps
from jaxft.data import batches as batches_lib
from jaxft.data import sources
from jaxft.errors import UserError
from jaxft.formats import hub
from jaxft.tasks import base
from jaxft.tasks import causal_lm
from jaxft.tasks import grpo_loss
from jaxft.tasks import lm_logps
from jaxft.tasks import rewards as rewards_lib
from jaxft.tuning import lora

ROW_KEYS = ("input_ids", "positions", "segment_ids", "loss_mask")


def prompt_text(record: dict, tokenizer: Any, name: str, row: int) -> str:
  """The text a completion continues: chat-templated `messages`, or `prompt` as is."""
  if isinstance(record.get("messages"), list) and record["messages"]:
    return generate.chat_prompt(tokenizer, record["messages"])
  if isinstance(record.get("prompt"), str) and record["prompt"]:
    return record["prompt"]
  raise UserError(f"{name} data row {row}: GRPO prompts need a 'messages' list or a 'prompt' "
                  f"string; the row has {sorted(record)}")


def read_prompts(spec: str, split: str, tokenizer: Any, name: str) -> tuple[list[str], list[dict]]:
  """(prompt texts, records) of one split."""
  records = sources.load_split(spec, split).to_list()
  return [prompt_text(r, tokenizer, name, i) for i, r in enumerate(records)], records


def completion_rows(prompt_ids: np.ndarray, prompt_mask: np.ndarray, tokens: np.ndarray,
                    eos_id: int | None, pad_id: int) -> dict[str, np.ndarray]:
  """Left-padded prompts + their completions as rows (causal_lm's layout).

  A completion keeps its tokens up to and including its first EOS; loss on
  the completion only.
  """
  rows, prompt_len = tokens.shape[0], prompt_ids.shape[1]
  real = np.ones_like(tokens, bool)
  if eos_id is not None:
    after = np.cumsum(tokens == eos_id, axis=1) - (tokens == eos_id)  # EOS kept, after it not.
    real = after == 0
  ids = np.concatenate([prompt_ids, np.where(real, tokens, pad_id)], 1).astype(np.int32)
  mask = np.concatenate([prompt_mask.astype(bool), real], 1)
  positions = np.where(mask, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  loss_mask = np.concatenate([np.zeros((rows, prompt_len), bool), real], 1)
  return {"input_ids": ids, "positions": positions, "segment_ids": mask.astype(np.int32),
          "loss_mask": loss_mask}


def _forward(model, batch, deterministic, rngs, *, reference: bool):
  """(policy token log-probs, reference's or None), each [rows, length - 1]."""
  rows = {k: batch[k] for k in ROW_KEYS}
  logps = lm_logps.token_logps(model, rows, deterministic, rngs)
  ref = None
  if reference:
    ref = jax.lax.stop_gradient(lm_logps.token_logps(lora.without_adapters(model), rows))
  return logps, ref


def _loss_sums(outputs, batch, *, settings: dict):
  logps, ref = outputs
  mask = causal_lm.loss_targets(batch)
  old = batch.get("old_logps", jax.lax.stop_gradient(logps))
  loss, sums = grpo_loss.clipped_objective(logps, old, ref, batch["advantages"], mask,
                                           **settings)
  rollout = {k: jnp.sum(batch[k]) for k in ("reward", "reward_std", "completion_length")}
  return loss, {**sums, **rollout}


class GRPO(base.Task):
  """Group relative policy optimisation of a causal LM with a programmatic reward."""
  name = "grpo"
  model_kind = causal_lm.CausalLM.model_kind
  generates_text = True
  online = True
  peft_task_type = causal_lm.CausalLM.peft_task_type

  hf_config = causal_lm.CausalLM.hf_config
  export = causal_lm.CausalLM.export

  def __init__(self, config):
    super().__init__(config)
    self._rollout: tuple[int, dict[str, np.ndarray]] | None = None

  @property
  def objective(self) -> steps.Objective:
    g = self.config.grpo
    settings = dict(epsilon=g.epsilon, epsilon_high=g.epsilon_high, beta=g.beta)
    return steps.Objective(
        forward=functools.partial(_forward, reference=g.beta > 0),
        loss_sums=functools.partial(_loss_sums, settings=settings),
        units=lambda batch: jnp.float32(batch["input_ids"].shape[0]))

  eval_step = None  # The eval generates (`evaluate`); no per-batch eval program.

  def reward_fn(self):
    g = self.config.grpo
    fn = rewards_lib.resolve(g.reward)
    return functools.partial(fn, timeout=g.timeout) if fn is rewards_lib.unit_tests else fn

  # --- data ------------------------------------------------------------------

  def prepare(self, model_path: str, labels: list[str] | None, *, need_train: bool) -> base.Data:
    del labels
    d = self.config.data
    tokenizer = hub.load_tokenizer(model_path)
    self.reward_fn()  # A bad reward spec fails before anything loads.
    train = evaluation = None
    if need_train:
      texts, records = read_prompts(d.train, d.train_split, tokenizer, "train")
      train = {"index": np.arange(len(texts), dtype=np.int32)}
      self._train_prompts = (texts, records)
      _log_cut(tokenizer, texts, d.max_length, "train")
    if d.eval:
      texts, records = read_prompts(d.eval, d.eval_split, tokenizer, "eval")
      evaluation = {"index": np.arange(len(texts), dtype=np.int32)}
      samples = [(t, "") for t in texts]
    return base.Data(train, evaluation, samples=samples if d.eval else [],
                     records=records if d.eval else [], tokenizer=tokenizer)

  def describe(self, data: base.Data) -> str:
    g, t = self.config.grpo, self.config.train
    return (f"{batches_lib.num_examples(data.train)} train prompts; {t.batch_size} prompts x "
            f"{g.num_generations} completions per generated batch, {g.num_iterations} "
            "update(s) each")

  def tokens_per_example(self, hf_config: Any) -> int:
    del hf_config
    return int(self.config.data.max_length + self.config.grpo.max_new_tokens)

  def abstract_batch(self, model_path: str) -> dict[str, jax.ShapeDtypeStruct]:
    del model_path
    g = self.config.grpo
    rows = self.config.train.batch_size * g.num_generations
    shape = (rows, self.tokens_per_example(None))
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ROW_KEYS}
    batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.bool_)
    for k in ("advantages", "reward", "reward_std", "completion_length"):
      batch[k] = jax.ShapeDtypeStruct((rows,), jnp.float32)
    if g.num_iterations > 1:
      batch["old_logps"] = jax.ShapeDtypeStruct((rows, shape[1] - 1), jnp.float32)
    return batch

  # --- generated batches -------------------------------------------------------

  def train_batches(self, run: Any, data: base.Data):
    t, g = self.config.train, self.config.grpo
    order = batches_lib.TrainBatches(data.train, t.batch_size, t.seed)

    def batch(step: int) -> dict[str, np.ndarray]:
      number = (step - 1) // g.num_iterations
      if self._rollout is None or self._rollout[0] != number:
        self._rollout = (number, self.rollout(run, data, order[number]["index"], number))
      return self._rollout[1]
    return batch

  def rollout(self, run: Any, data: base.Data, indices: np.ndarray,
              number: int) -> dict[str, np.ndarray]:
    """Generated batch `number`: samples, rewards, advantages, as train rows."""
    g, t = self.config.grpo, self.config.train
    texts, records = self._train_prompts
    prompts = [texts[i] for i in indices for _ in range(g.num_generations)]
    group_records = [records[i] for i in indices for _ in range(g.num_generations)]
    tokenizer = data.tokenizer
    ids, mask = prompt_ids(tokenizer, prompts, self.config.data.max_length)
    model = run.model()
    sampling = generate.Sampling(temperature=g.temperature, top_p=g.top_p)
    eos = tokenizer.eos_token_id
    tokens = generate.generate(model, ids, mask, max_new_tokens=g.max_new_tokens,
                               eos_ids=[] if eos is None else [eos], sampling=sampling,
                               seed=t.seed * 1_000_003 + number)
    completions = [generate.decode(tokenizer, row) for row in tokens]
    scores = rewards_lib.score(self.reward_fn(), prompts, completions, group_records,
                               self.config.grpo.reward)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = completion_rows(ids, mask, tokens, eos, pad)
    groups = scores.reshape(-1, g.num_generations)
    rows["advantages"] = np.asarray(grpo_loss.group_advantages(
        jnp.asarray(scores), g.num_generations, scale=g.scale_rewards), np.float32)
    rows["reward"] = scores.astype(np.float32)
    rows["reward_std"] = np.repeat(groups.std(axis=1, ddof=1), g.num_generations).astype(
        np.float32)
    rows["completion_length"] = rows["loss_mask"].sum(1).astype(np.float32)
    if g.num_iterations > 1:
      rows["old_logps"] = np.asarray(_sampler_logps(model, {k: rows[k] for k in ROW_KEYS}))
    return rows

  # --- evaluation ----------------------------------------------------------------

  def evaluate(self, run: Any, data: base.Data, workdir: str | None = None) -> dict[str, Any]:
    """Mean reward of greedy completions of every eval prompt; accuracy if pass / fail."""
    g = self.config.grpo
    prompts = [p for p, _ in data.samples]
    model, size = run.model(), self.config.train.eval_batch_size
    completions = []
    for start in range(0, len(prompts), size):
      completions += generate.complete(model, data.tokenizer, prompts[start:start + size],
                                       max_new_tokens=g.max_new_tokens, pad_multiple=64)
    scores = rewards_lib.score(self.reward_fn(), prompts, completions, data.records, g.reward)
    result = {"prompts": len(prompts), "reward": float(scores.mean())}
    if np.isin(scores, (0.0, 1.0)).all():
      result["accuracy"] = float(scores.mean())
    if workdir is not None:
      causal_lm.write_samples(run.step, [(p, str(r.get("answer", ""))) for p, r in
                                         zip(prompts, data.records)], completions, workdir)
    metrics.log(f"eval: {len(prompts)} prompts completed greedily, mean reward "
                f"{result['reward']:.4f}")
    return result


def _log_cut(tokenizer: Any, texts: list[str], max_length: int, name: str) -> None:
  lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
  cut = sum(n > max_length for n in lengths)
  metrics.log(f"{name}: {len(texts)} prompts of up to {max(lengths, default=0)} tokens"
              + (f"; {cut} longer than max_length={max_length} are cut from the left"
                 if cut else ""))


def prompt_ids(tokenizer: Any, prompts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompt ids and mask left-padded to exactly `length` (one compiled shape for every
  generated batch), each prompt cut from the left to fit."""
  ids, mask = generate.prompts_to_ids(tokenizer, prompts)
  missing = max(length - ids.shape[1], 0)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  ids = np.pad(ids, ((0, 0), (missing, 0)), constant_values=pad)[:, -length:]
  mask = np.pad(mask, ((0, 0), (missing, 0)))[:, -length:]
  return ids, mask


@functools.partial(jax.jit, static_argnums=0)
def _logps_program(graphdef, state, rows):
  return lm_logps.token_logps(nnx.merge(graphdef, state), rows)


def _sampler_logps(model: Any, rows: dict) -> jax.Array:
  """Token log-probs of the model that sampled the rows (the ratio's old policy)."""
  graphdef, state = nnx.split(model)
  return _logps_program(graphdef, state, rows)
