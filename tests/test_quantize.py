"""QLoRA (config.model.frozen_dtype int8 / nf4): blockwise quantization against a NumPy
reference, quantized runs that train and export dense, and the bytes SmolLM2 saves.

What is quantized: the kernel of every frozen Linear whose in_features is a multiple
of 64 (with LoRA: the base model's Linear layers), in blocks of 64 inputs per output
column with a float32 absmax scale each. Every other frozen parameter (embeddings,
norms, biases, other kernels) is stored in bfloat16; trainable ones stay float32.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from jaxft import config as config_lib
from jaxft import defaults
from jaxft import inspect
from jaxft import run as run_lib
from jaxft import train
from jaxft.errors import UserError
from jaxft.formats import hf
from jaxft.formats import peft as peft_export
from jaxft.formats import weights
from jaxft.models import layers
from jaxft.tuning import lora
from jaxft.tuning import param_paths
from jaxft.tuning import quantize
from jaxft.tuning import trainable

# QLoRA's NormalFloat4 levels (Dettmers et al. 2023, appendix E), typed from the paper.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


# --- a NumPy reference -------------------------------------------------------

def _ref_quantize(w: np.ndarray, kind: str, block: int = 64):
  """(codes as stored, absmax per block): blocks of `block` rows per column of (in, out)."""
  rows, cols = w.shape
  x = w.astype(np.float32).reshape(rows // block, block, cols)
  absmax = np.abs(x).max(axis=1)
  normed = (x / np.where(absmax == 0, 1, absmax)[:, None]).reshape(rows, cols)
  if kind == "int8":
    return np.clip(np.rint(normed * 127), -127, 127).astype(np.int8), absmax
  codes = np.abs(normed[..., None] - NF4).argmin(axis=-1).astype(np.uint8)
  return (codes[0::2] << 4) | codes[1::2], absmax  # Row 2i high nibble, as bitsandbytes.


def _ref_dequantize(data: np.ndarray, absmax: np.ndarray, kind: str, block: int = 64):
  if kind == "int8":
    values = data.astype(np.float32) / 127
  else:
    codes = np.empty((2 * data.shape[0], data.shape[1]), np.uint8)
    codes[0::2], codes[1::2] = data >> 4, data & 0xF
    values = NF4[codes]
  return values * np.repeat(absmax, block, axis=0)


def _weights(shape=(256, 96), seed=0):
  """Kernel-like values: normal, with a few outliers and an all-zero block."""
  rng = np.random.default_rng(seed)
  w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
  w[rng.integers(0, shape[0], 8), rng.integers(0, shape[1], 8)] = 0.5
  w[64:128, 3] = 0.0
  return w


# --- the numbers -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantize_and_dequantize_match_the_numpy_reference(kind):
  w = _weights()
  data, scale = quantize.quantize(jnp.asarray(w), kind)
  ref_data, ref_scale = _ref_quantize(w, kind)
  assert data.dtype == ref_data.dtype and data.shape == ref_data.shape
  assert scale.dtype == jnp.float32 and scale.shape == (4, 96)
  np.testing.assert_array_equal(np.asarray(scale), ref_scale)
  np.testing.assert_array_equal(np.asarray(data), ref_data)
  dense = np.asarray(quantize.dequantize(data, scale, kind))
  np.testing.assert_allclose(dense, _ref_dequantize(ref_data, ref_scale, kind), rtol=1e-6, atol=0)
  np.testing.assert_array_equal(dense[64:128, 3], 0.0)  # The zero block stays zero.
  # The same kernel quantizes to the same bits again (resume re-quantizes the base).
  again = quantize.quantize(jnp.asarray(w), kind)
  np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(data))


@pytest.mark.parametrize("kind, max_step, rel_rms, rel_matmul", [
    # Half a step of the block's absmax / 127; half NF4's widest gap, (1 - 0.6962) / 2.
    ("int8", 0.5 / 127, 0.01, 0.01),
    ("nf4", np.diff(NF4).max() / 2, 0.12, 0.12),
])
def test_quantization_error_is_bounded_and_the_matmul_matches_the_reference(
    kind, max_step, rel_rms, rel_matmul):
  w = _weights()
  data, scale = quantize.quantize(jnp.asarray(w), kind)
  dense = np.asarray(quantize.dequantize(data, scale, kind))
  absmax = np.repeat(np.asarray(scale), 64, axis=0)
  assert np.all(np.abs(dense - w) <= max_step * absmax + 1e-7)
  normal = absmax < 0.4  # Blocks without an outlier: N(0, 0.02) only.
  assert np.sqrt(np.mean((dense - w)[normal] ** 2)) <= rel_rms * 0.02
  x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
  linear = layers.Linear(256, 96, use_bias=False, rngs=nnx.Rngs(0))
  linear.kernel.set_value(jnp.asarray(w))
  linear.quantize(kind)
  ours = np.asarray(linear(jnp.asarray(x)))
  ref = x.astype(np.float64) @ _ref_dequantize(*_ref_quantize(w, kind), kind)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  exact = x.astype(np.float64) @ w
  assert np.linalg.norm(ours - exact) <= rel_matmul * np.linalg.norm(exact)


def test_a_quantized_linear_keeps_its_axes_and_quantizes_abstractly_alike():
  concrete = layers.Linear(128, 64, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
  abstract = nnx.eval_shape(lambda: layers.Linear(128, 64, axes=("embed", "mlp"),
                                                  rngs=nnx.Rngs(0)))
  for m in (concrete, abstract):
    m.quantize("nf4")
    assert m.kernel.get_metadata()["logical_axes"] == ("embed", "mlp")
    assert m.kernel_scale.get_metadata()["logical_axes"] == ("embed", "mlp")
  shapes = lambda m: [(v.get_value().shape, v.get_value().dtype) for _, v in
                      param_paths.named_variables(nnx.state(m, nnx.Param))]
  assert shapes(concrete) == shapes(abstract) == [
      ((64,), jnp.float32), ((64, 64), jnp.uint8), ((2, 64), jnp.float32)]
  with pytest.raises(ValueError, match="blocks of 64"):
    quantize.quantize(jnp.zeros((96, 8)), "nf4")


# --- the split: what is quantized, scanned layers ----------------------------

def _tiny_llama_config(**overrides):
  # intermediate_size 96: down_proj's inputs do not split into blocks of 64.
  return transformers.LlamaConfig(**{
      "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
      "tie_word_embeddings": True, **overrides})


def _lora_config(kind, scan=False):
  c = defaults.recipe("sft")
  c.lora.update(rank=4, alpha=8.0, targets=r".*/(q_proj|v_proj)")
  c.model.update(frozen_dtype=kind, scan_layers=scan)
  return c


def _split_logits(kind, scan):
  model = hf.build_model(_tiny_llama_config(), "causal_lm", seed=0)
  config = _lora_config(kind, scan)
  split = trainable.split(trainable.with_adapters(model, config), config)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
  return split, np.asarray(split.merge(split.params, split.frozen)(ids))


def test_split_quantizes_frozen_linear_kernels_and_stores_the_rest_in_bf16():
  split, logits = _split_logits("nf4", scan=False)
  frozen = dict(param_paths.named_variables(split.frozen))
  dtypes = {p: v.get_value().dtype for p, v in frozen.items()}
  layer = "model/layers/0"
  for name in ("self_attn/q_proj", "self_attn/k_proj", "mlp/gate_proj", "mlp/up_proj"):
    assert dtypes[f"{layer}/{name}/kernel"] == jnp.uint8
    assert dtypes[f"{layer}/{name}/kernel_scale"] == jnp.float32
    assert split.assignment.rule(f"{layer}/{name}/kernel_scale").trainable is False
  assert frozen[f"{layer}/mlp/gate_proj/kernel"].get_value().shape == (32, 96)
  assert dtypes[f"{layer}/mlp/down_proj/kernel"] == jnp.bfloat16  # 96 inputs: not quantized.
  assert dtypes["model/embed_tokens/embedding"] == jnp.bfloat16
  assert dtypes[f"{layer}/input_layernorm/scale"] == jnp.bfloat16
  params = param_paths.named_variables(split.params)
  assert params and all(v.get_value().dtype == jnp.float32 for _, v in params)
  # Sizes (the rules table, MFU) still count parameters, not stored bytes.
  assert split.sizes[f"{layer}/mlp/gate_proj/kernel"] == 64 * 96
  dense = _split_logits("float32", scan=False)[1]
  assert np.linalg.norm(logits - dense) <= 0.15 * np.linalg.norm(dense)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_scanned_layers_stack_the_quantized_state_and_compute_the_same(kind):
  split, scanned = _split_logits(kind, scan=True)
  frozen = dict(param_paths.named_variables(split.frozen))
  kernel = frozen["model/layers/stacked/mlp/up_proj/kernel"]
  rows = 32 if kind == "nf4" else 64
  assert kernel.get_value().shape == (2, rows, 96)
  assert kernel.get_metadata()["logical_axes"][0] is None
  assert frozen["model/layers/stacked/mlp/up_proj/kernel_scale"].get_value().shape == (2, 1, 96)
  np.testing.assert_allclose(scanned, _split_logits(kind, scan=False)[1], atol=1e-5, rtol=0)


def test_an_unknown_frozen_dtype_is_a_clear_error():
  c = defaults.recipe("sft")
  c.model.frozen_dtype = "int4"
  with pytest.raises(UserError, match="model.frozen_dtype must be one of"):
    config_lib.validate(c)


# --- end to end: a tiny QLoRA run trains and exports dense -------------------

@pytest.fixture(scope="module")
def tiny_bert64(tmp_path_factory, minilm_path):
  """A tiny random BERT 64 wide (its kernels quantize; the 96-input ones do not), without
  dropout, with MiniLM's tokenizer; 8 review snippets, 4 of each class."""
  root = tmp_path_factory.mktemp("tiny_qlora")
  config = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=96,
                                   max_position_embeddings=64, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0,
                                   # Wider than HF's 0.02: the [CLS] state then depends on
                                   # the text, so 6 steps can lower the loss.
                                   initializer_range=0.2)
  torch.manual_seed(0)
  transformers.BertModel(config).save_pretrained(root / "model")
  transformers.AutoTokenizer.from_pretrained(minilm_path).save_pretrained(root / "model")
  rows = [json.loads(l) for l in open(defaults.recipe("classify").data.train, encoding="utf-8")]
  rows = [r for r in rows if r["label"] == "positive"][:4] + [
      r for r in rows if r["label"] != "positive"][:4]
  (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return root


def _run_config(root, kind):
  """LoRA (rank 4 on query / value) over a `kind` base; every step sees all 8 examples."""
  c = defaults.recipe("classify")
  c.model.update(path=str(root / "model"), frozen_dtype=kind, scan_layers=True)
  c.data.update(train=str(root / "train.jsonl"), eval="", max_length=16)  # No eval to compile.
  c.train.update(batch_size=8, num_steps=6, log_every=1, eval_batch_size=8)
  c.optim.update(lr=1e-2, warmup_steps=0, warmup_frac=0.0, schedule="constant")
  c.lora.update(rank=4, alpha=8.0)
  c.checkpoint.update(every=0)
  return c


@pytest.fixture(scope="module")
def qlora_runs(tiny_bert64, tmp_path_factory):
  """{kind: workdir} of a 6-step LoRA run over each quantized base."""
  out = {}
  for kind in ("int8", "nf4"):
    workdir = tmp_path_factory.mktemp(f"qlora_{kind}")
    train.train(_run_config(tiny_bert64, kind), str(workdir))
    out[kind] = workdir
  return out


def _restored(workdir):
  _, run, _ = run_lib.restore(str(workdir))
  return run


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_qlora_run_trains(qlora_runs, kind):
  events = [json.loads(l) for l in (qlora_runs[kind] / "metrics.jsonl").read_text().splitlines()]
  losses = [e["loss"] for e in events if e["split"] == "train"]
  assert len(losses) == 6 and all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0]  # The same 8 examples every step.
  run = _restored(qlora_runs[kind])
  frozen = dict(param_paths.named_variables(run.state["frozen"]))
  stacked = "encoder/layer/stacked/attention/self/query/kernel"
  assert frozen[stacked].get_value().dtype == (jnp.uint8 if kind == "nf4" else jnp.int8)
  # Gradients reached the adapters through the dequantized layers.
  params = dict(param_paths.named_variables(run.state["params"]))
  assert np.abs(np.asarray(params[stacked.replace("kernel", "lora_b")].get_value())).min() > 0


