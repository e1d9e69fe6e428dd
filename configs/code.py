"""Code SFT: fine-tune a causal LM on prompt -> solution pairs, eval by pass@1.

Default: SmolLM2-135M-Instruct (as configs/sft.py) on the bundled HumanEval
split (data/humaneval: 123 train problems, the signature + docstring as the
prompt and the canonical solution as the completion; 41 held-out problems).
Eval generates one greedy completion per held-out problem (cut at the usual
HumanEval stop strings) and runs it against the problem's tests in a fresh
Python subprocess with a timeout: pass@1. Measured 2026-11-25 on 2 CPU
cores, fp32: pass@1 on the 41 held-out problems goes from 0/41 (the
pretrained model) to 3/41 = 0.073, and the completion loss from 1.323 to
0.844, in 9 min 39 s of wall time for `jaxft train` (30 steps of 4 packed rows
of 512 tokens; eval included).

  jaxft train --config=configs/code.py --workdir=runs/code
  jaxft eval --config=configs/code.py --workdir=runs/code   # pass@1, loss, perplexity

This runs model-written code on your machine (each program in an empty temp
folder, isolated interpreter, timeout); run it where that is acceptable.
"""

import os

import ml_collections

from jaxft import config as jaxft_config
from jaxft import defaults
from jaxft.tasks import lm_metrics

_ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
_DATA = os.path.join(_ROOT, "data", "humaneval")
def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the recipe; `arg` is unused (kept for the big_vision signature)."""
  del arg
  c = jaxft_config.causal_lm()
  c.model.path = defaults.smollm2()

  c.data.train = os.path.join(_DATA, "train.jsonl")
  c.data.eval = os.path.join(_DATA, "test.jsonl")
  c.data.max_length = 512
  c.data.packing = True

  c.eval.metric = "pass@1"
  c.eval.max_new_tokens = 192
  c.eval.stop = lm_metrics.CODE_STOPS
  c.eval.timeout = 10.0

  c.train.batch_size = 4
  c.train.num_steps = 30
  c.train.log_every = 5
  c.train.eval_batch_size = 8

  c.optim.lr = 5e-5
  c.optim.schedule = "cosine"
  c.optim.warmup_frac = 0.1
  c.optim.weight_decay = 0.0
  c.checkpoint.every = 0
  return c
