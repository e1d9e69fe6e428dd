"""The three lists of task names agree: config.TASKS, the tasks registry, the models registry."""

from jaxft import config as config_lib
from jaxft import tasks
from jaxft.models import registry


def test_every_config_task_has_a_task_class_and_model_classes():
  assert set(tasks.REGISTRY) == set(config_lib.TASKS)
  # Every task trains a kind of model the registry has (dpo and grpo train causal LMs).
  assert {cls.model_kind for cls in tasks.REGISTRY.values()} == set(registry.MODELS)
  for name, cls in tasks.REGISTRY.items():
    assert cls.name == name


def test_the_task_is_the_one_the_config_names():
  for make in (config_lib.base, config_lib.causal_lm, config_lib.image_classify,
               config_lib.dpo, config_lib.grpo):
    config = make()
    assert tasks.of(config).name == config.task
