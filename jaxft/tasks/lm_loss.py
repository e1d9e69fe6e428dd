"""Next-token cross-entropy from the final hidden states, without the full logits.

A causal-LM step's largest buffers are its logits ([batch, length, vocab]
float32: 400 MB for SmolLM2 at 8 x 256), their softmax and their gradient.
`loss_sum` never holds them: it scans over chunks of positions and, for
each, computes the chunk's logits, its summed loss and, in the same pass, the
gradients of that loss wrt the chunk's hidden states and the output weight.
The loss is the step's only output, so the backward pass merely scales those
by the incoming cotangent: the FLOPs of the unfused head (one forward, two
gradient matmuls), no recompute, and a chunk's logits as the largest
temporary. Gradients are computed only for the inputs being differentiated
(a frozen output layer costs no weight-gradient matmul).

On a mesh whose batch is split over devices, the weight is gathered once
before the chunk loop and each device sums its rows' share of the weight
gradient locally, across chunks, with one reduction after the loop. Left to
itself XLA gathers the whole weight and all-reduces the whole gradient in
every chunk (measured by the TPU compiler for Llama-3.1-8B over 64 v5p chips:
3.3 TB sent per chip per step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxft import sharding
from jaxft.models import layers

# Positions (rows x chunk length) per chunk: a 512 x 49,152 float32 chunk is
# 100 MB. Measured on a 2-core EPYC, SmolLM2's head fwd + bwd at 8 x 256:
# 2.26-2.42 s in chunks of 512, 2.45-2.80 s in 256 or 1,024, 2.5-2.7 s unfused.
CHUNK_POSITIONS = 512


def loss_sum(hidden: jax.Array, output: layers.OutputLayer, targets: jax.Array,
             valid: jax.Array) -> jax.Array:
  """Sum over `valid` positions of -log softmax(hidden @ W)[target].

  Args:
    hidden: [batch, length, features] final hidden states.
    output: the output layer's weight.
    targets: int [batch, length] token each position is scored on.
    valid: bool [batch, length] positions that count.
  """
  return _loss_sum(hidden, output.weight, targets.astype(jnp.int32), valid, output.vocab_major)


def _chunk_length(batch: int, length: int) -> int:
  """The longest divisor of `length` whose chunk holds at most CHUNK_POSITIONS positions."""
  most = max(1, CHUNK_POSITIONS // batch)
  return max(c for c in range(1, min(most, length) + 1) if length % c == 0)


def _chunks(x: jax.Array, c: int) -> jax.Array:
  """[batch, length, ...] -> [length / c, batch, c, ...]: the batch axis keeps its sharding."""
  return jnp.swapaxes(x.reshape(x.shape[0], x.shape[1] // c, c, *x.shape[2:]), 0, 1)


def _unchunk(x: jax.Array) -> jax.Array:
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _scan(hidden, weight, targets, valid, vocab_major, want_dh, want_dw):
  """(loss sum, d loss / d hidden or None, d loss / d weight or None)."""
  c = _chunk_length(*hidden.shape[:2])
  vocab = weight.shape[0 if vocab_major else 1]
  logits_spec = "bcd,vd->bcv" if vocab_major else "bcd,dv->bcv"
  dh_spec = "bcv,vd->bcd" if vocab_major else "bcv,dv->bcd"
  # dw: one partial sum per batch shard ("s"), summed after the loop.
  dw_spec = "sbcv,sbcd->svd" if vocab_major else "sbcv,sbcd->sdv"
  weight_axes = ("vocab", None) if vocab_major else (None, "vocab")
  weight = sharding.constrain(weight, weight_axes)  # Gathered once, not in every chunk.
  shards = sharding.logical_size("batch")
  if hidden.shape[0] % shards:
    shards = 1
  by_shard = lambda x: sharding.constrain(
      x.reshape(shards, x.shape[0] // shards, *x.shape[1:]),
      ("batch",) + (None,) * x.ndim)
  dw_axes = ("batch",) + weight_axes

  def body(dw, chunk):
    h, t, ok = chunk
    logits = jnp.einsum(logits_spec, h, weight, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    loss = jnp.sum(jnp.where(ok, lse - picked, 0.0))
    if not (want_dh or want_dw):
      return dw, (loss, None)
    # d(lse - picked) / d logits = softmax - one_hot(target), on valid positions.
    g = jnp.where(ok[..., None], jnp.exp(logits - lse[..., None])
                  - jax.nn.one_hot(t, vocab, dtype=jnp.float32), 0.0)
    dh = (jnp.einsum(dh_spec, g.astype(weight.dtype), weight,
                     preferred_element_type=jnp.float32).astype(hidden.dtype)
          if want_dh else None)
    if want_dw:
      dw = dw + sharding.constrain(
          jnp.einsum(dw_spec, by_shard(g.astype(h.dtype)), by_shard(h),
                     preferred_element_type=jnp.float32), dw_axes)
    return dw, (loss, dh)

  dw0 = (sharding.constrain(jnp.zeros((shards, *weight.shape), jnp.float32), dw_axes)
         if want_dw else None)
  dw, (losses, dh) = jax.lax.scan(
      body, dw0, (_chunks(hidden, c), _chunks(targets, c), _chunks(valid, c)))
  return (jnp.sum(losses), None if dh is None else _unchunk(dh),
          None if dw is None else dw.sum(0).astype(weight.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loss_sum(hidden, weight, targets, valid, vocab_major):
  return _scan(hidden, weight, targets, valid, vocab_major, False, False)[0]


def _loss_sum_fwd(hidden, weight, targets, valid, vocab_major):
  loss, dh, dw = _scan(hidden.value, weight.value, targets.value, valid.value, vocab_major,
                       hidden.perturbed, weight.perturbed)
  return loss, (dh, dw)


def _loss_sum_bwd(vocab_major, grads, cotangent):
  del vocab_major
  dh, dw = grads
  if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
    return None, None, None, None
  scale = lambda g: None if g is None else (g * cotangent).astype(g.dtype)
  return scale(dh), scale(dw), None, None


_loss_sum.defvjp(_loss_sum_fwd, _loss_sum_bwd, symbolic_zeros=True)


# --- per-position log-probs (preference and RL losses) ------------------------

def token_logps(hidden: jax.Array, output: layers.OutputLayer, targets: jax.Array) -> jax.Array:
  """float32 [batch, length]: log softmax(hidden @ W)[target] at every position.

  What `loss_sum` does for one summed loss, for losses that read each
  position's log-prob (DPO, GRPO): chunked over positions, never the whole
  logits. The forward pass also keeps d logp / d hidden per position
  ([batch, length, features]), so the backward pass is a scaling when the
  output weight is frozen (LoRA, a frozen head); a trained weight's gradient
  recomputes each chunk's logits once, with the cotangent known.
  """
  return _token_logps(hidden, output.weight, targets.astype(jnp.int32), output.vocab_major)


def _logps_scan(hidden, weight, targets, vocab_major, want_dh):
  """(log-probs [batch, length], d logp / d hidden or None)."""
  c = _chunk_length(*hidden.shape[:2])
  logits_spec = "bcd,vd->bcv" if vocab_major else "bcd,dv->bcv"
  dh_spec = "bcv,vd->bcd" if vocab_major else "bcv,dv->bcd"
  vocab = weight.shape[0 if vocab_major else 1]
  weight = sharding.constrain(weight, ("vocab", None) if vocab_major else (None, "vocab"))

  def body(_, chunk):
    h, t = chunk
    logits = jnp.einsum(logits_spec, h, weight, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - lse
    if not want_dh:
      return None, (logp, None)
    g = jax.nn.one_hot(t, vocab, dtype=jnp.float32) - jnp.exp(logits - lse[..., None])
    dh = jnp.einsum(dh_spec, g.astype(weight.dtype), weight, preferred_element_type=jnp.float32)
    return None, (logp, dh.astype(h.dtype))

  _, (logps, dh) = jax.lax.scan(body, None, (_chunks(hidden, c), _chunks(targets, c)))
  return _unchunk(logps), None if dh is None else _unchunk(dh)


def _weight_grad(hidden, weight, targets, cotangent, vocab_major):
  """d (sum cotangent * logp) / d weight, one chunk of logits at a time."""
  c = _chunk_length(*hidden.shape[:2])
  logits_spec = "bcd,vd->bcv" if vocab_major else "bcd,dv->bcv"
  dw_spec = "bcv,bcd->vd" if vocab_major else "bcv,bcd->dv"
  vocab = weight.shape[0 if vocab_major else 1]

  def body(dw, chunk):
    h, t, ct = chunk
    logits = jnp.einsum(logits_spec, h, weight, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(logits, axis=-1)
    g = ct[..., None] * (jax.nn.one_hot(t, vocab, dtype=jnp.float32) - p)
    return dw + jnp.einsum(dw_spec, g.astype(h.dtype), h, preferred_element_type=jnp.float32), None

  dw, _ = jax.lax.scan(body, jnp.zeros(weight.shape, jnp.float32),
                       (_chunks(hidden, c), _chunks(targets, c), _chunks(cotangent, c)))
  return dw.astype(weight.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_logps(hidden, weight, targets, vocab_major):
  return _logps_scan(hidden, weight, targets, vocab_major, False)[0]


def _token_logps_fwd(hidden, weight, targets, vocab_major):
  logps, dh = _logps_scan(hidden.value, weight.value, targets.value, vocab_major,
                          hidden.perturbed)
  saved = (hidden.value, weight.value, targets.value) if weight.perturbed else None
  return logps, (dh, saved)


def _token_logps_bwd(vocab_major, residuals, cotangent):
  dh, saved = residuals
  if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
    return None, None, None
  d_hidden = None if dh is None else (dh * cotangent[..., None].astype(dh.dtype))
  d_weight = None if saved is None else _weight_grad(*saved, cotangent, vocab_major)
  return d_hidden, d_weight, None


_token_logps.defvjp(_token_logps_fwd, _token_logps_bwd, symbolic_zeros=True)
