"""Checks a fine-tuned causal LM end to end: its HF export, in transformers, replies as jaxft does.

  python bench/lm_export_check.py --workdir=runs/sft [--out=runs/sft-hf] [--prompt=TEXT]

Exports the workdir's latest checkpoint (`jaxft export`), then compares the
greedy reply to a chat prompt of transformers' `generate` on the export with
`jaxft generate --workdir` and `jaxft generate --model=EXPORT`. Exit 1 if
they differ.
"""

import argparse
import subprocess
import sys

import torch
import transformers


def _jaxft_generate(source: str, prompt: str, tokens: int) -> str:
  out = subprocess.run(["jaxft", "generate", source, f"--prompt={prompt}",
                        f"--max_new_tokens={tokens}", "--temperature=0"],
                       capture_output=True, text=True, check=True).stdout
  return out.removesuffix("\n")


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", default=None, help="export folder (default: WORKDIR-hf)")
  p.add_argument("--prompt", default="hey! what did you do this weekend?")
  p.add_argument("--max_new_tokens", type=int, default=48)
  args = p.parse_args()
  out = args.out or args.workdir.rstrip("/") + "-hf"
  subprocess.run(["jaxft", "export", f"--workdir={args.workdir}", f"--out={out}"], check=True)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                         tokenize=False, add_generation_prompt=True)
  ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
  with torch.no_grad():
    tokens = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
  replies = {
      "transformers (export)": tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True),
      "jaxft --workdir": _jaxft_generate(f"--workdir={args.workdir}", prompt, args.max_new_tokens),
      "jaxft --model=export": _jaxft_generate(f"--model={out}", prompt, args.max_new_tokens),
  }
  for name, reply in replies.items():
    print(f"{name}: {reply!r}")
  same = len(set(replies.values())) == 1
  print("identical" if same else "DIFFERENT")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
