"""configs/models/: the shipped config.json files build the published models, from shapes alone."""

import pytest

from jaxft import defaults
from jaxft import inspect
from tests.helpers import ROOT


# Parameter counts as the model cards state them (embeddings and head included).
@pytest.mark.parametrize("name, params", [
    ("llama-3.1-8b", 8_030_261_248),
    ("llama-3.1-70b", 70_553_706_496),
    ("qwen2.5-7b", 7_615_616_512),
    ("mistral-7b-v0.3", 7_248_023_552),
])
def test_shipped_config_builds_the_published_parameter_count(name, params):
  folder = ROOT / "configs" / "models" / name
  assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # no weights, no tokenizer
  c = defaults.recipe("sft")
  c.model.path = str(folder)
  c.model.scan_layers = True
  model = inspect.Model.of(c)
  assert sum(model.split.sizes.values()) == params
