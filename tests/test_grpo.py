"""GRPO as a task: generated batches (layout, reproducible from the seed), a run through
the CLI with its metrics and eval JSON, and reward functions that fail."""

import json

import numpy as np
import pytest

from jaxft import defaults
from jaxft import run as run_lib
from jaxft import tasks
from jaxft.tasks import grpo
from tests.helpers import ROOT, jaxft_in_process

RECIPE = str(ROOT / "configs" / "grpo.py")


def test_completion_rows_keep_the_first_eos_and_score_only_the_completion():
  prompt = np.array([[0, 0, 5, 6], [7, 8, 9, 10]])
  mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
  eos = 2
  tokens = np.array([[11, eos, eos], [12, 13, 14]])  # Row 0 stops; row 1 runs out.
  rows = grpo.completion_rows(prompt, mask, tokens, eos, pad_id=0)
  np.testing.assert_array_equal(rows["input_ids"], [[0, 0, 5, 6, 11, eos, 0],
                                                    [7, 8, 9, 10, 12, 13, 14]])
  np.testing.assert_array_equal(rows["segment_ids"], [[0, 0, 1, 1, 1, 1, 0], [1] * 7])
  np.testing.assert_array_equal(rows["positions"], [[0, 0, 0, 1, 2, 3, 0], list(range(7))])
  np.testing.assert_array_equal(rows["loss_mask"], [[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]])


def test_prompt_ids_are_left_padded_or_cut_to_one_length(smollm2_tokenizer):
  ids, mask = grpo.prompt_ids(smollm2_tokenizer, ["a b c d e f g h", "a"], 4)
  assert ids.shape == mask.shape == (2, 4)
  np.testing.assert_array_equal(mask[1], [0, 0, 0, 1])
  full = smollm2_tokenizer("a b c d e f g h", add_special_tokens=False)["input_ids"]
  np.testing.assert_array_equal(ids[0], full[-4:])  # Cut from the left: the end stays.


@pytest.fixture(scope="module")
def tiny_problems(tmp_path_factory):
  root = tmp_path_factory.mktemp("arith")
  lines = (ROOT / "data" / "arithmetic" / "train.jsonl").read_text().splitlines()
  (root / "train.jsonl").write_text("\n".join(lines[:8]) + "\n")
  (root / "eval.jsonl").write_text("\n".join(lines[8:12]) + "\n")
  return root


def tiny_grpo_config(tiny_chat_lm, root):
  c = defaults.recipe("grpo")
  c.model.path = str(tiny_chat_lm / "model")
  c.data.train, c.data.eval = str(root / "train.jsonl"), str(root / "eval.jsonl")
  c.lora.rank = 4
  c.train.update(batch_size=2, num_steps=2, log_every=1, eval_batch_size=4)
  c.grpo.update(num_generations=4, max_new_tokens=6)
  c.checkpoint.every = 0
  return c


def test_a_generated_batch_is_reproducible_from_its_seed(tiny_chat_lm, tiny_problems, tmp_path):
  def rollout(seed):
    config = tiny_grpo_config(tiny_chat_lm, tiny_problems)
    config.train.seed = seed
    model_path, task, data = run_lib.prepare(config, str(tmp_path), need_train=True)
    run = run_lib.open_run(config, str(tmp_path / f"w{seed}"), model_path, None, task=task,
                           quiet=True)
    return task.train_batches(run, data)(1)

  a, b, c = rollout(0), rollout(0), rollout(1)
  assert set(a) >= {"input_ids", "loss_mask", "advantages", "reward"}
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["input_ids"], c["input_ids"])
  assert a["input_ids"].shape == (2 * 4, 96 + 6)  # Prompts x group, max_length + new tokens.


def reward_module(tmp_path, body, name):
  (tmp_path / f"{name}.py").write_text(
      "import math\n\ndef reward(prompts, completions, records):\n" + body)
  return str(tmp_path)


def test_grpo_run_logs_rl_metrics_and_evals_reward_and_accuracy(tiny_chat_lm, tiny_problems,
                                                                 tmp_path, monkeypatch):
  # A reward the random model earns sometimes: completions of an even length.
  monkeypatch.syspath_prepend(reward_module(
      tmp_path, "  return [float(len(c) % 2 == 0) for c in completions]\n", "even"))
  flags = [f"--config={RECIPE}", f"--workdir={tmp_path / 'w'}",
           f"--config.model.path={tiny_chat_lm / 'model'}",
           f"--config.data.train={tiny_problems / 'train.jsonl'}",
           f"--config.data.eval={tiny_problems / 'eval.jsonl'}", "--config.lora.rank=4",
           "--config.train.batch_size=2", "--config.train.num_steps=2",
           "--config.grpo.num_generations=4", "--config.grpo.max_new_tokens=6",
           "--config.grpo.num_iterations=2", "--config.train.log_every=1",
           "--config.grpo.reward=even:reward"]
  done = jaxft_in_process("train", *flags)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").open()]
  train_lines = [l for l in lines if l["split"] == "train"]
  assert len(train_lines) == 2
  for key in ("reward", "reward_std", "kl", "clip_fraction", "completion_length", "loss"):
    assert all(np.isfinite(l[key]) for l in train_lines), key
  done = jaxft_in_process("eval", *flags, "--config.grpo.reward=numeric_match")
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["step"] == 2 and result["prompts"] == 4
  assert 0.0 <= result["reward"] == result["accuracy"] <= 1.0


@pytest.mark.parametrize("module, body, message", [
    ("raises", "  raise KeyError('score')\n", "reward function raises:reward raised KeyError"),
    ("nans", "  return [math.nan] * len(completions)\n", "nan at index 0"),
])
def test_a_failing_reward_function_is_a_clear_error_and_saves_nothing(
    tiny_chat_lm, tiny_problems, tmp_path, monkeypatch, module, body, message):
  monkeypatch.syspath_prepend(reward_module(tmp_path, body, module))
  done = jaxft_in_process(
      "train", f"--config={RECIPE}", f"--workdir={tmp_path / 'w'}",
      f"--config.model.path={tiny_chat_lm / 'model'}",
      f"--config.data.train={tiny_problems / 'train.jsonl'}", "--config.data.eval=",
      "--config.lora.rank=4", "--config.train.batch_size=2", "--config.grpo.num_generations=2",
      "--config.grpo.max_new_tokens=4", f"--config.grpo.reward={module}:reward")
  assert done.returncode == 2, done.stderr[-3000:]
  assert message in done.stderr and "Traceback" not in done.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_an_unknown_reward_or_beta_without_lora_fails_before_loading(tiny_problems, tmp_path):
  base = [f"--config={RECIPE}", f"--workdir={tmp_path / 'w'}",
          f"--config.data.train={tiny_problems / 'train.jsonl'}"]
  done = jaxft_in_process("train", *base, "--config.grpo.reward=no_such_module:fn")
  assert done.returncode == 2 and "no module named 'no_such_module'" in done.stderr
  done = jaxft_in_process("train", *base, "--config.lora.rank=0")
  assert done.returncode == 2 and "config.grpo.beta must be 0 without LoRA" in done.stderr
  assert tasks.of(defaults.recipe("grpo")).online