def test_qlora_export_is_dense_float32_and_gives_the_runs_logits(qlora_runs, tmp_path):
  workdir = str(qlora_runs["nf4"])
  config, run, model_path = run_lib.restore(workdir)
  tok = transformers.AutoTokenizer.from_pretrained(model_path)
  batch = {k: v.astype(np.int32) for k, v in tok(
      ["a gorgeous, witty film", "dull and far too long"], padding="max_length", max_length=16,
      return_tensors="np").items()}
  ours = np.asarray(run.model()(batch["input_ids"], batch["attention_mask"],
                                batch["token_type_ids"]))
  run.task.export(run, model_path, str(tmp_path / "hf"))  # What `jaxft export` does.
  tensors = load_file(str(tmp_path / "hf" / weights.SAFETENSORS))
  assert all(v.dtype == np.float32 for v in tensors.values())
  assert not any("scale" in k or "lora" in k for k in tensors)
  assert tensors["bert.encoder.layer.0.intermediate.dense.weight"].shape == (96, 64)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
  with torch.no_grad():
    theirs = model.eval()(**{k: torch.from_numpy(v.astype(np.int64))
                             for k, v in batch.items()}).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  # --format=peft: the adapters and the head, nothing of the quantized base.
  peft_export.export_peft(run.model(), run.hf_config, run.task.name, str(tmp_path / "peft"),
                          lora_config=config.lora, trainable=run.split.assignment.trainable(),
                          heads=run.task.fresh_heads(run.hf_config),
                          task_type=run.task.peft_task_type, base_model=model_path)
  adapter = load_file(str(tmp_path / "peft" / peft_export.PEFT_WEIGHTS))
  assert all(k.endswith(("lora_A.weight", "lora_B.weight")) or ".classifier." in k
             for k in adapter), sorted(adapter)
  assert all(v.dtype == np.float32 for v in adapter.values())


