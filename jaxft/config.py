"""Config defaults, every vocabulary a config key takes, and validation with clear errors.

A recipe in `configs/` calls `base()` (or a task's variant) and sets what it
needs; `validate()` runs before anything is loaded or compiled, so a wrong
value fails in milliseconds with a message that names the key.

This module is a leaf: it imports no JAX, Flax or jaxft module, so a config
can be read and validated (by the CLI, bench, a notebook) without starting a
JAX backend. The modules that act on a key import its vocabulary from here.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import io
import json
import re
import sys
import tokenize
from typing import Any

import ml_collections

from jaxft.errors import UserError  # The one exception type; errors.py imports nothing.

# The values each enumerated key takes.
TASKS = ("classify", "causal_lm", "image_classify", "dpo", "grpo")  # config.task
DTYPES = ("float32", "bfloat16")  # model.dtype, model.frozen_dtype
QUANTIZED = ("int8", "nf4")  # model.frozen_dtype's quantized kinds (QLoRA; tuning/quantize.py)
FROZEN_DTYPES = DTYPES + QUANTIZED  # model.frozen_dtype
REMAT = ("none", "full", "dots")  # model.remat
ATTENTION = ("auto", "jaxft", "fused", "splash")  # model.attention
HOST_MEMORY = ("auto", "reuse", "release")  # train.host_memory
OPTIMIZERS = ("adamw", "sgd")  # optim.optimizer
SCHEDULES = ("linear", "cosine", "constant")  # optim.schedule, a rule's schedule
LOSS_ON = ("assistant", "last", "all")  # data.loss_on
EVAL_METRICS = ("", "pass@1", "rouge_l")  # eval.metric
EXPORT_FORMATS = ("hf", "peft", "gguf")  # jaxft export --format
GGUF_QUANTS = ("f16", "q8_0", "q4_0")  # jaxft export --format=gguf --quant (default f16)
BEST_MODES = ("auto", "max", "min")  # checkpoint.best_mode
ON_CORRUPT = ("fallback", "error")  # checkpoint.on_corrupt
# decision.target (tasks/clinical_metrics.py): "" keeps the most probable class.
DECISION_TARGETS = ("", "sensitivity", "specificity", "youden")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")  # dpo.loss (tasks/preference_loss.py)

# Keys a rule's dict value may hold, and the types they take.
RULE_KEYS = {"lr_mult": (int, float), "weight_decay": (int, float), "schedule": (str,),
             "warmup_steps": (int,), "start_step": (int,)}


def base() -> ml_collections.ConfigDict:
  """Defaults common to every recipe; each field is documented where it is set."""
  c = ml_collections.ConfigDict()
  # classify (text) | causal_lm (SFT, see causal_lm()) | image_classify (see
  # image_classify()) | dpo (preference pairs, see dpo()) | grpo (RL, see grpo()).
  c.task = "classify"

  c.model = ml_collections.ConfigDict()
  c.model.path = ""  # HF folder or hub id (causal_lm: also a .gguf file).
  c.model.dtype = "float32"  # Compute dtype; parameters stay float32.
  c.model.allow_pickle = False  # Read pytorch_model.bin (torch.load weights_only) if True.
  # Storage of frozen params (and LoRA bases): float32 | bfloat16 | int8 | nf4. int8 and nf4
  # (QLoRA) store frozen Linear kernels quantized in blocks of 64 inputs with a float32 scale
  # each (8.5 / 4.5 bits a weight), dequantized layer by layer in the step; every other
  # frozen param (embeddings, norms, biases, kernels of other widths) is then bfloat16.
  c.model.frozen_dtype = "float32"
  c.model.from_scratch = False  # Random init from config.json; the weights are not read.
  # How the layer stack runs (jaxft/models/stack.py); neither changes a result.
  c.model.scan_layers = False  # One lax.scan over the layers: compile time flat in depth.
  # auto (TPU: splash, GPU: fused, CPU: jaxft) | jaxft (einsum, dropout) | fused (cuDNN flash on
  # GPU, no dropout) | splash (Pallas kernel for causal LMs on TPU, no dropout).
  c.model.attention = "auto"
  c.model.remat = "none"  # Recompute activations in backward: none | full | dots (keep matmuls).

  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # csv/json/jsonl/parquet file, or a hub dataset name.
  c.data.train_split = "train"  # Split to read when `train` is a hub name.
  c.data.eval = ""  # Eval data, as `train`; "": no eval.
  c.data.eval_split = "test"  # Split to read when `eval` is a hub name.
  c.data.max_length = 128  # Tokens per example; every batch has this fixed shape.

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # Global batch: examples per optimizer update.
  c.train.grad_accum = 1  # Micro-batches per update; batch_size must divide by it.
  c.train.num_steps = 1000  # Optimizer updates in the run.
  c.train.eval_every = 0  # Steps between evals; 0: only at the end.
  c.train.log_every = 20  # Steps between train-metric lines in metrics.jsonl.
  c.train.seed = 0  # Seeds the head init, the data order and dropout.
  c.train.eval_batch_size = 64  # Examples per eval batch.
  c.train.prefetch = 2  # Batches built ahead on a background thread; 0: inline.
  c.train.compilation_cache = ""  # Folder for compiled programs (reruns skip compiling); "" off.
  # Freed host buffers: reuse (no per-step page faults on CPU) | release | auto
  # (reuse when JAX runs on the CPU). Process-wide; see jaxft/runtime/host_memory.py.
  c.train.host_memory = "auto"
  # Stop after this many evals in a row without a better checkpoint.best_metric (default: eval
  # loss); needs eval_every > 0. 0: never stop early.
  c.train.early_stop_patience = 0
  # A step whose loss or gradient norm is not finite is skipped (params and optimizer state
  # unchanged; metrics.jsonl counts skipped_steps); after this many in a row the run stops,
  # saved, with exit 2: a model that only makes NaNs needs a fix, not more steps. 0: never stop.
  c.train.max_skipped_steps = 10
  # k > 1: also skip a step whose loss exceeds k x the median of the last 32 applied losses
  # (once 8 are in), a bad batch or a blow-up kept out of the weights. 0: off.
  c.train.skip_spikes = 0.0

  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = "adamw"  # adamw | sgd.
  c.optim.lr = 5e-5  # Peak learning rate (after warmup).
  c.optim.schedule = "linear"  # Decay after warmup: linear | cosine | constant.
  c.optim.warmup_steps = 0  # If 0, warmup_frac of num_steps is used.
  c.optim.warmup_frac = 0.1  # Warmup as a fraction of num_steps.
  c.optim.weight_decay = 0.01  # AdamW decay; never applied to biases or LayerNorm.
  c.optim.b1 = 0.9  # Adam decay of the gradient mean.
  c.optim.b2 = 0.999  # Adam decay of the squared-gradient mean.
  c.optim.eps = 1e-8  # Adam denominator epsilon.
  c.optim.momentum = 0.0  # SGD momentum (optimizer=sgd only).
  c.optim.clip_norm = 1.0  # Global-norm gradient clipping; 0 turns it off.
  # Ordered (regex, value) pairs over param paths; first match wins. value:
  # None (frozen), a float (lr multiplier) or a dict (lr_mult, weight_decay,
  # schedule, warmup_steps, start_step). See jaxft/tuning/rules.py; () trains all.
  c.optim.rules = ()
  c.optim.layer_decay = 0.0  # If > 0: layer i of L gets lr x decay^(L-i).

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # > 0 adds LoRA adapters and freezes everything but them and the head.
  c.lora.alpha = 16.0  # Adapter output scale is alpha / rank.
  c.lora.dropout = 0.0  # On the adapter input, in training.
  c.lora.targets = r".*/(query|value|q_lin|v_lin|q_proj|v_proj)"  # Linear module paths (fullmatch).
  # > 0: only the targets in the last N layers of each layer stack (all if it has fewer).
  # Below the first adapted layer nothing trains, so the backward pass stops there, and
  # a reference with the adapters off (DPO, GRPO) shares those layers' forward pass.
  c.lora.last_layers = 0

  # Device mesh (see jaxft/sharding.py): data x fsdp x tensor must equal the
  # device count; one axis may be -1 to take the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # Replicas; the batch splits over data x fsdp.
  c.mesh.fsdp = -1  # Params, grads and optimizer state sharded (ZeRO-3 style).
  c.mesh.tensor = 1  # Megatron-style: attention heads and MLP columns split.
  c.mesh.rules = ()  # (logical axis, mesh axes) pairs overriding sharding.DEFAULT_RULES.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 0  # Steps between checkpoints; 0: only at the end.
  c.checkpoint.keep = 2  # How many recent checkpoints to keep.
  # An eval metric (accuracy, loss, ...): every eval step is then saved and the best one kept
  # beside the last `keep` (`jaxft export --step=best`). "": no best checkpoint.
  c.checkpoint.best_metric = ""
  c.checkpoint.best_mode = "auto"  # max | min | auto (min for losses and perplexity, else max).
  # When the newest checkpoint is unreadable (truncated, a file missing, bytes flipped):
  # "fallback" resumes from the newest intact one, moving the damaged ones to
  # DIR/checkpoints_corrupt/ (nothing is deleted); "error" stops with exit 2.
  c.checkpoint.on_corrupt = "fallback"
  c.decision = ml_collections.ConfigDict()
  # Two-class classifiers (class 1 the finding): choose the threshold on class 1's
  # probability at each training eval, on the eval split, for sensitivity | specificity
  # (>= decision.value) | youden (max sensitivity + specificity - 1); kept with that
  # checkpoint and used by `jaxft eval` on any data. "": 0.5 (the most probable class).
  c.decision.target = ""
  c.decision.value = 0.95  # The rate decision.target asks for.
  # Classifiers: per-class weights of the training loss, for imbalanced classes.
  # "balanced": n / (classes x count of the class) from the training labels (scikit-learn's
  # class_weight="balanced"); "w0,w1,...": one weight per class, in label order; "": none.
  # The loss is the weighted mean, as torch's CrossEntropyLoss(weight=).
  c.data.class_weights = ""

  # Where metrics go besides DIR/metrics.jsonl (always written), from process 0.
  c.log = ml_collections.ConfigDict()
  # TensorBoard event files in DIR/tensorboard/: metrics.jsonl's numbers, the eval PNGs and
  # LM samples (`tensorboard --logdir DIR/tensorboard`).
  c.log.tensorboard = True
  # Also log to Weights & Biases (needs `pip install wandb`); offline, into DIR/wandb/,
  # unless WANDB_MODE is set (`wandb sync` uploads an offline run).
  c.log.wandb = False

  return c


def causal_lm() -> ml_collections.ConfigDict:
  """`base()` for supervised fine-tuning of a causal LM (configs/sft.py and friends)."""
  c = base()
  del c.decision, c.data.class_weights  # A classifier's keys.
  c.task = "causal_lm"
  # Files with a `messages` column (chat), `prompt` + `completion`, or `text`.
  c.data.packing = True  # Several documents per row (segment ids keep them apart).
  c.data.loss_on = "assistant"  # assistant | last (final assistant turn) | all tokens.
  c.data.max_length = 512
  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 4  # Eval prompts whose generated replies go to DIR/samples/.
  c.eval.max_new_tokens = 64  # Tokens per sample reply (greedy).
  # "" | "pass@1" (eval rows have `test` and `entry_point`; runs the code) | "rouge_l":
  # computed on greedy completions of every eval prompt, all written to DIR/samples/.
  c.eval.metric = ""
  c.eval.stop = ()  # Strings that end a completion (e.g. tasks/lm_metrics.CODE_STOPS).
  c.eval.timeout = 10.0  # pass@1: seconds per program.
  return c


def dpo() -> ml_collections.ConfigDict:
  """`base()` for preference tuning of a causal LM on chosen / rejected pairs (configs/dpo.py)."""
  c = base()
  del c.decision, c.data.class_weights  # A classifier's keys.
  c.task = "dpo"
  # Pairs: `prompt` + `chosen` + `rejected` (strings, or chat messages), or `chosen` +
  # `rejected` whole conversations / "\n\nHuman: ... \n\nAssistant: ..." transcripts.
  # Tokens per response row (prompt + response): prompts are cut from the left,
  # responses from the right.
  c.data.max_length = 256
  # Prompt tokens kept at most (its end; 0: no own cap). The response is where DPO
  # learns: a short prompt cap leaves more of each row to the responses.
  c.data.max_prompt_length = 0
  c.train.batch_size = 8  # Pairs per optimizer update (2 rows each: chosen, rejected).
  c.dpo = ml_collections.ConfigDict()
  c.dpo.loss = "sigmoid"  # sigmoid (DPO) | ipo | hinge | simpo | orpo (the last two: no reference).
  # Scale of the implicit reward; ORPO's weight (lambda) of the odds-ratio term.
  c.dpo.beta = 0.1
  c.dpo.label_smoothing = 0.0  # sigmoid and simpo: assumed label-noise rate (cDPO), in [0, 0.5).
  c.dpo.simpo_gamma = 0.5  # simpo: the target reward margin.
  # LD-DPO (TRL's ld_alpha): weight of the longer response's tokens past the shorter's
  # length, in [0, 1]; 1 is plain DPO, 0 compares equally many tokens of each.
  c.dpo.ld_alpha = 1.0
  # Compute the reference's log-probs of every pair once, before training (always so
  # without LoRA; with LoRA the reference is otherwise the model with its adapters off).
  c.dpo.precompute_reference = False
  return c


def grpo() -> ml_collections.ConfigDict:
  """`base()` for RL of a causal LM with rewards a program checks: GRPO (configs/grpo.py)."""
  c = base()
  del c.decision, c.data.class_weights  # A classifier's keys.
  c.task = "grpo"
  # Prompts: `messages` (chat, up to the reply), `prompt` (chat-templated as one user
  # turn when the tokenizer has a template) or `question`; plus what the reward reads
  # (e.g. `answer`, or HumanEval's `test` and `entry_point`).
  c.data.max_length = 128  # Prompt tokens (cut from the left); completions add max_new_tokens.
  c.train.batch_size = 4  # Prompts per generated batch (x num_generations completions).
  c.grpo = ml_collections.ConfigDict()
  c.grpo.num_generations = 8  # Completions sampled per prompt: the group of the advantage.
  c.grpo.max_new_tokens = 64  # Tokens per completion (sampled and greedy at eval).
  c.grpo.temperature = 1.0  # Sampling temperature of the generated batches (> 0).
  c.grpo.top_p = 1.0  # Nucleus sampling of the generated batches.
  # numeric_match (the last number equals `answer`) | unit_tests (HumanEval `test`) |
  # package.module:function (fn(prompts, completions, records) -> list of floats; runs
  # in-process).
  c.grpo.reward = "numeric_match"
  c.grpo.beta = 0.04  # Weight of the KL to the reference (k3 estimator); 0: no reference.
  c.grpo.epsilon = 0.2  # Clip range of the policy ratio: [1 - epsilon, 1 + epsilon_high].
  c.grpo.epsilon_high = 0.2
  c.grpo.num_iterations = 1  # Policy updates (train steps) per generated batch.
  c.grpo.scale_rewards = True  # Divide group advantages by the group's reward std.
  c.grpo.timeout = 10.0  # unit_tests: seconds per program.
  return c


def image_classify() -> ml_collections.ConfigDict:
  """`base()` for image classification with a ViT (configs/vit.py)."""
  c = base()
  c.task = "image_classify"
  # Image folders (one subfolder per class), IDX files (*-images-idx3-ubyte[.gz]) or .npz.
  c.data.image_size = 0  # Pixels per side; 0: the checkpoint's preprocessor or config size.
  c.data.skip_bad = False  # Skip (and count) unreadable image files instead of failing.
  c.data.random_resized_crop = True  # Training augmentation, on the device.
  c.data.flip = True  # Random horizontal flips in training.
  c.data.crop_scale = (0.08, 1.0)  # Area fraction range of random resized crops.
  c.data.label_names = ()  # Class names for IDX files (whose labels are numbers).
  c.data.image_key = "image"  # Columns of table / hub data (parquet, json, `datasets`).
  c.data.label_key = "label"  # The label column of that data.
  return c


def _require(ok: bool, key: str, expected: str, value: Any) -> None:
  if not ok:
    raise UserError(f"config.{key} must be {expected}, got {value!r}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that the type system of ConfigDict cannot; raises UserError.

  Keys a task adds (image, generation) are checked where the config has them.
  """
  t, o, d = config.train, config.optim, config.data
  _require(config.get("task", "classify") in TASKS, "task", f"one of {TASKS}",
           config.get("task"))
  remat = config.model.get("remat", "none")
  _require(remat in REMAT, "model.remat", f"one of {REMAT}", remat)
  attention = config.model.get("attention", "auto")
  _require(attention in ATTENTION, "model.attention", f"one of {ATTENTION}", attention)
  if "image_size" in d:
    _require(d.image_size >= 0, "data.image_size", ">= 0 (0: the checkpoint's)", d.image_size)
  if "crop_scale" in d:
    _require(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
             "data.crop_scale", "(low, high) with 0 < low <= high <= 1", d.crop_scale)
  if "loss_on" in d:
    _require(d.loss_on in LOSS_ON, "data.loss_on", f"one of {LOSS_ON}", d.loss_on)
  if "eval" in config:
    e = config.eval
    _require(e.num_samples >= 0, "eval.num_samples", ">= 0", e.num_samples)
    _require(e.max_new_tokens > 0, "eval.max_new_tokens", "> 0", e.max_new_tokens)
    _require(e.metric in EVAL_METRICS, "eval.metric", f"one of {EVAL_METRICS}", e.metric)
  _require(bool(config.model.path), "model.path", "a checkpoint folder or hub id", config.model.path)
  _require(config.model.dtype in DTYPES, "model.dtype", f"one of {DTYPES}", config.model.dtype)
  _require(config.model.frozen_dtype in FROZEN_DTYPES, "model.frozen_dtype",
           f"one of {FROZEN_DTYPES}", config.model.frozen_dtype)
  _require(bool(d.train), "data.train", "a data file or hub dataset name", d.train)
  _require(d.max_length > 1, "data.max_length", "> 1", d.max_length)
  for key in ("batch_size", "grad_accum", "num_steps", "eval_batch_size"):
    _require(t[key] > 0, f"train.{key}", "> 0", t[key])
  for key in ("eval_every", "log_every"):
    _require(t[key] >= 0, f"train.{key}", ">= 0", t[key])
  policy = t.get("host_memory", "auto")
  _require(policy in HOST_MEMORY, "train.host_memory", f"one of {HOST_MEMORY}", policy)
  _require(t.batch_size % t.grad_accum == 0, "train.batch_size",
           f"divisible by train.grad_accum={t.grad_accum}", t.batch_size)
  _require(o.lr > 0, "optim.lr", "> 0", o.lr)
  _require(o.schedule in SCHEDULES, "optim.schedule", f"one of {SCHEDULES}", o.schedule)
  _require(0 <= o.warmup_frac < 1, "optim.warmup_frac", "in [0, 1)", o.warmup_frac)
  _require(o.warmup_steps >= 0, "optim.warmup_steps", ">= 0", o.warmup_steps)
  _require(o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
  _require(o.clip_norm >= 0, "optim.clip_norm", ">= 0", o.clip_norm)
  _require(o.optimizer in OPTIMIZERS, "optim.optimizer", f"one of {OPTIMIZERS}", o.optimizer)
  _require(0 <= o.momentum < 1, "optim.momentum", "in [0, 1)", o.momentum)
  _require(0 <= o.layer_decay <= 1, "optim.layer_decay", "in [0, 1] (0: off)", o.layer_decay)
  _require(isinstance(o.rules, (tuple, list)), "optim.rules", "a list of (regex, value)", o.rules)
  _require(config.checkpoint.every >= 0, "checkpoint.every", ">= 0", config.checkpoint.every)
  _require(config.checkpoint.keep > 0, "checkpoint.keep", "> 0", config.checkpoint.keep)
  mode = config.checkpoint.get("best_mode", "auto")
  _require(mode in BEST_MODES, "checkpoint.best_mode", f"one of {BEST_MODES}", mode)
  corrupt = config.checkpoint.get("on_corrupt", "fallback")
  _require(corrupt in ON_CORRUPT, "checkpoint.on_corrupt", f"one of {ON_CORRUPT}", corrupt)
  patience = t.get("early_stop_patience", 0)
  _require(patience >= 0, "train.early_stop_patience", ">= 0", patience)
  _require(not patience or t.eval_every > 0, "train.eval_every",
           "> 0 when train.early_stop_patience is set", t.eval_every)
  skips = t.get("max_skipped_steps", 10)
  _require(skips >= 0, "train.max_skipped_steps", ">= 0 (0: never stop)", skips)
  spikes = t.get("skip_spikes", 0.0)
  _require(spikes == 0 or spikes > 1, "train.skip_spikes", "0 (off) or > 1", spikes)
  validate_lora(config)
  rule_entries(o.rules)
  if "class_weights" in d:
    _require(_class_weights_ok(d.class_weights), "data.class_weights",
             '"", "balanced" or comma-separated weights > 0 (one per class)', d.class_weights)
  if "decision" in config:
    d = config.decision
    _require(d.target in DECISION_TARGETS, "decision.target", f"one of {DECISION_TARGETS}",
             d.target)
    _require(0 < d.value <= 1, "decision.value", "in (0, 1]", d.value)
  if "dpo" in config:
    _validate_dpo(config)
  if "grpo" in config:
    _validate_grpo(config)


def _validate_dpo(config: ml_collections.ConfigDict) -> None:
  p = config.dpo
  _require(p.loss in DPO_LOSSES, "dpo.loss", f"one of {DPO_LOSSES}", p.loss)
  _require(p.beta > 0, "dpo.beta", "> 0", p.beta)
  _require(0 <= p.label_smoothing < 0.5, "dpo.label_smoothing", "in [0, 0.5)", p.label_smoothing)
  _require(0 <= p.ld_alpha <= 1, "dpo.ld_alpha", "in [0, 1]", p.ld_alpha)
  d = config.data
  _require(0 <= d.max_prompt_length < d.max_length, "data.max_prompt_length",
           f"in [0, data.max_length={d.max_length})", d.max_prompt_length)


def _validate_grpo(config: ml_collections.ConfigDict) -> None:
  g = config.grpo
  _require(g.num_generations > 1, "grpo.num_generations", "> 1 (a group to compare)",
           g.num_generations)
  _require(g.max_new_tokens > 0, "grpo.max_new_tokens", "> 0", g.max_new_tokens)
  _require(g.temperature > 0, "grpo.temperature", "> 0 (the group must differ)", g.temperature)
  _require(0 < g.top_p <= 1, "grpo.top_p", "in (0, 1]", g.top_p)
  _require(g.beta >= 0, "grpo.beta", ">= 0", g.beta)
  _require(g.epsilon > 0 and g.epsilon_high > 0, "grpo.epsilon",
           "> 0 (and epsilon_high too)", (g.epsilon, g.epsilon_high))
  _require(g.num_iterations > 0, "grpo.num_iterations", "> 0", g.num_iterations)
  _require(bool(g.reward), "grpo.reward", "a built-in reward or module:function", g.reward)
  _require(not g.beta or lora_enabled(config), "grpo.beta",
           "0 without LoRA (the KL reference is the model with its adapters off; set "
           "config.lora.rank > 0)", g.beta)


def _class_weights_ok(text: str) -> bool:
  if text in ("", "balanced"):
    return True
  try:
    return all(float(w) > 0 for w in text.split(","))
  except ValueError:
    return False


def lora_enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the config asks for LoRA (`config.lora.rank > 0`)."""
  return "lora" in config and config.lora.rank > 0


def validate_lora(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for LoRA settings that cannot work."""
  if "lora" not in config:
    return
  c = config.lora
  if c.rank < 0:
    raise UserError(f"config.lora.rank must be >= 0 (0: no LoRA), got {c.rank}")
  if not lora_enabled(config):
    return
  if c.alpha <= 0:
    raise UserError(f"config.lora.alpha must be > 0, got {c.alpha}")
  if not 0 <= c.dropout < 1:
    raise UserError(f"config.lora.dropout must be in [0, 1), got {c.dropout}")
  if c.last_layers < 0:
    raise UserError(f"config.lora.last_layers must be >= 0 (0: every layer), "
                    f"got {c.last_layers}")
  try:
    re.compile(c.targets)
  except re.error as e:
    raise UserError(f"config.lora.targets is not a regex ({e}): {c.targets!r}") from e


def rule_entries(rules: Any) -> list[tuple[str, dict[str, Any], str]]:
  """`config.optim.rules` checked: [(regex, rule fields, "optim.rules[i]")].

  A value is None (frozen: {"trainable": False}), a number (an lr
  multiplier) or a dict of RULE_KEYS; UserError names the bad entry.
  """
  out = []
  for i, entry in enumerate(rules):
    where = f"optim.rules[{i}]"
    # A command-line value that Python cannot parse arrives as one string (the flag
    # parser keeps text it cannot read): say why it did not parse, not that it is no pair.
    attempt = isinstance(entry, str) and entry.lstrip().startswith(("(", "["))
    problem = literal_error(entry) if attempt else None
    if problem:
      raise UserError(f"config.optim.rules is not a Python literal ({problem})")
    if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str):
      raise UserError(f"config.{where} must be a (regex, value) pair, got {entry!r}")
    try:
      re.compile(entry[0])
    except re.error as e:
      raise UserError(f"config.{where}: {entry[0]!r} is not a regex ({e})") from e
    out.append((entry[0], _rule_fields(entry[1], where), where))
  return out


