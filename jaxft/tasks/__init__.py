"""The tasks jaxft fine-tunes for, one module each, behind the `Task` interface (base.py).

`of(config)` is the one place that maps `config.task` to a task object.
"""

from __future__ import annotations

import ml_collections

from jaxft.tasks.base import Data, Task
from jaxft.tasks.causal_lm import CausalLM
from jaxft.tasks.classify import Classify
from jaxft.tasks.dpo import DPO
from jaxft.tasks.grpo import GRPO
from jaxft.tasks.image_classify import ImageClassify

# config.task -> its Task class (config.TASKS lists the same names).
REGISTRY: dict[str, type[Task]] = {
    Classify.name: Classify,
    CausalLM.name: CausalLM,
    ImageClassify.name: ImageClassify,
    DPO.name: DPO,
    GRPO.name: GRPO,
}

__all__ = ["Data", "Task", "REGISTRY", "of"]


def of(config: ml_collections.ConfigDict) -> Task:
  """The task `config.task` names (workdirs older than the key trained classifiers)."""
  return REGISTRY[config.get("task", "classify")](config)
