"""DPO and its cousins: the losses against PyTorch written from the papers, log-probs against
transformers, the LoRA reference, and a DPO run through the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx

from jaxft import config as config_lib
from jaxft import inspect
from jaxft.errors import UserError
from jaxft.formats import hf
from jaxft.models import layers
from jaxft.tasks import dpo
from jaxft.tasks import lm_logps
from jaxft.tasks import preference_loss
from jaxft.tuning import lora
from jaxft.tuning import trainable

LOSSES = preference_loss.LOSSES
SETTINGS = dict(beta=0.3, label_smoothing=0.1, simpo_gamma=0.4)


def torch_losses(pc, pr, rc, rr, nc, nr, loss, beta, label_smoothing, simpo_gamma):
  """The published formulas, as TRL writes them (per pair)."""
  if loss in ("ipo", "simpo", "orpo"):  # Per-token mean log-probs.
    pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
  if loss == "sigmoid":
    z = beta * ((pc - rc) - (pr - rr))
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
  if loss == "ipo":
    return ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2
  if loss == "hinge":
    return torch.relu(1 - beta * ((pc - rc) - (pr - rr)))
  if loss == "simpo":
    z = beta * (pc - pr) - simpo_gamma
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
  # ORPO: NLL of the chosen + lambda * odds-ratio loss, log odds = log p - log(1 - p).
  log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
  return -pc - beta * F.logsigmoid(log_odds)


def random_pairs(seed=0, pairs=6):
  rng = np.random.default_rng(seed)
  counts = rng.integers(3, 30, (pairs, 2)).astype(np.float32)
  logps = (-rng.uniform(0.3, 3.0, (pairs, 2)) * counts).astype(np.float32)
  ref = (logps + rng.normal(0, 2.0, (pairs, 2))).astype(np.float32)
  ref = np.minimum(ref, -1e-3).astype(np.float32)
  return logps, ref, counts


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_and_gradient_equal_torch_reference(loss):
  logps, ref, counts = random_pairs()

  def mean_loss(lp):
    out, _, _ = preference_loss.pair_losses(lp, jnp.asarray(ref), jnp.asarray(counts),
                                            loss=loss, **SETTINGS)
    return out.mean()

  value, grad = jax.value_and_grad(mean_loss)(jnp.asarray(logps))
  t = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
  r, n = torch.tensor(ref, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)
  expected = torch_losses(t[:, 0], t[:, 1], r[:, 0], r[:, 1], n[:, 0], n[:, 1], loss,
                          **SETTINGS).mean()
  expected.backward()
  np.testing.assert_allclose(float(value), expected.item(), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), t.grad.numpy(), atol=1e-5, rtol=1e-5)


def test_reference_free_losses_ignore_the_reference():
  logps, ref, counts = random_pairs()
  for loss in preference_loss.REFERENCE_FREE:
    a = preference_loss.pair_losses(logps, ref, counts, loss=loss, **SETTINGS)[0]
    b = preference_loss.pair_losses(logps, ref * 0, counts, loss=loss, **SETTINGS)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_metrics_count_ties_as_half_and_name_trl_keys():
  logps = jnp.zeros((3, 2))
  m = preference_loss.pair_metrics(logps, jnp.array([1.0, 0.0, -1.0]), jnp.array([0.0, 0.0, 0.0]))
  np.testing.assert_array_equal(np.asarray(m["rewards/accuracies"]), [1.0, 0.5, 0.0])
  assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/margins",
                    "rewards/accuracies", "logps/chosen", "logps/rejected"}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  """A tiny random Llama (perturbed, untied head) saved for jaxft and kept live in torch."""
  config = transformers.LlamaConfig(
      vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * 0.05)
  path = tmp_path_factory.mktemp("dpo_llama")
  model.save_pretrained(path)
  return str(path), model


def pair_batch(pairs=3, length=12, seed=0):
  """[pairs, 2, length] rows: a shared prompt, two different responses, right padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 97, (pairs, 2, length)).astype(np.int32)
  ids[:, 1, :4] = ids[:, 0, :4]  # The prompt (4 tokens) is shared.
  lengths = np.array([[12, 9], [7, 12], [10, 10]])[:pairs]
  real = np.arange(length)[None, None, :] < lengths[..., None]
  return {"input_ids": np.where(real, ids, 0).astype(np.int32),
          "positions": np.where(real, np.arange(length), 0).astype(np.int32),
          "segment_ids": real.astype(np.int32),
          "loss_mask": real & (np.arange(length) >= 4)}


