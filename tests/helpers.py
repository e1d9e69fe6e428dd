"""What several test modules share: the classify recipe at tiny sizes, and the `jaxft` command.

Test modules import these from here, never from one another: a test module is
free to change its private helpers without breaking another module.
Fixtures live in conftest.py; tests/mesh_worker.py (a subprocess) imports from
here too.
"""

import pathlib
import contextlib
import io
import subprocess
import sys
from unittest import mock

from jaxft import defaults

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "configs" / "classify.py")


def tiny_config(root, **train_overrides):
  """configs/classify.py on the `tiny_setup` folder: tiny BERT, 64 train / 32 eval reviews."""
  c = defaults.recipe("classify")
  c.model.path = str(root / "model")
  c.data.train = str(root / "train.jsonl")
  c.data.eval = str(root / "test.jsonl")
  c.data.max_length = 16
  c.train.update(batch_size=8, num_steps=6, log_every=2, eval_batch_size=16)
  c.train.update(train_overrides)
  c.optim.lr = 1e-3
  c.checkpoint.update(every=3, keep=5)
  return c


def jaxft(*args, **kwargs) -> subprocess.CompletedProcess:
  """`jaxft ARGS` in a subprocess from the repo root (output captured as text)."""
  return subprocess.run([sys.executable, "-m", "jaxft.cli", *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=600, **kwargs)


def jaxft_in_process(*args) -> subprocess.CompletedProcess:
  """`jaxft ARGS` run by `cli.main` in this process: exit code, stdout and stderr as text.

  For commands that end early (user mistakes): no interpreter, JAX or
  transformers start-up to pay (about 4 s a run); an exception other than
  the CLI's own exits propagates, as a traceback would in a subprocess.
  """
  from jaxft import cli  # pylint: disable=g-import-not-at-top
  out, err = io.StringIO(), io.StringIO()
  code = 0
  with mock.patch.object(sys, "argv", ["jaxft", *args]), \
      contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      cli.main()
    except SystemExit as e:
      code = e.code
  return subprocess.CompletedProcess(["jaxft", *args], code, out.getvalue(), err.getvalue())


def tiny_flags(root, workdir, *extra):
  """`jaxft` flags for tiny_config's setup; workdir None leaves --workdir out (inspect)."""
  return ["--config=" + RECIPE, *([f"--workdir={workdir}"] if workdir else []),
          f"--config.model.path={root / 'model'}", f"--config.data.train={root / 'train.jsonl'}",
          f"--config.data.eval={root / 'test.jsonl'}", "--config.data.max_length=16",
          "--config.train.batch_size=8", "--config.optim.lr=1e-3", *extra]