def _rule_fields(value: Any, where: str) -> dict[str, Any]:
  """Rule fields from a rule's value: None, a multiplier, or a dict."""
  if value is None:
    return {"trainable": False}
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = {"lr_mult": value}
  if not isinstance(value, (dict, ml_collections.ConfigDict)):
    raise UserError(f"config.{where}: value must be None (frozen), a float "
                    f"(lr multiplier) or a dict, got {value!r}")
  value = dict(value)
  for key, v in value.items():
    if key not in RULE_KEYS:
      raise UserError(f"config.{where}: unknown key {key!r}; allowed: {', '.join(RULE_KEYS)}")
    if isinstance(v, bool) or not isinstance(v, RULE_KEYS[key]):
      kind = {int: "an integer", float: "a number", str: "a string"}[RULE_KEYS[key][-1]]
      raise UserError(f"config.{where}: {key} must be {kind}, got {v!r}")
    if key != "schedule" and v < 0:
      raise UserError(f"config.{where}: {key} must be >= 0, got {v!r}")
  if value.get("schedule", "linear") not in SCHEDULES:
    raise UserError(f"config.{where}: schedule must be one of "
                    f"{SCHEDULES}, got {value['schedule']!r}")
  return {"trainable": True, **value}


def literal_error(text: str) -> str | None:
  """Why `text` is not a Python literal (as `--config.KEY=VALUE` takes one), or None if it is."""
  try:
    ast.literal_eval(text)
    return None
  except SyntaxError as e:
    return f"{e.msg} at column {e.offset}" if e.offset else e.msg
  except ValueError:
    # literal_eval names only the AST node; the offending name is what the user typed.
    names = [n for n in ast.walk(ast.parse(text, mode="eval"))
             if isinstance(n, (ast.Name, ast.Call, ast.Attribute))]
    return (f"{ast.unparse(names[0])} is not a literal; quote strings" if names
            else "not a literal value")