def torch_sequence_logps(model, batch, ld_alpha=1.0):
  """Summed log-probs of each response, from transformers' logits (rows chosen, rejected).

  With ld_alpha < 1, LD-DPO's weighting as the paper states it: tokens past
  the shorter response's length weigh ld_alpha.
  """
  ids = torch.from_numpy(batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1])).long()
  mask = torch.from_numpy(batch["segment_ids"].reshape(ids.shape)).long()
  loss_mask = torch.from_numpy(batch["loss_mask"].reshape(ids.shape))
  with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
  logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
  valid = loss_mask[:, 1:] & mask[:, 1:].bool()
  lengths = valid.sum(-1).reshape(-1, 2)
  public = lengths.min(-1).values.repeat_interleave(2)[:, None]
  weight = torch.where(valid.cumsum(-1) <= public, 1.0, ld_alpha).double() * valid
  return (logp * weight).sum(-1).reshape(-1, 2).numpy(), weight.sum(-1).reshape(-1, 2).numpy()


@pytest.mark.parametrize("loss", LOSSES)
def test_end_to_end_loss_equals_torch_on_transformers_logps(tiny_llama, loss):
  path, torch_model = tiny_llama
  model = hf.load(path, "causal_lm").model
  batch = pair_batch()
  logps, _, counts = dpo._forward(model, batch, True, None, inline_reference=False)
  want_logps, want_counts = torch_sequence_logps(torch_model, batch)
  np.testing.assert_allclose(np.asarray(logps), want_logps, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(counts), want_counts)
  ref = want_logps - 0.7  # Any reference: the same on both sides.
  ours = preference_loss.pair_losses(logps, jnp.asarray(ref, jnp.float32), counts, loss=loss,
                                     **SETTINGS)[0]
  t = torch.tensor(want_logps)
  r, n = torch.tensor(ref), torch.tensor(want_counts, dtype=torch.float64)
  theirs = torch_losses(t[:, 0], t[:, 1], r[:, 0], r[:, 1], n[:, 0], n[:, 1], loss, **SETTINGS)
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5])
def test_length_desensitised_logps_equal_torch(tiny_llama, ld_alpha):
  path, torch_model = tiny_llama
  model = hf.load(path, "causal_lm").model
  batch = pair_batch()  # Responses of 8 / 5, 3 / 8 and 6 / 6 tokens.
  logps, _, counts = dpo._forward(model, batch, True, None, inline_reference=False,
                                  ld_alpha=ld_alpha)
  want_logps, want_counts = torch_sequence_logps(torch_model, batch, ld_alpha)
  np.testing.assert_allclose(np.asarray(logps), want_logps, atol=1e-5)
  np.testing.assert_allclose(np.asarray(counts), want_counts)
  plain = np.asarray(dpo._forward(model, batch, True, None, inline_reference=False)[0])
  longer = [(0, 0), (1, 1)]  # Only the longer response of an unequal pair is reweighted.
  assert all(abs(plain[i] - want_logps[i]) > 1e-3 for i in longer)
  shorter = [(0, 1), (1, 0), (2, 0), (2, 1)]
  np.testing.assert_allclose([plain[i] for i in shorter], [want_logps[i] for i in shorter],
                             atol=1e-5)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_ld_alpha_out_of_range_is_a_config_error(value):
  c = config_lib.dpo()
  c.model.path, c.data.train = "model", "pairs.jsonl"
  config_lib.validate(c)  # The defaults pass.
  c.dpo.ld_alpha = value
  with pytest.raises(UserError, match=r"config.dpo.ld_alpha must be in \[0, 1\]"):
    config_lib.validate(c)


@pytest.mark.parametrize("value", [-1, 128])
def test_max_prompt_length_outside_the_row_is_a_config_error(value):
  c = config_lib.dpo()
  c.model.path, c.data.train, c.data.max_length = "model", "pairs.jsonl", 128
  c.data.max_prompt_length = 127
  config_lib.validate(c)
  c.data.max_prompt_length = value
  with pytest.raises(UserError, match=r"config.data.max_prompt_length must be in \[0, "):
    config_lib.validate(c)


