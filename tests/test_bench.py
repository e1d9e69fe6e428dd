"""bench/run.py: the side-by-side harness runs, and each row is the same job on both sides.

No timing assertions: these run on a shared 2-core machine; they check that
the numbers exist and are sane, not which side is faster.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest

from bench import rows as rows_lib
from bench import run as bench_run


# One timed step per side per round, two rounds; 1 torch thread so that a busy
# machine (OpenMP threads fighting for the cores) cannot stretch the test.
_FAST = ["--warmup", "1", "--steps", "1", "--rounds", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
  """(results, stdout, --json path) of the whole tiny suite, in this process."""
  out = tmp_path_factory.mktemp("bench")
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    results = bench_run.main(["--suite", "tiny", "--no-memory", *_FAST,
                              "--out", str(out / "table.md"), "--json", str(out / "rows.json")])
  return results, stdout.getvalue(), out


def test_tiny_suite_prints_both_sides_and_a_ratio(tiny_suite):
  results, text, out = tiny_suite
  assert {(r["row"], r["side"]) for r in results} == {
      (row.name, side) for row in rows_lib.TINY for side in ("jaxft", "torch")}
  header, _, *lines = [l for l in text.splitlines() if l.startswith("|")]
  columns = [c.strip() for c in header.strip("|").split("|")]
  assert "torch/jaxft" in columns and "compile s" in columns
  ratio = columns.index("torch/jaxft")
  for line in lines:
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] in ("jaxft", "torch")
    value = float(cells[ratio])
    assert math.isfinite(value) and value > 0
  for r in results:
    assert r["steps"] == 2 and all(t > 0 for t in r["times_s"])
    assert math.isfinite(r["mfu"]) and r["mfu"] > 0
    assert (r["compile_s"] > 0) if r["side"] == "jaxft" else r["compile_s"] is None
  assert (out / "table.md").read_text().startswith("| row |")
  assert "tiny-bert-lora" in (out / "rows.json").read_text()


def test_tiny_rows_train_the_same_parameters(tiny_suite):
  results, text, _ = tiny_suite
  counts: dict[str, dict[str, int]] = {}
  for r in results:
    counts.setdefault(r["row"], {})[r["side"]] = r["trainable"]
  assert set(counts) == {"tiny-bert-full", "tiny-bert-frozen", "tiny-bert-lora",
                         "tiny-llama-sft"}
  for row, sides in counts.items():
    assert sides["jaxft"] == sides["torch"], row
  # Freezing and LoRA each train fewer parameters than full fine-tuning.
  assert counts["tiny-bert-lora"]["jaxft"] < counts["tiny-bert-frozen"]["jaxft"] \
      < counts["tiny-bert-full"]["jaxft"]
  assert "WARNING" not in text


def test_memory_children_report_positive_peaks():
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    results = bench_run.main(["--suite", "tiny", "--rows", "tiny-llama-sft", "--warmup", "0",
                              "--steps", "1", "--rounds", "1", "--threads", "1"])
  assert [r["side"] for r in results] == ["jaxft", "torch"]
  for r in results:
    assert r["peak_mb"] is not None and r["peak_mb"] > 0, r


def test_gpu_rows_build_valid_jaxft_configs():
  rows = rows_lib.suite("gpu")
  assert {r.name for r in rows_lib.CPU} < {r.name for r in rows}
  for row in rows:
    config = rows_lib.jaxft_config(row, "/models/placeholder")  # validates
    assert config.train.batch_size == row.batch_size
    assert config.data.max_length == row.seq_len
    assert config.optim.schedule == "constant" and config.optim.weight_decay == 0.01
  big = rows_lib.suite("gpu", ["llama-1b-bf16"])[0]
  config = rows_lib.jaxft_config(big, "/models/placeholder")
  assert config.task == "causal_lm" and config.model.dtype == "bfloat16"
  assert config.data.max_length == 2048
  lora = rows_lib.jaxft_config(rows_lib.suite("gpu", ["minilm-lora"])[0], "/m")
  assert lora.lora.rank == 8 and lora.lora.alpha == 16.0


def test_set_overrides_every_row_and_rejects_unknown_keys():
  row = rows_lib.suite("tiny", ["tiny-bert-full"])[0]
  sets = [rows_lib.parse_set("train.batch_size=2"), rows_lib.parse_set("lora.rank=4")]
  config = rows_lib.jaxft_config(row, "/m", sets)
  assert config.train.batch_size == 2 and config.lora.rank == 4
  assert rows_lib.parse_set("model.dtype=bfloat16") == ("model.dtype", "bfloat16")
  with pytest.raises(KeyError, match="no_such_key"):
    rows_lib.jaxft_config(row, "/m", [rows_lib.parse_set("model.no_such_key=1")])
  with pytest.raises(ValueError, match="no rows"):
    rows_lib.suite("tiny", ["nope"])


def test_unseen_pairs_writes_exactly_the_rows_training_never_draws(tmp_path):
  from bench import unseen_pairs  # pylint: disable=g-import-not-at-top
  from jaxft import defaults  # pylint: disable=g-import-not-at-top
  from jaxft.tasks import base  # pylint: disable=g-import-not-at-top
  train = tmp_path / "pairs.jsonl"
  train.write_text("".join(f'{{"row": {i}}}\n' for i in range(40)))
  out = tmp_path / "unseen.jsonl"
  sets = ["--set", f"data.train={train}", "--set", "train.batch_size=4"]
  assert unseen_pairs.main(["--steps", "3", "--out", str(out), *sets]) == 0
  config = defaults.recipe("dpo")
  config.data.train, config.train.batch_size = str(train), 4
  task = base.Task(config)
  draw = task.train_batches(None, base.Data(train={"row": np.arange(40)}, eval=None))
  drawn = {int(r) for step in range(1, 4) for r in draw(step)["row"][:]}  # What training reads.
  written = [json.loads(l)["row"] for l in out.read_text().splitlines()]
  assert len(drawn) == 12 and not drawn & set(written)
  # Batches 0-3 (one more than the 3 steps read) of the first epoch: 16 distinct rows.
  assert written == sorted(written) and len(written) == 40 - 16


@pytest.mark.parametrize("last_layers", [0, 1])
def test_torch_dpo_adapts_the_modules_jaxft_adapts(last_layers, tiny_llama_4_layers):
  """bench/torch_dpo.py's peft model has adapters on exactly jaxft's modules."""
  import transformers  # pylint: disable=g-import-not-at-top
  from bench import torch_dpo  # pylint: disable=g-import-not-at-top
  from jaxft import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxft.formats import hf  # pylint: disable=g-import-not-at-top
  from jaxft.tuning import lora  # pylint: disable=g-import-not-at-top
  from jaxft.tuning import trainable  # pylint: disable=g-import-not-at-top
  config = config_lib.dpo()
  config.lora.rank, config.lora.last_layers = 4, last_layers
  config.lora.targets = r".*/(q_proj|v_proj|down_proj)"
  model = trainable.with_adapters(hf.load(tiny_llama_4_layers, "causal_lm").model, config)
  ours = sorted(p.replace("/", ".") for p, m in lora.linear_modules(model)
                if m.lora_a is not None)
  peft_model = torch_dpo.with_lora(
      transformers.LlamaForCausalLM.from_pretrained(tiny_llama_4_layers), config)
  theirs = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A")
                  for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
  assert theirs == ours and len(ours) == 3 * (4 if last_layers == 0 else 1)
