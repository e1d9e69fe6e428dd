"""A run's curves from its metrics.jsonl records: loss and the headline metric vs step.

`figures` is pure (records in, matplotlib figures out); `png` renders one.
The figures are built with matplotlib's object API on the Agg canvas, never
through pyplot: no display is needed or looked for, and nothing global (the
current figure, the backend) changes in the process that trains.
"""

from __future__ import annotations

import io
import re
from typing import Any, Sequence

SIZE_PX = (800, 500)  # Width, height of every PNG.
_DPI = 100
# Eval metrics that say how well a run does, most telling first: the first one a run
# reports is its headline (pass@1 and rouge_l per config.eval.metric, DPO's preference
# accuracy, GRPO's reward, a classifier's accuracy, else an LM's perplexity).
HEADLINES = ("pass@1", "rouge_l", "preference_accuracy", "reward", "accuracy", "perplexity")
_STYLE = {"train": dict(color="tab:blue", linewidth=1.5),
          "eval": dict(color="tab:orange", linewidth=2.0, marker="o", markersize=5)}


def series(records: Sequence[dict[str, Any]], split: str, name: str
           ) -> tuple[list[int], list[float]]:
  """(steps, values) of the number `name` in the `split` records, in step order.

  A resumed run may log a step twice (steps after its last checkpoint are
  trained again): the later record wins, as it describes the weights kept.
  """
  by_step = {}
  for r in records:
    value = r.get(name)
    if r.get("split") == split and isinstance(value, (int, float)) and not isinstance(value, bool):
      by_step[int(r["step"])] = float(value)
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def headline(records: Sequence[dict[str, Any]], preferred: str = "") -> str | None:
  """The metric a run is judged by: `preferred` (config.checkpoint.best_metric) when the
  eval records hold it, else the first of HEADLINES they hold; None if neither."""
  for name in ((preferred,) if preferred else ()) + HEADLINES:
    if series(records, "eval", name)[0]:
      return name
  return None


def file_name(metric: str) -> str:
  """`metric`.png, safe as a file name (`rewards/accuracies` -> rewards_accuracies.png)."""
  return re.sub(r"[^\w@.-]+", "_", metric) + ".png"


def figures(records: Sequence[dict[str, Any]], preferred: str = "",
            run_name: str = "") -> dict[str, Any]:
  """{file name: matplotlib Figure}: `loss.png` (train and eval loss vs step) and, when
  the run has a headline metric other than the loss, `<metric>.png` (its eval and, if
  logged, train values). Curves with no points are left out; no points at all: {}."""
  out = {}
  names = ["loss"]
  best = headline(records, preferred)
  if best and best != "loss":
    names.append(best)
  for name in names:
    figure = _curve(records, name, f"{run_name}: {name}" if run_name else name)
    if figure is not None:
      out[file_name(name)] = figure
  return out


def _curve(records: Sequence[dict[str, Any]], name: str, title: str) -> Any:
  """One figure: the train and eval lines of `name` vs step; None when both are empty."""
  # pylint: disable=g-import-not-at-top  (matplotlib: seconds to import, only when drawing)
  from matplotlib import figure as figure_lib
  from matplotlib import ticker
  lines = {split: series(records, split, name) for split in ("train", "eval")}
  if not any(steps for steps, _ in lines.values()):
    return None
  fig = figure_lib.Figure(figsize=(SIZE_PX[0] / _DPI, SIZE_PX[1] / _DPI), dpi=_DPI)
  ax = fig.add_subplot()
  for split, (steps, values) in lines.items():
    if steps:
      ax.plot(steps, values, label=split, **_STYLE[split])
  ax.set_title(title)
  ax.set_xlabel("step")
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # Steps are whole.
  ax.set_ylabel(name)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return fig


def png(figure: Any) -> bytes:
  """`figure` as PNG bytes, SIZE_PX in size."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=_DPI)
  return buffer.getvalue()
