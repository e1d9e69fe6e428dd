"""GRPO's loss pieces against a NumPy transcription of the published formulas.

The reference is DeepSeekMath eq. 3 as TRL's GRPOTrainer computes it
(`_compute_loss`, loss_type="grpo"): advantages (r - mean) / (std + 1e-4)
with torch's unbiased std; per token -min(ratio A, clip(ratio) A) + beta k3;
the mean over a sequence's completion tokens, then over sequences. Gradients
are checked against central finite differences of that reference in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.errors import UserError
from jaxft.tasks import grpo_loss, lm_logps

EPS, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def _ref_advantages(rewards, group_size, eps=1e-4, scale=True):
  groups = rewards.reshape(-1, group_size).astype(np.float64)
  centred = groups - groups.mean(1, keepdims=True)
  if scale:
    centred = centred / (groups.std(1, ddof=1, keepdims=True) + eps)
  return centred.reshape(-1)


def _ref_token_loss(logps, old, ref, adv, eps_low, eps_high, beta):
  ratio = np.exp(logps - old)
  a = adv[:, None]
  loss = -np.minimum(ratio * a, np.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
  return loss + beta * (np.exp(ref - logps) - (ref - logps) - 1)


def _ref_loss(logps, old, ref, adv, mask, eps_low=EPS, eps_high=EPS_HIGH, beta=BETA):
  per_token = _ref_token_loss(logps, old, ref, adv, eps_low, eps_high, beta)
  counts = np.maximum(mask.sum(1), 1)
  return ((per_token * mask).sum(1) / counts).sum()


def _inputs(seed=0, batch=6, length=7):
  """Ratios inside and outside [1 - EPS, 1 + EPS_HIGH], both signs of A, masked tails."""
  rng = np.random.default_rng(seed)
  logps = rng.uniform(-4.0, -0.1, (batch, length))
  old = logps + rng.choice([-0.6, -0.1, 0.05, 0.15, 0.5], (batch, length)) \
      + rng.uniform(-0.02, 0.02, (batch, length))  # Far from the clip edges, for the FD check.
  ref = logps + rng.normal(0, 0.3, (batch, length))
  adv = np.array([1.3, -0.7, 0.0, 2.1, -1.5, 0.4])[:batch]
  lengths = np.array([length, 3, 5, 1, 0, 6])[:batch]
  mask = np.arange(length)[None, :] < lengths[:, None]
  return logps, old, ref, adv, mask


def _jax_loss(logps, old, ref, adv, mask, **kw):
  kw = {"epsilon": EPS, "epsilon_high": EPS_HIGH, "beta": BETA, **kw}
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return grpo_loss.clipped_objective(f32(logps), f32(old), None if ref is None else f32(ref),
                                     f32(adv), jnp.asarray(mask), **kw)


def test_group_advantages_match_the_reference_including_an_all_equal_group():
  rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.25], np.float32)
  for scale in (True, False):
    got = jax.jit(grpo_loss.group_advantages, static_argnums=(1, 3))(
        jnp.asarray(rewards), 4, 1e-4, scale)
    np.testing.assert_allclose(got, _ref_advantages(rewards, 4, scale=scale), rtol=1e-6,
                               atol=1e-6)
    assert np.all(np.asarray(got)[4:8] == 0.0)


def test_group_advantages_reject_partial_groups_and_groups_of_one():
  with pytest.raises(UserError, match="groups of 4"):
    grpo_loss.group_advantages(jnp.zeros(6), 4)
  with pytest.raises(UserError, match="at least 2"):
    grpo_loss.group_advantages(jnp.zeros(3), 1)
  np.testing.assert_array_equal(grpo_loss.group_advantages(jnp.ones(3), 1, scale=False), 0.0)


def test_token_logps_are_log_softmax_at_the_tokens():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, (2, 5, 11)).astype(np.float32)
  tokens = rng.integers(0, 11, (2, 5))
  shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  want = np.take_along_axis(log_softmax, tokens[..., None], -1)[..., 0]
  got = jax.jit(lm_logps.logps_at)(jnp.asarray(logits), jnp.asarray(tokens))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_kl_k3_matches_the_formula_and_is_zero_at_equal_logps():
  logps, _, ref, _, _ = _inputs()
  want = np.exp(ref - logps) - (ref - logps) - 1
  got = grpo_loss.kl_k3(jnp.asarray(logps, jnp.float32), jnp.asarray(ref, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got) >= 0)
  np.testing.assert_array_equal(grpo_loss.kl_k3(jnp.asarray(logps), jnp.asarray(logps)), 0.0)


def test_loss_and_metrics_match_the_reference():
  logps, old, ref, adv, mask = _inputs()
  loss, metrics = jax.jit(_jax_loss)(logps, old, ref, adv, mask)
  np.testing.assert_allclose(loss, _ref_loss(logps, old, ref, adv, mask), rtol=1e-6, atol=1e-6)
  counts = np.maximum(mask.sum(1), 1)
  per_seq = lambda x: ((x * mask).sum(1) / counts).sum()
  k3 = np.exp(ref - logps) - (ref - logps) - 1
  np.testing.assert_allclose(metrics["kl"], per_seq(k3), rtol=1e-6)
  ratio = np.exp(logps - old)
  a = adv[:, None]
  surrogate = np.minimum(ratio * a, np.clip(ratio, 1 - EPS, 1 + EPS_HIGH) * a)
  changed = ~np.isclose(surrogate, ratio * a, rtol=0, atol=1e-12)
  assert 0 < changed[mask].sum() < mask.sum()  # The inputs exercise both cases.
  np.testing.assert_allclose(metrics["clip_fraction"], per_seq(changed), rtol=1e-6)
  np.testing.assert_allclose(metrics["ratio"], per_seq(ratio), rtol=1e-6)


def test_symmetric_clip_and_no_kl_term():
  logps, old, ref, adv, mask = _inputs(seed=2)
  loss, metrics = _jax_loss(logps, old, None, adv, mask, epsilon_high=None, beta=0.0)
  want = _ref_loss(logps, old, ref, adv, mask, eps_high=EPS, beta=0.0)
  np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-6)
  assert "kl" not in metrics
  with pytest.raises(ValueError, match="ref_logps"):
    _jax_loss(logps, old, None, adv, mask)


def _finite_difference_grad(fn, x, h=1e-6):
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[i] += h
    down[i] -= h
    grad[i] = (fn(up) - fn(down)) / (2 * h)
  return grad


def test_gradient_matches_finite_differences_of_the_reference():
  logps, old, ref, adv, mask = _inputs()
  grad = jax.jit(jax.grad(lambda lp: _jax_loss(lp, old, ref, adv, mask)[0]))(
      jnp.asarray(logps, jnp.float32))
  want = _finite_difference_grad(lambda lp: _ref_loss(lp, old, ref, adv, mask), logps)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(grad)[~mask] == 0)


def test_gradient_at_ratio_one_is_minus_advantage_plus_kl():
  logps, _, ref, adv, mask = _inputs(seed=3)
  grad = jax.grad(lambda lp: _jax_loss(lp, lp, ref, adv, mask)[0])(
      jnp.asarray(logps, jnp.float32))
  counts = np.maximum(mask.sum(1, keepdims=True), 1)
  want = mask * (-adv[:, None] + BETA * (1 - np.exp(ref - logps))) / counts
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


def test_garbage_at_masked_positions_changes_nothing():
  logps, old, ref, adv, mask = _inputs()
  dirty = lambda x, v: np.where(mask, x, v)
  clean_loss, clean_grad = jax.value_and_grad(
      lambda lp: _jax_loss(lp, old, ref, adv, mask)[0])(jnp.asarray(logps, jnp.float32))
  loss, grad = jax.value_and_grad(
      lambda lp: _jax_loss(lp, dirty(old, -np.inf), dirty(ref, np.nan), adv, mask)[0])(
          jnp.asarray(dirty(logps, 80.0), jnp.float32))
  np.testing.assert_array_equal(loss, clean_loss)
  np.testing.assert_array_equal(grad, clean_grad)
