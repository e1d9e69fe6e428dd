"""SmolLM2-135M exported to GGUF at f16 / q8_0 / q4_0, read back by transformers (and llama.cpp).

  python -m bench.gguf_export [--workdir=DIR] [--out=FOLDER] [--prompt=TEXT]
                              [--llama_python=PYTHON]

Exports the latest checkpoint of a fine-tuned run (--workdir, as `jaxft export
--format=gguf`), or by default the base SmolLM2-135M-Instruct
(`jaxft.defaults.smollm2()`: $JAXFT_SMOLLM2 or the GGUF `make` fetched), at each
quant. For each file: its size and export time, the max |logit diff| of
transformers' GGUF loader (it dequantizes) against jaxft's model on a chat
prompt, and the greedy reply of both. --llama_python: an interpreter with
llama-cpp-python (not a jaxft dependency) that also reports llama.cpp's
tokenization, logit diff and reply for each file. Exit 1 if an f16 reply differs.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from jaxft import commands
from jaxft import defaults
from jaxft import generate
from jaxft import run as run_lib
from jaxft.formats import gguf_export
from jaxft.formats import hf
from jaxft.formats import hub
from jaxft.tuning import lora

# Run by --llama_python: argv = {"prompt", "ids", "logits" (.npy), "new_tokens"} as JSON,
# then the GGUF files; a JSON line per file.
_LLAMA_CPP = r"""
import json, sys
import numpy as np
import llama_cpp
job = json.loads(sys.argv[1])
ids, want = job["ids"], np.load(job["logits"])
for path in sys.argv[2:]:
  llm = llama_cpp.Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False)
  tokens = llm.tokenize(job["prompt"].encode(), add_bos=False, special=True)
  llm.eval(ids)
  diff = float(np.abs(np.array(llm.scores[:len(ids)]) - want).max())
  new = []
  for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
    if t == llm.token_eos() or len(new) == job["new_tokens"]:
      break
    new.append(t)
  reply = llm.detokenize(new).decode("utf-8", "replace")
  print(json.dumps({"file": path, "diff": diff, "reply": reply, "tokens": tokens == ids}))
"""


def _model(workdir: str | None):
  """(merged model, hf_config, tokenizer source, label) of the run or the base SmolLM2."""
  if workdir:
    _, run, model_path = run_lib.restore(workdir)
    return lora.merge(run.model()), run.hf_config, model_path, f"run {workdir} step {run.step}"
  path = defaults.smollm2()
  loaded = hf.load(path, "causal_lm")
  return loaded.model, loaded.hf_config, path, f"base {path}"


def _f16_weights(model):
  """`model` with every matrix rounded to float16 and back: what an f16 file can hold."""
  graphdef, state = nnx.split(model)
  def rounded(var):
    value = var.get_value()
    if value.ndim >= 2 and jnp.issubdtype(value.dtype, jnp.floating):
      return var.replace(value.astype(jnp.float16).astype(value.dtype))
    return var
  flat = [(path, rounded(var)) for path, var in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _export(workdir, model, hf_config, source, out, quant) -> float:
  start = time.perf_counter()
  if workdir:
    commands.export_command(workdir, out, "gguf", quant=quant, overwrite=True)
  else:
    gguf_export.export(model, hf_config, out, tokenizer_path=source, quant=quant,
                       name="SmolLM2-135M-Instruct")
  return time.perf_counter() - start


def _transformers(path: str, ids: np.ndarray, new_tokens: int) -> tuple[np.ndarray, str]:
  folder, name = os.path.split(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  prompt = torch.from_numpy(ids.astype(np.int64))
  with torch.no_grad():
    logits = model(prompt).logits.numpy()
    out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
  return logits, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default=None, help="a causal-LM run (default: the base SmolLM2)")
  p.add_argument("--out", default=None, help="folder for the .gguf files (default: a temp one)")
  p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
  p.add_argument("--max_new_tokens", type=int, default=24)
  p.add_argument("--llama_python", default=None, help="a Python with llama-cpp-python")
  args = p.parse_args()
  out = args.out or tempfile.mkdtemp(prefix="gguf-bench-")
  os.makedirs(out, exist_ok=True)
  model, hf_config, source, label = _model(args.workdir)
  tokenizer = hub.load_tokenizer(source)
  prompt = generate.chat_prompt(tokenizer, [{"role": "user", "content": args.prompt}])
  ids = np.asarray(tokenizer(prompt, add_special_tokens=False)["input_ids"], np.int32)[None]
  ours = np.asarray(model(ids))
  # The f16 file's floor: jaxft itself with float16 weights.
  ours16 = np.asarray(_f16_weights(model)(ids))
  print(f"jaxft with its matrices rounded to float16: max |logit diff| "
        f"{np.abs(ours16 - ours).max():.4f}")
  reply = generate.complete(model, tokenizer, [prompt], max_new_tokens=args.max_new_tokens)[0]
  print(f"{label}; prompt {args.prompt!r} ({ids.shape[1]} tokens), logits up to "
        f"{np.abs(ours).max():.1f}")
  print(f"jaxft reply: {reply!r}")
  files, same = [], True
  for quant in gguf_export.QUANTS:
    path = os.path.join(out, f"smollm2-{quant}.gguf")
    seconds = _export(args.workdir, model, hf_config, source, path, quant)
    logits, theirs = _transformers(path, ids, args.max_new_tokens)
    files.append(path)
    same &= quant != "f16" or theirs == reply
    print(f"{quant}: {os.path.getsize(path) / 2**20:.1f} MiB, exported in {seconds:.1f} s; "
          f"transformers max |logit diff| vs jaxft {np.abs(logits - ours).max():.4f} "
          f"(vs jaxft at float16 weights {np.abs(logits - ours16).max():.4f}); "
          f"reply {'==' if theirs == reply else '!='} jaxft's: {theirs!r}")
  if args.llama_python:
    np.save(os.path.join(out, "jaxft_logits.npy"), ours[0])
    job = {"prompt": prompt, "ids": ids[0].tolist(), "new_tokens": args.max_new_tokens,
           "logits": os.path.join(out, "jaxft_logits.npy")}
    proc = subprocess.run([args.llama_python, "-c", _LLAMA_CPP, json.dumps(job), *files],
                          capture_output=True, text=True, check=True)
    for line in proc.stdout.splitlines():
      row = json.loads(line)
      print(f"llama.cpp {os.path.basename(row['file'])}: tokenizes the prompt "
            f"{'as' if row['tokens'] else 'UNLIKE'} jaxft; max |logit diff| vs jaxft "
            f"{row['diff']:.4f}; reply {'==' if row['reply'] == reply else '!='} jaxft's: "
            f"{row['reply']!r}")
  print("f16 replies identical" if same else "f16 reply DIFFERENT")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
