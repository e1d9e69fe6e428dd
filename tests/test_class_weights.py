"""config.data.class_weights: the classifier's loss weighted per class, as torch's
CrossEntropyLoss(weight=), with scikit-learn's "balanced" weights."""

import numpy as np
import pytest
import torch
from sklearn.utils import class_weight

from jaxft import config as config_lib
from jaxft.errors import UserError
from jaxft.tasks import classify
from tests.helpers import tiny_config

NAMES = ["normal", "pneumonia", "other"]


def _classifier(spec: str) -> classify.Classifier:
  c = config_lib.base()
  c.data.class_weights = spec
  return classify.Classifier(c)


def test_balanced_weights_are_scikit_learns():
  labels = np.array([0, 1, 1, 1, 2, 2, 1, 1])
  train = _classifier("balanced").with_class_weights({"label": labels}, NAMES)
  want = class_weight.compute_class_weight("balanced", classes=np.arange(3), y=labels)
  np.testing.assert_allclose(train["class_weight"], want[labels], rtol=1e-6)


def test_the_weighted_loss_is_torchs_weighted_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(8, 3)).astype(np.float32)
  labels = np.array([0, 1, 1, 1, 2, 2, 1, 0])
  batch = _classifier("0.5,2,1.25").with_class_weights({"label": labels}, NAMES)
  total, sums = classify.OBJECTIVE.loss_sums(logits, batch)
  loss = float(total / classify.OBJECTIVE.units(batch))
  want = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels),
                                           weight=torch.tensor([0.5, 2.0, 1.25]))
  assert loss == pytest.approx(float(want), rel=1e-6)
  # Without weights: the plain mean.
  plain = {"label": labels}
  total, _ = classify.OBJECTIVE.loss_sums(logits, plain)
  assert float(total / classify.OBJECTIVE.units(plain)) == pytest.approx(float(
      torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))),
      rel=1e-6)


def test_no_weights_leave_the_data_as_they_are():
  train = {"label": np.array([0, 1])}
  assert _classifier("").with_class_weights(train, NAMES[:2]) is train


@pytest.mark.parametrize("spec, labels, message", [
    ("balanced", [0, 0, 1], "no training example of class 'other'"),
    ("1,2", [0, 1, 2], "has 2 weights for 3 classes"),
])
def test_weights_that_do_not_fit_the_classes_are_a_clear_error(spec, labels, message):
  with pytest.raises(UserError, match=message):
    _classifier(spec).with_class_weights({"label": np.array(labels)}, NAMES)


@pytest.mark.parametrize("spec", ["balance", "1,x", "1,-2", "0"])
def test_a_malformed_spec_is_rejected_by_validate(tiny_setup, spec):
  config = tiny_config(tiny_setup)
  config.data.class_weights = spec
  with pytest.raises(UserError, match="data.class_weights"):
    config_lib.validate(config)