def test_lora_reference_is_exactly_the_base_model(tiny_llama):
  path, _ = tiny_llama
  base = hf.load(path, "causal_lm").model
  config = config_lib.dpo()
  config.lora.rank, config.lora.targets = 4, r".*/(q_proj|v_proj|down_proj)"
  tuned = trainable.with_adapters(hf.load(path, "causal_lm").model, config)
  for _, m in lora.linear_modules(tuned):  # Adapters that change the outputs.
    if m.lora_b is not None:
      m.lora_b[...] = jnp.full(m.lora_b[...].shape, 0.05, m.lora_b[...].dtype)
  batch = pair_batch()
  rows = dpo._rows(batch)
  # Both compiled: jit and eager round differently in the last bit.
  want = np.asarray(jax.jit(lambda m: lm_logps.token_logps(m, rows))(base))
  assert not np.allclose(np.asarray(lm_logps.token_logps(tuned, rows)), want, atol=1e-3)
  got = np.asarray(jax.jit(lambda m: lm_logps.token_logps(lora.without_adapters(m), rows))(tuned))
  np.testing.assert_array_equal(got, want)
  # The view shares the arrays and leaves the model's adapters on.
  assert all(m.lora_a is not None for p, m in lora.linear_modules(tuned) if "q_proj" in p)


def test_inline_reference_step_starts_at_half_accuracy(tiny_llama):
  """Policy = reference at step 0: every margin 0, accuracy 0.5, loss log 2."""
  path, _ = tiny_llama
  config = config_lib.dpo()
  config.lora.rank, config.lora.targets = 4, r".*/(q_proj|v_proj)"
  model = trainable.with_adapters(hf.load(path, "causal_lm").model, config)
  batch = pair_batch()
  logps, ref, counts = jax.jit(lambda m: dpo._forward(m, batch, True, None,
                                                      inline_reference=True))(model)
  losses, chosen, rejected = preference_loss.pair_losses(logps, ref, counts, loss="sigmoid",
                                                         beta=0.1)
  np.testing.assert_array_equal(np.asarray(chosen - rejected), 0.0)
  np.testing.assert_allclose(np.asarray(losses), np.log(2.0), rtol=1e-6)


def _grad_flops(path: str, last_layers: int) -> float:
  """FLOPs XLA compiles for the DPO loss's gradient in the adapters (inline reference)."""
  config = config_lib.dpo()
  config.lora.rank, config.lora.last_layers = 4, last_layers
  config.lora.targets = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
  model = trainable.with_adapters(hf.load(path, "causal_lm").model, config)
  graphdef, adapters, rest = nnx.split(model, layers.LoRAParam, ...)
  batch = {k: jnp.asarray(v) for k, v in pair_batch().items()}

  def loss(adapters):
    logps, ref, counts = dpo._forward(nnx.merge(graphdef, adapters, rest), batch, True, None,
                                      inline_reference=True)
    return preference_loss.pair_losses(logps, ref, counts, loss="sigmoid", beta=0.1)[0].sum()
  flops, _ = inspect.compiled_costs(jax.jit(jax.grad(loss)).lower(adapters).compile())
  return flops


def test_reference_shares_the_unadapted_layers_forward_with_the_policy(tiny_llama_4_layers):
  """Adapters on the last of 4 layers: the 3 below run once for policy and reference.

  Counted on the compiled program, not timed. Everywhere: forward, backward and
  the reference's forward, about 3 forward passes. Last layer only: 3/4 of a
  forward shared, then the top layer twice and its backward, about 1.5 (0.45
  measured); without the sharing (XLA's CSE pass off) it would be 2.25 (0.64).
  """
  path = tiny_llama_4_layers
  ratio = _grad_flops(path, last_layers=1) / _grad_flops(path, last_layers=0)
  assert ratio < 0.55, ratio


# --- a DPO run: tiny random Llama with SmolLM2's tokenizer, real HH pairs -------------------


@pytest.fixture(scope="module")
def tiny_pairs(tiny_chat_lm, tmp_path_factory):
  """root/model (tiny Llama), root/train.jsonl (16 real HH pairs), root/eval.jsonl (6)."""
  from tests.helpers import ROOT
  root = tmp_path_factory.mktemp("tiny_pairs")
  lines = (ROOT / "data" / "hh-rlhf-harmless" / "train.jsonl").read_text().splitlines()
  (root / "train.jsonl").write_text("\n".join(lines[:16]) + "\n")
  (root / "eval.jsonl").write_text("\n".join(lines[16:22]) + "\n")
  return root