# --- SmolLM2-135M from shapes alone ------------------------------------------

def _bytes(split):
  """(param bytes as `jaxft inspect` reports them, bytes and params of the quantized kernels)."""
  frozen = dict(param_paths.named_variables(split.frozen))
  kernels = [p for p, v in frozen.items() if v.get_value().dtype == jnp.uint8]
  stored = sum(inspect.tree_bytes(frozen[p].get_value()) + inspect.tree_bytes(
      frozen[p + "_scale"].get_value()) for p in kernels)
  total = inspect.tree_bytes(split.params) + inspect.tree_bytes(split.frozen)
  return total, stored, sum(split.sizes[p] for p in kernels)


def test_smollm2_lora_nf4_stores_under_half_the_bytes_of_a_bf16_base(smollm2_path):
  """config.lora's default (rank 8 on q_proj / v_proj): the frozen Linear kernels, 106M
  of SmolLM2's 135M parameters, in nf4; the tied 28M embedding and the norms in bf16."""
  c = defaults.recipe("sft")
  c.model.update(path=smollm2_path, frozen_dtype="bfloat16")
  c.lora.rank = 8
  base = inspect.Model.of(c)  # Shapes only: the GGUF's metadata, no weights.
  c.model.frozen_dtype = "nf4"
  nf4 = trainable.split(trainable.abstract_model(base.hf_config, c, base.task.name), c)
  bf16_bytes = _bytes(base.split)[0]
  nf4_bytes, kernel_bytes, kernel_params = _bytes(nf4)
  assert kernel_params > 100e6
  assert kernel_bytes <= 0.3 * 2 * kernel_params  # 4.5 bits of 16: 0.28.
  assert nf4_bytes <= 0.45 * bf16_bytes
  assert sum(nf4.sizes.values()) == sum(base.split.sizes.values())  # Parameters, not bytes.


def test_loading_quantizes_each_kernel_as_it_is_read_exactly_as_quantizing_after(tiny_bert64):
  path = str(tiny_bert64 / "model")
  dense = hf.load(path, "classify", num_labels=2)
  kinds = {p: "nf4" for p, m in lora.linear_modules(dense.model) if quantize.fits(m.in_features)}
  assert kinds and len(kinds) < len(lora.linear_modules(dense.model))  # 96-input ones stay.
  loaded = hf.load(path, "classify", num_labels=2, quantized=kinds)
  assert loaded.report.missing == dense.report.missing  # Scales are not "missing".
  modules = dict(lora.linear_modules(loaded.model))
  assert not modules["classifier"].quantized  # Not in the checkpoint: initialised dense.
  for p, m in lora.linear_modules(dense.model):
    if p in kinds and p != "classifier":
      m.quantize("nf4")
  want = dict(param_paths.named_variables(nnx.state(dense.model, nnx.Param)))
  got = dict(param_paths.named_variables(nnx.state(loaded.model, nnx.Param)))
  assert got.keys() == want.keys()
  for p in want:
    np.testing.assert_array_equal(np.asarray(got[p].get_value()),
                                  np.asarray(want[p].get_value()), err_msg=p)
