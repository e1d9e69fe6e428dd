"""SIGKILL anywhere, rerun until done: the final state is bitwise the uninterrupted run's.

The short version of bench/chaos.py (which kills a real MiniLM and a tiny
Llama dozens of times): a tiny BERT classifier, two kills in one workdir,
one of them the instant a checkpoint save is under way.
"""

import random

from bench import chaos
from tests.helpers import tiny_flags


def _setup(root) -> chaos.Setup:
  flags = [f for f in tiny_flags(root, None) if not f.startswith("--workdir")]
  return chaos.Setup("tiny-bert", flags + chaos._common(num_steps=8, every=2), num_steps=8,
                     eval_every=4)


def test_a_kill_after_a_step_and_one_inside_a_save_then_a_rerun_end_bitwise_equal(
    tiny_setup, tmp_path):
  setup = _setup(tiny_setup)
  ref = chaos.run_once(setup, tmp_path / "reference")
  assert ref.code == 0
  reference = chaos.final_state(tmp_path / "reference", setup.num_steps)
  # A step, not a time: a time taken from the reference can fall after a faster rerun ends.
  kills = [f"step {random.Random(0).randrange(1, setup.num_steps - 2)}", "save"]

  result = chaos.trial(setup, tmp_path / "killed", reference, kills)

  assert "save" in result.landings, result
  assert (tmp_path / "killed" / "checkpoints" / str(setup.num_steps)).is_dir()
  assert result.equal, result.differing
  assert len(reference) >= 4  # Params and optimizer moments, not an empty tree.