def tiny_dpo_config(tiny_chat_lm, root, **dpo):
  from jaxft import defaults
  c = defaults.recipe("dpo")
  c.model.path = str(tiny_chat_lm / "model")
  c.data.train, c.data.eval = str(root / "train.jsonl"), str(root / "eval.jsonl")
  c.data.max_length = 64
  c.lora.rank = 4
  c.train.update(batch_size=8, num_steps=6, log_every=1, eval_batch_size=8)
  c.optim.update(lr=1e-2, warmup_frac=0.0, schedule="constant")
  c.checkpoint.every = 0
  c.dpo.update(dpo)
  return c


def test_dpo_run_raises_preference_accuracy_logs_trl_metrics_and_evals_again(
    tiny_chat_lm, tiny_pairs, tmp_path):
  from jaxft import commands
  from jaxft import train
  # Held-out = train here: a 6-step run on a random tiny model shows the mechanics, not
  # generalisation (the recipe's held-out numbers are in bench/RESULTS.md).
  config = tiny_dpo_config(tiny_chat_lm, tiny_pairs)
  config.data.eval = config.data.train
  (tmp_path / "fresh").mkdir()
  before = commands.eval_command(config, str(tmp_path / "fresh"))
  assert before["preference_accuracy"] == 0.5 and before["reward_margin"] == 0.0
  assert before["loss"] == pytest.approx(np.log(2.0), rel=1e-6)
  result = train.train(config, str(tmp_path / "run"))
  assert result["step"] == 6 and result["pairs"] == 16
  assert result["preference_accuracy"] > 0.8 and result["reward_margin"] > 0
  assert result["loss"] < np.log(2.0)
  lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").open()]
  train_keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected"}
  assert train_keys <= set(lines[0])
  again = commands.eval_command(config, str(tmp_path / "run"))
  assert again["preference_accuracy"] == result["preference_accuracy"]
  assert again["reward_margin"] == pytest.approx(result["reward_margin"], rel=1e-5)
  _check_exports(config, tmp_path, tiny_chat_lm / "model", again["logps/chosen"])


def _check_exports(config, tmp_path, base, policy_logps):
  """A DPO run exports like SFT: the merged folder is the trained policy, the PEFT adapter
  over the base computes the same logits in transformers."""
  import peft
  from jaxft import commands
  merged, adapter = tmp_path / "merged", tmp_path / "adapter"
  commands.export_command(str(tmp_path / "run"), str(merged))
  commands.export_command(str(tmp_path / "run"), str(adapter), "peft", base_model=str(base))
  # jaxft reading the merged folder as a full model scores the eval pairs as the run did.
  full = config.copy_and_resolve_references()
  full.model.path, full.lora.rank = str(merged), 0
  (tmp_path / "fresh_full").mkdir()
  scored = commands.eval_command(full, str(tmp_path / "fresh_full"))
  assert scored["logps/chosen"] == pytest.approx(policy_logps, rel=1e-4)
  ids = torch.tensor([[1, 42, 7, 300, 5, 9]])
  want = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
  base_model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
  untuned = base_model(ids).logits
  assert not np.allclose(untuned.detach().numpy(), want.detach().numpy(), atol=1e-4)
  tuned = peft.PeftModel.from_pretrained(base_model, adapter).eval()
  np.testing.assert_allclose(tuned(ids).logits.detach().numpy(), want.detach().numpy(),
                             atol=1e-4, rtol=0)


def test_a_reference_free_loss_trains_and_evals_through_the_cli(tiny_chat_lm, tiny_pairs,
                                                                tmp_path):
  """ORPO needs no reference; `jaxft eval`'s last stdout line is the JSON of the contract."""
  from tests.helpers import ROOT, jaxft_in_process
  flags = [f"--config={ROOT / 'configs' / 'dpo.py'}", f"--workdir={tmp_path / 'w'}",
           f"--config.model.path={tiny_chat_lm / 'model'}",
           f"--config.data.train={tiny_pairs / 'train.jsonl'}",
           f"--config.data.eval={tiny_pairs / 'eval.jsonl'}", "--config.data.max_length=64",
           "--config.lora.rank=4", "--config.train.batch_size=4", "--config.train.num_steps=2",
           "--config.train.eval_batch_size=4", "--config.dpo.loss=orpo"]
  done = jaxft_in_process("train", *flags)
  assert done.returncode == 0, done.stderr[-2000:]
  done = jaxft_in_process("eval", *flags)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert {"preference_accuracy", "reward_margin", "loss", "step", "pairs"} <= set(result)
  assert result["step"] == 2 and result["pairs"] == 6 and np.isfinite(result["loss"])
  assert "reference log-probs" not in done.stderr


