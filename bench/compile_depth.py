"""Compile time of the train step against depth, with and without config.model.scan_layers.

Builds random BERTs of MiniLM's width (hidden 384, 12 heads, MLP 1536) at
each depth, and times tracing + lowering and XLA compilation of the real
train step (`run_lib.make_step_fn`, AdamW, batch 32 x 128) exactly as
`jaxft train` builds it. Nothing runs; nothing is downloaded.

  .venv/bin/python -m bench.compile_depth --layers 6 24
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import transformers

from jaxft import config as config_lib
from jaxft import tasks
from jaxft import run as run_lib


def compile_seconds(layers: int, scan: bool, batch: int = 32, length: int = 128
                    ) -> tuple[float, float]:
  """(trace + lower seconds, compile seconds) of the train step."""
  model_dir = tempfile.mkdtemp()
  transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=layers,
                          num_attention_heads=12, intermediate_size=1536
                          ).save_pretrained(model_dir)
  config = config_lib.base()
  config.model.update(path=model_dir, from_scratch=True, scan_layers=scan)
  config.data.max_length = length
  task = tasks.of(config)
  run = run_lib.open_run(config, tempfile.mkdtemp(), model_dir, ["a", "b"], quiet=True, task=task)
  step = run_lib.make_step_fn(config, run.split, run.tx, run.placement, task.objective)
  ids = np.ones((batch, length), np.int32)
  example = {"input_ids": ids, "attention_mask": ids, "token_type_ids": 0 * ids,
             "label": np.zeros((batch,), np.int32)}
  t0 = time.perf_counter()
  lowered = step.lower(run.state, example)
  t1 = time.perf_counter()
  lowered.compile()
  return t1 - t0, time.perf_counter() - t1


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, nargs="+", default=[6, 24])
  args = p.parse_args(argv)
  print("| scan_layers | layers | trace + lower s | compile s | total s |")
  print("|---|---|---|---|---|")
  for scan in (True, False):
    for layers in args.layers:
      lower, compile_ = compile_seconds(layers, scan)
      print(f"| {scan} | {layers} | {lower:.2f} | {compile_:.2f} | {lower + compile_:.2f} |",
            flush=True)


if __name__ == "__main__":
  main()
