"""Preference losses on sequence log-probs: DPO and its cousins, pure and jittable.

Every loss reads, per pair, the policy's summed log-probs of the chosen and
the rejected response, the reference model's (zeros for the reference-free
losses) and the response lengths in tokens. The formulas are the papers', as
TRL implements them:

- `sigmoid` (DPO, Rafailov et al. 2023): -log σ(β h), h = (π_c - ref_c) -
  (π_r - ref_r) on summed log-probs; with label smoothing ε (conservative DPO)
  -(1 - ε) log σ(β h) - ε log σ(-β h).
- `ipo` (Azar et al. 2023): (h - 1 / (2β))², on log-probs averaged over each
  response's tokens (as TRL does).
- `hinge` (SLiC, Zhao et al. 2023): max(0, 1 - β h).
- `simpo` (Meng et al. 2024), reference-free: -log σ(β (avg π_c - avg π_r) - γ),
  label smoothing as sigmoid; γ is config.dpo.simpo_gamma.
- `orpo` (Hong et al. 2024), reference-free: the chosen response's mean
  token NLL - β log σ(log odds_c - log odds_r), odds = p / (1 - p) of the
  per-token mean log-prob p; β is the paper's λ.

Rewards, the TRL way: β (policy - reference) log-probs for the losses with a
reference, β × the mean log-prob for the reference-free ones; both on the
same log-probs the loss uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.config import DPO_LOSSES as LOSSES
REFERENCE_FREE = ("simpo", "orpo")
_AVERAGED = ("ipo", "simpo", "orpo")  # Losses on per-token mean log-probs.


def pair_losses(logps: jax.Array, ref_logps: jax.Array, counts: jax.Array, *, loss: str,
                beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(loss, chosen reward, rejected reward), each [pairs].

  Args:
    logps: [pairs, 2] policy log-probs summed over each response (0 chosen, 1 rejected).
    ref_logps: [pairs, 2] the reference model's (ignored by reference-free losses).
    counts: [pairs, 2] response tokens (the divisor of the averaged losses).
    loss: one of LOSSES.
  """
  if loss in _AVERAGED:
    counts = jnp.maximum(counts, 1.0)
    logps, ref_logps = logps / counts, ref_logps / counts
  if loss in REFERENCE_FREE:
    ref_logps = jnp.zeros_like(ref_logps)
  chosen, rejected = beta * (logps[:, 0] - ref_logps[:, 0]), beta * (logps[:, 1] - ref_logps[:, 1])
  h = (logps[:, 0] - ref_logps[:, 0]) - (logps[:, 1] - ref_logps[:, 1])
  if loss == "sigmoid":
    out = _smoothed(beta * h, label_smoothing)
  elif loss == "ipo":
    out = (h - 1.0 / (2.0 * beta)) ** 2
  elif loss == "hinge":
    out = jax.nn.relu(1.0 - beta * h)
  elif loss == "simpo":
    out = _smoothed(beta * h - simpo_gamma, label_smoothing)
  elif loss == "orpo":
    log_odds = h - (_log1m_exp(logps[:, 0]) - _log1m_exp(logps[:, 1]))
    out = -logps[:, 0] - beta * jax.nn.log_sigmoid(log_odds)
  else:
    raise ValueError(f"unknown preference loss {loss!r}; one of {LOSSES}")
  return out, chosen, rejected


def _smoothed(z: jax.Array, label_smoothing: float) -> jax.Array:
  return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def _log1m_exp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, without the cancellation of the naive form."""
  return jnp.log(-jnp.expm1(jnp.minimum(x, -1e-7)))


def pair_metrics(logps: jax.Array, chosen: jax.Array, rejected: jax.Array) -> dict[str, jax.Array]:
  """Per-pair values of the metrics TRL logs (sum or average them over pairs).

  `rewards/accuracies` counts a tie (equal rewards, e.g. policy = reference)
  as half right.
  """
  margin = chosen - rejected
  return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": margin,
          "rewards/accuracies": jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0)),
          "logps/chosen": logps[:, 0], "logps/rejected": logps[:, 1]}