def test_full_fine_tune_precomputes_the_reference_from_the_base(tiny_chat_lm, tiny_pairs,
                                                                 tmp_path, capsys):
  from jaxft import train
  config = tiny_dpo_config(tiny_chat_lm, tiny_pairs)
  config.lora.rank = 0
  config.optim.lr = 1e-3
  config.train.num_steps = 2
  train.train(config, str(tmp_path / "run"))
  assert "reference log-probs of 22 pairs precomputed (the run's model)" in capsys.readouterr().err
  # Resumed after training: the base is read again, so the reference is unchanged.
  config.train.num_steps = 3
  result = train.train(config, str(tmp_path / "run"))
  assert f"precomputed ({config.model.path})" in capsys.readouterr().err
  assert result["step"] == 3


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "hi", "answer": "x"}], "chosen"),
    ([{"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"}], "assistant"),
    ([{"prompt": "hi", "chosen": "same", "rejected": "same"}], "same response"),
])
def test_bad_pair_files_exit_2_before_loading_the_model(tiny_chat_lm, tmp_path, rows, message):
  from tests.helpers import ROOT, jaxft_in_process
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  done = jaxft_in_process("train", f"--config={ROOT / 'configs' / 'dpo.py'}",
                          f"--workdir={tmp_path / 'w'}", f"--config.data.train={data}",
                          f"--config.model.path={tiny_chat_lm / 'model'}", "--config.data.eval=")
  assert done.returncode == 2, done.stderr
  assert message in done.stderr and "Traceback" not in done.stderr
  assert not (tmp_path / "w").exists()


def test_inspect_shows_no_second_copy_of_the_weights_with_lora(tiny_chat_lm, tiny_pairs):
  """The reference is the base with adapters off: DPO's parameters are SFT's plus adapters."""
  from jaxft import defaults
  config = tiny_dpo_config(tiny_chat_lm, tiny_pairs)
  sft = defaults.recipe("sft")
  sft.model.path, sft.data.train = config.model.path, config.data.train
  sft.data.max_length, sft.train.batch_size = 64, 8
  no_lora = inspect.inspect(sft)
  sft.lora = config.lora
  with_lora = inspect.inspect(sft)
  out = inspect.inspect(config)
  assert out["param_bytes"] == with_lora["param_bytes"]
  assert out["param_bytes"] == no_lora["param_bytes"] + 4 * out["params_trainable"]
  assert out["optimizer_state_bytes"] == with_lora["optimizer_state_bytes"]


def test_bench_dpo_heldout_equals_jaxft_eval_and_reuses_its_saved_reference(
    tiny_chat_lm, tiny_pairs, tmp_path, capsys):
  from bench import dpo_heldout  # pylint: disable=g-import-not-at-top
  from jaxft import commands
  from jaxft import train
  config = tiny_dpo_config(tiny_chat_lm, tiny_pairs)
  config.train.num_steps, config.checkpoint.every = 2, 2
  train.train(config, str(tmp_path / "run"))
  want = commands.eval_command(config, str(tmp_path / "run"))
  capsys.readouterr()
  ref = tmp_path / "ref.npy"
  for _ in range(2):  # Computes and writes the reference, then reads it back.
    assert dpo_heldout.main(["--pairs", config.data.eval, "--reference", str(ref),
                             f"{tmp_path / 'run'}:2"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["pairs"] == want["pairs"] == 6
    assert got["preference_accuracy"] == pytest.approx(want["preference_accuracy"], abs=1e-4)
    assert got["reward_margin"] == pytest.approx(want["reward_margin"], abs=1e-4)
    assert ref.exists()
  record = json.loads((tmp_path / "ref.npy.json").read_text())
  (tmp_path / "ref.npy.json").write_text(json.dumps({**record, "max_length": 7}))
  args = ["--pairs", config.data.eval, "--reference", str(ref), f"{tmp_path / 'run'}:2"]
  with pytest.raises(UserError, match="computed for other max_length"):
    dpo_heldout.main(args)
  (tmp_path / "ref.npy.json").unlink()
  with pytest.raises(UserError, match="saying what it was computed from"):
    dpo_heldout.main(args)
