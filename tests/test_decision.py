"""config.decision: a threshold chosen on the eval split at training, kept with the
checkpoint, and used as is by `jaxft eval` on other data (never chosen there)."""

import json
import shutil

import numpy as np
import pytest
import transformers

from jaxft import commands
from jaxft import config as config_lib
from jaxft import run as run_lib
from jaxft import train
from jaxft.errors import UserError
from jaxft.tasks import clinical_metrics
from tests.helpers import tiny_config


def _probs(workdir, config):
  """(eval labels, class probabilities) of the run's latest checkpoint on config.data.eval."""
  _, run, _ = run_lib.restore(str(workdir), config=config)
  try:
    model_path, task, data = run_lib.prepare(config, str(workdir), need_train=False)
    del model_path
    _, probs = task.predict(run, data)
  finally:
    run.checkpointer.close()
  return data.eval["label"], probs, run


def test_a_threshold_chosen_for_sensitivity_is_kept_and_used_by_eval_on_other_data(
    tiny_setup, tmp_path):
  config = tiny_config(tiny_setup)
  config.decision.target, config.decision.value = "sensitivity", 0.9
  result = train.train(config, str(tmp_path))

  labels, probs, run = _probs(tmp_path, config)
  chosen = clinical_metrics.choose_threshold(labels, probs[:, 1], target="sensitivity",
                                             value=0.9)
  assert result["threshold"] == pytest.approx(chosen) and result["sensitivity"] >= 0.9
  assert run.meta["decision"] == {"threshold": result["threshold"], "target": "sensitivity",
                                  "value": 0.9, "step": 6}
  want = clinical_metrics.binary(labels, probs[:, 1], chosen)
  assert result["specificity"] == pytest.approx(want["specificity"])
  assert result["at_0.5"]["sensitivity"] == pytest.approx(
      clinical_metrics.binary(labels, probs[:, 1], 0.5)["sensitivity"])

  # Another eval file: the kept threshold, not one chosen on these data.
  other = config.copy_and_resolve_references()
  other.data.eval = str(tiny_setup / "train.jsonl")
  evaluated = commands.eval_command(other, str(tmp_path))
  assert evaluated["threshold"] == result["threshold"]
  labels, probs, _ = _probs(tmp_path, other)
  np.testing.assert_equal(
      {k: evaluated[k] for k in ("sensitivity", "specificity", "accuracy", "auc")},
      {k: v for k, v in clinical_metrics.binary(labels, probs[:, 1], result["threshold"]).items()
       if k in ("sensitivity", "specificity", "accuracy", "auc")})


def test_an_export_keeps_the_threshold_and_predict_on_it_alone_labels_with_it(
    tiny_setup, tmp_path):
  config = tiny_config(tiny_setup)
  config.decision.target, config.decision.value = "sensitivity", 0.9
  result = train.train(config, str(tmp_path / "run"))
  commands.export_command(str(tmp_path / "run"), str(tmp_path / "hf"))
  kept = transformers.AutoConfig.from_pretrained(tmp_path / "hf").jaxft_decision
  assert kept == {"threshold": result["threshold"], "target": "sensitivity", "value": 0.9,
                  "step": 6}
  shutil.rmtree(tmp_path / "run")  # The export alone, as a user would ship it.
  rows = [json.loads(l) for l in commands.predict_command(
      None, None, str(tiny_setup / "test.jsonl"), model=str(tmp_path / "hf"),
      out=str(tmp_path / "p.jsonl")) and (tmp_path / "p.jsonl").read_text().splitlines()]
  names = list(rows[0]["probs"])
  for row in rows:
    assert row["label"] == names[int(row["probs"][names[1]] >= result["threshold"])]


def test_without_a_target_the_threshold_is_one_half_and_nothing_is_kept(tiny_setup, tmp_path):
  config = tiny_config(tiny_setup)
  result = train.train(config, str(tmp_path))
  assert result["threshold"] == 0.5 and "at_0.5" not in result
  _, run, _ = run_lib.restore(str(tmp_path), config=config)
  run.checkpointer.close()
  assert "decision" not in run.meta


@pytest.mark.parametrize("key, value, message", [
    ("target", "recall", "config.decision.target must be one of"),
    ("value", 0.0, "config.decision.value must be in (0, 1]"),
    ("value", 1.5, "config.decision.value must be in (0, 1]"),
])
def test_bad_decision_settings_are_config_errors(key, value, message):
  c = config_lib.base()
  c.model.path, c.data.train = "model", "train.jsonl"
  config_lib.validate(c)
  c.decision[key] = value
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")
                     .replace("[", r"\[").replace("]", r"\]")):
    config_lib.validate(c)


def test_an_eval_split_without_the_finding_cannot_choose_for_sensitivity(tiny_setup, tmp_path):
  rows = (tiny_setup / "test.jsonl").read_text().splitlines()
  negatives = [r for r in rows if '"negative"' in r]
  assert negatives and len(negatives) < len(rows)
  (tmp_path / "negatives.jsonl").write_text("\n".join(negatives) + "\n")
  config = tiny_config(tiny_setup, num_steps=2)
  config.data.eval = str(tmp_path / "negatives.jsonl")
  config.decision.target = "sensitivity"
  with pytest.raises(UserError, match="config.decision.target='sensitivity': .*"):
    train.train(config, str(tmp_path / "run"))