def unknown_key(config: ml_collections.ConfigDict, key: str) -> str | None:
  """`unknown config key KEY (did you mean KEY2?)` if `config` has no dotted `key`, else None.

  The suggestion is the closest name (difflib) among the keys of the sub-config
  where the path first goes wrong; no parenthesis when none is close.
  """
  parts = key.split(".")
  node: Any = config
  for i, part in enumerate(parts):
    if isinstance(node, ml_collections.ConfigDict) and part in node:
      node = node[part]
      continue
    close = (difflib.get_close_matches(part, list(node.keys()), n=1)
             if isinstance(node, ml_collections.ConfigDict) else [])
    if not close:
      return f"unknown config key {key}"
    guess = ".".join([*parts[:i], close[0], *parts[i + 1:]])
    if unknown_key(config, guess):  # The rest of the path is wrong too: suggest the prefix.
      guess = ".".join([*parts[:i], close[0]])
    return f"unknown config key {key} (did you mean {guess}?)"
  return None


def flat_items(config: ml_collections.ConfigDict | dict,
               prefix: str = "") -> list[tuple[str, Any]]:
  """[(dotted key, value)] for every leaf of `config` (or of its JSON dict), keys sorted."""
  out = []
  for key, value in sorted(config.items()):
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out += flat_items(value, f"{prefix}{key}.")
    else:
      out.append((prefix + key, value))
  return out


