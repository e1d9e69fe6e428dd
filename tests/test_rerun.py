"""Rerunning a workdir: extending, a no-op at num_steps, past it, and the record kept."""

import json

from tests.helpers import jaxft_in_process, tiny_flags


def _train(root, workdir, *extra):
  return jaxft_in_process("train", *tiny_flags(root, workdir, "--config.checkpoint.every=2",
                                                 "--config.train.log_every=2", *extra))


def _last_json(proc):
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_extending_a_finished_run_logs_the_new_schedule_and_keeps_each_config(tiny_setup,
                                                                               tmp_path):
  w = tmp_path / "w"
  first = _train(tiny_setup, w, "--config.train.num_steps=4")
  assert first.returncode == 0, first.stderr
  assert _last_json(first)["step"] == 4
  longer = _train(tiny_setup, w, "--config.train.num_steps=6")
  assert longer.returncode == 0, longer.stderr
  assert _last_json(longer)["step"] == 6
  assert "resuming %s at step 4; config changes: train.num_steps 4 -> 6" % w in longer.stderr
  # Linear decay from 1e-3 after 0 warmup steps: 0 at step 4 of 4, 1e-3 * 2/6 at step 4 of 6.
  assert "lr at step 5 is 0.000333 (the old schedule gave 0)" in longer.stderr
  assert json.loads((w / "config.json").read_text())["train"]["num_steps"] == 4
  assert json.loads((w / "config.resume-00000004.json").read_text())["train"]["num_steps"] == 6
  records = [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
  resumes = [r for r in records if r["split"] == "resume"]
  assert resumes == [{"step": 4, "split": "resume", "changes": {"train.num_steps": [4, 6]}}]
  assert [r["step"] for r in records if r["split"] == "eval"] == [4, 6]
  # `eval --workdir` alone reads the newest config: the one that trained to step 6.
  ev = jaxft_in_process("eval", f"--workdir={w}")
  assert ev.returncode == 0, ev.stderr
  assert _last_json(ev) == _last_json(longer)


def test_a_rerun_at_num_steps_is_a_no_op_and_a_checkpoint_past_it_is_exit_2(tiny_setup,
                                                                            tmp_path):
  w = tmp_path / "w"
  first = _train(tiny_setup, w, "--config.train.num_steps=4")
  assert first.returncode == 0, first.stderr
  metrics = (w / "metrics.jsonl").read_bytes()
  again = _train(tiny_setup, w, "--config.train.num_steps=4")
  assert again.returncode == 0, again.stderr
  assert f"nothing to train: {w} is at config.train.num_steps=4" in again.stderr
  assert _last_json(again) == _last_json(first)
  shorter = _train(tiny_setup, w, "--config.train.num_steps=2")
  assert shorter.returncode == 2
  assert shorter.stderr.strip().splitlines()[-1] == (
      f"jaxft: error: the checkpoint in {w} is at step 4, past config.train.num_steps=2: a run "
      "cannot go back; set num_steps >= 4 to train on, export an earlier kept step (jaxft "
      "export --step=N), or use a new --workdir")
  assert (w / "metrics.jsonl").read_bytes() == metrics  # No duplicate eval, no resume line.
  assert sorted(p.name for p in w.iterdir() if p.name.startswith("config")) == ["config.json"]


def test_eval_needs_an_existing_workdir_and_a_trained_head(tiny_setup, tmp_path):
  missing = jaxft_in_process("eval", *tiny_flags(tiny_setup, tmp_path / "typo"))
  assert missing.returncode == 2
  assert missing.stderr.strip() == f"jaxft: error: workdir {tmp_path / 'typo'} does not exist"
  alone = jaxft_in_process("eval", f"--workdir={tmp_path / 'typo'}")
  assert alone.returncode == 2
  assert alone.stderr.strip() == f"jaxft: error: workdir {tmp_path / 'typo'} does not exist"
  (tmp_path / "empty").mkdir()
  fresh = jaxft_in_process("eval", *tiny_flags(tiny_setup, tmp_path / "empty"))
  assert fresh.returncode == 2
  assert fresh.stderr.strip().splitlines()[-1] == (
      f"jaxft: error: nothing trained in {tmp_path / 'empty'}: the classification head "
      "would be random")
  assert "Traceback" not in fresh.stderr


def test_eval_of_a_lora_workdir_needs_no_repeated_overrides(tiny_setup, tmp_path):
  w = tmp_path / "w"
  lora = ("--config.lora.rank=4", "--config.train.num_steps=2")
  trained = _train(tiny_setup, w, *lora)
  assert trained.returncode == 0, trained.stderr
  repeated = jaxft_in_process("eval", *tiny_flags(tiny_setup, w, *lora))
  alone = jaxft_in_process("eval", f"--workdir={w}")
  assert repeated.returncode == alone.returncode == 0, alone.stderr
  assert _last_json(alone) == _last_json(repeated) == _last_json(trained)
  # With the recipe but not the training override: the message points to the fix.
  forgot = jaxft_in_process("eval", *tiny_flags(tiny_setup, w))
  assert forgot.returncode == 2
  assert forgot.stderr.strip().splitlines()[-1] == (
      f"jaxft: error: {w} was trained with config.lora.rank=4, not 0: its checkpoints hold "
      "other trainable parameters. Leave out --config to use the run's own config, repeat "
      "its overrides, or train in a new --workdir.")


def test_a_saved_config_from_before_a_key_existed_takes_that_keys_default():
  from jaxft import config as config_lib
  saved = config_lib.dpo().to_dict()
  del saved["dpo"]["ld_alpha"]  # Added after such runs were saved.
  saved["dpo"]["beta"] = 0.5
  config = config_lib.from_json(json.dumps(saved))
  assert config.dpo.ld_alpha == 1.0  # Plain DPO: what the old run trained with.
  assert config.dpo.beta == 0.5
  assert "decision" not in config  # A key the task's defaults lack stays absent.
