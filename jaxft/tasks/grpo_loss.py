"""The GRPO objective (DeepSeekMath, Shao et al. 2024, eq. 3), as pure jittable functions.

A batch holds G sampled completions of each prompt, adjacent (prompt-major).
Each completion's reward is turned into an advantage relative to its group
(`group_advantages`); every completion token then gets PPO's clipped
surrogate loss with that advantage, plus beta times a per-token estimate of
KL(policy || reference) (`kl_k3`). Following the paper, a sequence's loss is
the mean over its completion tokens, and the batch loss the mean over
sequences; `clipped_objective` returns the sum over sequences so that the
caller can divide by the sequence count of the whole global batch (exact
under gradient accumulation). Formulas match TRL's `GRPOTrainer` with
`loss_type="grpo"`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.errors import UserError


def group_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-4,
                     scale: bool = True) -> jax.Array:
  """Each reward relative to its group: (r - group mean) / (group std + eps).

  The std is the unbiased sample std (ddof=1), as torch's `.std()` that TRL
  uses. A group of equal rewards gets advantage 0 (no signal, no NaN).

  Args:
    rewards: [num_prompts * group_size], the group_size rewards of a prompt
      adjacent.
    group_size: completions per prompt (G), at least 2 when `scale`.
    eps: added to the std, so near-equal rewards do not blow up.
    scale: False only subtracts the group mean (Dr. GRPO, Liu et al. 2025),
      which does not favour groups whose rewards barely differ.

  Returns:
    float32 advantages, shaped like `rewards`.
  """
  if rewards.ndim != 1 or rewards.shape[0] % group_size:
    raise UserError(f"GRPO rewards {rewards.shape} are not a whole number of groups of "
                    f"{group_size}")
  if scale and group_size < 2:
    raise UserError("GRPO needs at least 2 completions per prompt to compare them "
                    f"(group size {group_size})")
  groups = rewards.astype(jnp.float32).reshape(-1, group_size)
  centred = groups - jnp.mean(groups, axis=1, keepdims=True)
  if scale:
    centred = centred / (jnp.std(groups, axis=1, ddof=1, keepdims=True) + eps)
  return centred.reshape(-1)


def kl_k3(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
  """Per-token k3 estimate of KL(policy || ref): exp(d) - d - 1, d = ref - logp.

  Schulman's unbiased, always non-negative estimator on policy samples.
  """
  d = ref_logps - logps
  return jnp.exp(d) - d - 1.0


def _per_sequence_mean(values: jax.Array, mask: jax.Array, count: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask, values, 0.0), axis=1) / count


def clipped_objective(logps: jax.Array, old_logps: jax.Array, ref_logps: jax.Array | None,
                      advantages: jax.Array, mask: jax.Array, *, epsilon: float,
                      epsilon_high: float | None, beta: float
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The GRPO loss, SUMMED over sequences; divide it by the number of sequences.

  Per token: -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)
  + beta * k3, with ratio = exp(logps - old_logps). Per sequence: the mean
  over its `mask` tokens (0 for a sequence without any). Gradients flow
  through `logps` only; `old_logps` and `ref_logps` are constants. With
  old_logps == logps (one update per batch) the gradient is exactly
  -A * d logp + beta * d k3.

  Args:
    logps: [B, T] the policy's log-probs of the completion tokens.
    old_logps: [B, T] those of the policy that sampled them.
    ref_logps: [B, T] those of the reference model; None when beta == 0.
    advantages: [B] one per sequence (`group_advantages`).
    mask: [B, T] bool, the completion tokens that count. Values at other
      positions are ignored, even inf or NaN.
    epsilon: lower clip range.
    epsilon_high: upper clip range (DAPO's clip-higher); None: epsilon.
    beta: weight of the KL penalty.

  Returns:
    (loss summed over sequences, {metric: summed over sequences}) with
    metrics "kl" (a sequence's mean k3; only with ref_logps), "clip_fraction"
    (its fraction of tokens where the clipped term was the smaller, so the
    token has no gradient from the surrogate) and "ratio" (its mean ratio).
  """
  if beta and ref_logps is None:
    raise ValueError("clipped_objective needs ref_logps when beta != 0")
  mask = mask.astype(bool)
  # Masked positions may hold garbage: zero them before exp, so neither the
  # loss nor its gradient (0 * inf) turns NaN.
  safe = lambda x: jnp.where(mask, x.astype(jnp.float32), 0.0)
  logps = safe(logps)
  old_logps = jax.lax.stop_gradient(safe(old_logps))
  high = epsilon if epsilon_high is None else epsilon_high
  adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))[:, None]
  ratio = jnp.exp(logps - old_logps)
  # Where the clipped term is the smaller of the two: it is a constant there.
  clipped = ((adv > 0) & (ratio > 1.0 + high)) | ((adv < 0) & (ratio < 1.0 - epsilon))
  surrogate = jnp.where(clipped, jnp.clip(ratio, 1.0 - epsilon, 1.0 + high), ratio) * adv
  per_token = -surrogate
  count = jnp.maximum(jnp.sum(mask, axis=1), 1).astype(jnp.float32)
  metrics = {"clip_fraction": jnp.sum(_per_sequence_mean(clipped.astype(jnp.float32), mask,
                                                         count)),
             "ratio": jnp.sum(_per_sequence_mean(jax.lax.stop_gradient(ratio), mask, count))}
  if ref_logps is not None:
    kl = kl_k3(logps, jax.lax.stop_gradient(safe(ref_logps)))
    metrics["kl"] = jnp.sum(_per_sequence_mean(jax.lax.stop_gradient(kl), mask, count))
    if beta:
      per_token = per_token + beta * kl
  loss = jnp.sum(_per_sequence_mean(per_token, mask, count))
  return loss, metrics