_ASSIGNMENT = re.compile(r"\s*c\.([\w.]+)\s*=[^=]")


def key_docs() -> dict[str, str]:
  """{dotted key: one-line doc}, read from the `#` comments of this file.

  The comments beside each `c.SECTION.KEY = ...` line above are the one
  source of the keys' docs: a key's doc is the comment ending its line, else
  the comment lines right above it, joined. The first documented setting of
  a key wins (`base()` before the task variants).
  """
  source = inspect.getsource(sys.modules[__name__])
  comments = {}  # line number -> (whether the comment has the line to itself, its text)
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      alone = not tok.line[:tok.start[1]].strip()
      comments[tok.start[0]] = (alone, tok.string.lstrip("#").strip())
  docs: dict[str, str] = {}
  for n, line in enumerate(source.splitlines(), 1):
    match = _ASSIGNMENT.match(line)
    if not match or docs.get(match.group(1)):
      continue
    alone, doc = comments.get(n, (True, ""))
    if alone:  # No comment ending the line: the block right above it.
      above, k = [], n - 1
      while comments.get(k, (False,))[0]:
        above.insert(0, comments[k][1])
        k -= 1
      doc = " ".join(above)
    docs[match.group(1)] = doc
  return docs


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON, as written to DIR/config.json."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def task_defaults(task: str) -> tuple[str, ml_collections.ConfigDict]:
  """(name, config) of jaxft's defaults for `task`: <task>() where this module has
  one (causal_lm, dpo, ...), else base() (classify)."""
  variant = globals().get(task) if task in TASKS else None
  if callable(variant):
    return f"jaxft.config.{task}()", variant()
  return "jaxft.config.base()", base()


def from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of `to_json`, for commands that read a workdir's config.

  Keys that jaxft added after the run was saved take their defaults (which keep
  the old behaviour), so `jaxft eval`, `export` and `chat` still open older workdirs.
  """
  saved = json.loads(text)
  _, defaults = task_defaults(saved.get("task", "classify"))
  return ml_collections.ConfigDict(_filled(defaults.to_dict(), saved))


def _filled(defaults: dict, saved: dict) -> dict:
  """`saved`, plus the keys of `defaults` it lacks (recursively)."""
  out = dict(saved)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict):
      out[key] = _filled(value, out[key])
  return out
