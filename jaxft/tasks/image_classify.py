"""Image classification (ViT, ResNet): image folders, IDX or npz files, tables with an image column.

Images are stored as uint8 at the model's input size and normalised on the
device inside the step, with the training augmentation (random resized crops,
flips) there too. Scores accuracy, macro-F1 and per-class recall, and draws
the confusion matrix at each eval.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import metrics
from jaxft import steps
from jaxft.runtime import storage
from jaxft.data import augment
from jaxft.data import batches as batches_lib
from jaxft.data import image_files
from jaxft.data import image_prep
from jaxft.formats import hf
from jaxft.formats import hub
from jaxft.models import layers
from jaxft.models import resnet
from jaxft.tasks import base
from jaxft.tasks import class_metrics
from jaxft.tasks import clinical_png
from jaxft.tasks import classify
from jaxft.tasks import confusion_png
from jaxft.tuning import lora


@dataclasses.dataclass(frozen=True)
class ImageInput:
  """How images reach the model: stored uint8 at `size`, normalised on the device."""
  size: tuple[int, int]
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  interpolate: bool  # size differs from the checkpoint's: resize the position grid.
  random_resized_crop: bool
  flip: bool
  crop_scale: tuple[float, float]


def _image_forward(model, batch, deterministic, rngs, *, input_: ImageInput):
  x = image_prep.normalize(batch["pixels"], input_.mean, input_.std)
  if not deterministic and (input_.random_resized_crop or input_.flip):
    x = augment.augment(rngs.dropout(), x, random_resized_crop=input_.random_resized_crop,
                        flip=input_.flip, scale=input_.crop_scale)
  return model(x, deterministic=deterministic, rngs=rngs,
               interpolate_pos_encoding=input_.interpolate)


def _is_convnet(hf_config: Any) -> bool:
  return hf_config.model_type == "resnet"


class ImageClassify(classify.Classifier):
  """Image classification (ViT, ResNet): accuracy, macro-F1, per-class recall, confusion PNG."""
  name = model_kind = "image_classify"
  peft_task_type = None  # PEFT has no image-classification task type.

  @functools.cached_property
  def input(self) -> ImageInput:
    """Size, channels and normalisation from the config, the checkpoint and its processor."""
    d = self.config.data
    folder = hub.resolve_model(self.config.model.path, weights=False)
    hf_config = hub.load_hf_config(folder)
    mean, std, processor_size = image_prep.processor_stats(folder)
    native = layers.pair(getattr(hf_config, "image_size", 224))
    size = layers.pair(d.image_size) if d.image_size else (processor_size or native)
    channels = int(getattr(hf_config, "num_channels", 3))
    mean, std = (tuple(float(v) for v in image_prep.channel_stats(values, name, channels))
                 for values, name in ((mean, "image_mean"), (std, "image_std")))
    return ImageInput(size=tuple(size), channels=channels, mean=mean, std=std,
                      interpolate=tuple(size) != native,
                      random_resized_crop=bool(d.random_resized_crop), flip=bool(d.flip),
                      crop_scale=tuple(d.crop_scale))

  def tokens_per_example(self, hf_config: Any) -> int:
    """A ViT's patches plus the CLS token; 1 for a ConvNet (its unit of work is the image)."""
    if _is_convnet(hf_config):
      return 1
    patch = layers.pair(hf_config.patch_size)
    return (self.input.size[0] // patch[0]) * (self.input.size[1] // patch[1]) + 1

  def flops_per_token(self, sizes: dict[str, int], hf_config: Any) -> float:
    """A ViT's as any transformer's; a ConvNet's training FLOPs per image, 3x its
    forward's (the backward pass costs two forwards)."""
    if _is_convnet(hf_config):
      return 3.0 * resnet.flops_per_image(hf_config, *self.input.size)
    return super().flops_per_token(sizes, hf_config)

  @property
  def objective(self) -> steps.Objective:
    forward = functools.partial(_image_forward, input_=self.input)
    return dataclasses.replace(classify.OBJECTIVE, forward=forward)

  @property
  def eval_step(self):
    return functools.partial(classify.eval_step, objective=self.objective)

  def read(self, spec: str, split: str, size: tuple[int, int] | None) -> image_files.ImageSet:
    """One split of the config's image data, as uint8 at `size` (None: as stored)."""
    d = self.config.data
    return image_files.load(spec, skip_bad=d.skip_bad, size=size, split=split,
                            label_names=list(d.label_names) or None, image_key=d.image_key,
                            label_key=d.label_key)

  def class_names(self) -> list[str]:
    d = self.config.data
    return self.read(d.train, d.train_split, None).label_names

  def prepare(self, model_path: str, labels: list[str] | None, *, need_train: bool) -> base.Data:
    del model_path
    d, inp = self.config.data, self.input
    splits = {}
    if need_train or labels is None:
      splits["train"] = self.read(d.train, d.train_split, inp.size)
    if d.eval:
      splits["eval"] = self.read(d.eval, d.eval_split, inp.size)
    names = list(labels) if labels is not None else splits["train"].label_names
    out = {}
    for name, data in splits.items():
      if data.skipped:
        metrics.log(f"{name}: skipped {data.skipped} unreadable files "
                    f"(e.g. {data.skipped_files[0]})")
      data = image_files.align_labels(data, names, name)
      out[name] = {"pixels": image_prep.to_model_pixels(data.images, inp.size, inp.channels),
                   "label": data.labels}
    train = self.with_class_weights(out.get("train") if need_train else None, names)
    return base.Data(train, out.get("eval"), names)

  def abstract_batch(self, model_path: str) -> dict[str, jax.ShapeDtypeStruct]:
    del model_path
    n = self.config.train.batch_size
    return {"pixels": jax.ShapeDtypeStruct((n, *self.input.size, self.input.channels), jnp.uint8),
            "label": jax.ShapeDtypeStruct((n,), jnp.int32)}

  def describe(self, data: base.Data) -> str:
    h, w, c = data.train["pixels"].shape[1:]
    return (f"{batches_lib.num_examples(data.train)} train images ({h}x{w}x{c}), "
            f"{len(data.labels)} classes")

  def hf_config(self, model_path: str, labels: list[str] | None) -> Any:
    config = super().hf_config(model_path, labels)
    if self.input.interpolate and self.config.model.get("from_scratch"):
      config.image_size = self.input.size[0]  # A fresh model is built for the new size.
    return config

  def evaluate(self, run: Any, data: base.Data, workdir: str | None = None) -> dict[str, Any]:
    """`Classifier.evaluate` plus per-class recall; with a workdir (training), the
    confusion matrix as DIR/confusion/step_N.png, the reliability diagram as
    DIR/calibration/step_N.png and, for two classes, the ROC curve as
    DIR/roc/step_N.png."""
    result, probs, threshold = self.scored(run, data, workdir)
    labels, n = data.eval["label"], len(data.labels)
    matrix = class_metrics.confusion(labels, self.predictions(probs, threshold), n)
    recall = dict(zip(data.labels, class_metrics.recall_per_class(matrix)))
    if workdir is not None and jax.process_index() == 0:
      self._figures(workdir, run.step, matrix, data.labels, labels, probs, result)
    return {**result, "recall": recall}

  def _figures(self, workdir: str, step: int, matrix: np.ndarray, names: list[str],
               labels: np.ndarray, probs: np.ndarray, result: dict[str, Any]) -> None:
    """DIR/confusion/ and DIR/calibration/step_N.png, and for two classes DIR/roc/."""
    name = f"step_{step}.png"
    storage.makedirs(storage.join(workdir, "confusion"))
    confusion_png.save(matrix, names, storage.join(workdir, "confusion", name),
                       title=f"step {step}: accuracy {result['accuracy']:.4f}")
    storage.makedirs(storage.join(workdir, "calibration"))
    clinical_png.save_calibration(labels, probs, storage.join(workdir, "calibration", name),
                                  bins=classify.ECE_BINS)
    if probs.shape[-1] == 2:
      storage.makedirs(storage.join(workdir, "roc"))
      clinical_png.save_roc(labels, probs[:, 1], storage.join(workdir, "roc", name),
                            threshold=result["threshold"],
                            title=f"step {step}: {names[1]} vs {names[0]}")
    for kind in ["confusion", "calibration"] + (["roc"] if probs.shape[-1] == 2 else []):
      metrics.add_image(workdir, step, f"eval/{kind}", storage.join(workdir, kind, name))

  def export(self, run: Any, model_path: str, out_dir: str) -> None:
    hf.export(lora.merge(run.model()), self.export_config(run), self.model_kind, out_dir,
              processor_path=model_path)
