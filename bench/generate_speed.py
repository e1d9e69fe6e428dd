"""Generation speed: jaxft generate vs transformers generate, same model, same CPU.

  .venv/bin/python bench/generate_speed.py [--gguf=PATH] [--new=128] [--repeats=3]

Greedy decoding of `--new` tokens for batch 1 and 8 (the same chat prompt
repeated), no early stop, fp32. Each side is warmed up once (jaxft: compile),
then timed `--repeats` times alternating; the median is reported. Also times
jaxft at a quarter of the new tokens, to show the per-token cost stays flat
with a preallocated KV cache.
"""

import argparse
import os
import statistics
import time

import numpy as np
import torch
import transformers

from jaxft import generate
from jaxft.formats import hf
from jaxft.formats import hub

DEFAULT_GGUF = ".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _time(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--gguf", default=DEFAULT_GGUF)
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  ours = hf.load(args.gguf, "causal_lm").model
  tok = hub.load_tokenizer(args.gguf)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf)).eval()
  text = generate.chat_prompt(tok, [{"role": "user", "content": "Tell me about the sea."}])
  print("| batch | new tokens | jaxft tokens/s | transformers tokens/s | ratio |")
  print("|---|---|---|---|---|")
  for batch in (1, 8):
    ids = np.asarray(tok([text] * batch, add_special_tokens=False)["input_ids"], np.int32)
    mask = np.ones_like(ids)
    pt_ids = torch.from_numpy(ids.astype(np.int64))

    def run_ours(new=args.new):
      generate.generate(ours, ids, mask, max_new_tokens=new, eos_ids=[])

    def run_theirs():
      with torch.no_grad():
        theirs.generate(pt_ids, attention_mask=torch.ones_like(pt_ids), do_sample=False,
                        max_new_tokens=args.new, min_new_tokens=args.new,
                        pad_token_id=tok.eos_token_id)

    run_ours(), run_theirs(), run_ours(args.new // 4)  # Warm-up and compile.
    ours_s = _time(run_ours, args.repeats)
    theirs_s = _time(run_theirs, args.repeats)
    quarter_s = _time(lambda: run_ours(args.new // 4), args.repeats)
    rate = lambda s, n=args.new: batch * n / s
    print(f"| {batch} | {args.new} | {rate(ours_s):.1f} | {rate(theirs_s):.1f} | "
          f"{theirs_s / ours_s:.2f}x |")
    print(f"| {batch} | {args.new // 4} (jaxft only) | {rate(quarter_s, args.new // 4):.1f} | | |")


if __name__ == "__main__":
  main()
