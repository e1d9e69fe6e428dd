"""Image classification: fine-tune a Vision Transformer (ViT) on labelled images.

Data: an image folder (one subfolder per class: the medical-imaging layout),
IDX files (`*-images-idx3-ubyte[.gz]`, labels found beside them) or a .npz
with `images` and `labels`. Images are decoded once into a uint8 array at the
model's size; normalisation (the checkpoint's preprocessor_config.json, else
mean = std = 0.5) and augmentation (random resized crop, flip) run in the
jitted step. Eval: accuracy, macro-F1, per-class recall, and the confusion
matrix as DIR/confusion/step_N.png.

  jaxft train --config=configs/vit.py --workdir=runs/scans \\
    --config.model.path=google/vit-base-patch16-224 \\
    --config.data.train=scans/train --config.data.eval=scans/test --config.data.flip=True

Transfer, offline (`make vit` runs all of it): no pretrained ViT ships in a
package, so the `pretrain` arm trains a small ViT (configs/vit-small) from
scratch on Fashion-MNIST and `jaxft export`s it; the other arms fine-tune on
scikit-learn's digits (data/digits, 8x8 upscaled to 28x28) for the same
number of steps: `probe` (backbone frozen by config.optim.rules), `full`, and
`scratch` (same architecture, random init). Measured 2026-11-25 on 2 CPU
cores (fp32; bench/RESULTS.md): pretraining reaches 0.814 on the Fashion-MNIST
test set in 7 min; on the 500 held-out digits after 300 steps of 64, full
fine-tune 0.980, linear probe 0.872, from scratch 0.908 (about a minute each);
after 100 steps 0.886 / 0.818 / 0.432.

  jaxft train --config=configs/vit.py:pretrain --workdir=runs/vit-fmnist
  jaxft export --workdir=runs/vit-fmnist --out=runs/vit-fmnist-hf
  jaxft train --config=configs/vit.py:probe --workdir=runs/vit-digits-probe
  jaxft train --config=configs/vit.py:full --workdir=runs/vit-digits-full
  jaxft train --config=configs/vit.py:scratch --workdir=runs/vit-digits-scratch
"""

import os

import ml_collections

from jaxft import config as jaxft_config

_ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SMALL_VIT = os.path.join(_ROOT, "configs", "vit-small")  # config.json only: from scratch.
PRETRAINED = os.path.join(_ROOT, "runs", "vit-fmnist-hf")  # What the pretrain arm exports.
FMNIST = os.path.join(_ROOT, ".cache", "fashion-mnist")
DIGITS = os.path.join(_ROOT, "data", "digits")
FMNIST_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                "Sneaker", "Bag", "Ankle boot")
ARMS = ("pretrain", "probe", "full", "scratch")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: an arm of the transfer experiment, or empty for `full` (fine-tune all)."""
  arm = arg or "full"
  if arm not in ARMS:
    raise ValueError(f"configs/vit.py:{arm}: the arm must be one of {ARMS}")
  c = jaxft_config.image_classify()
  c.data.image_size = 0  # The checkpoint's (28 for configs/vit-small, 224 for vit-base).
  c.data.crop_scale = (0.6, 1.0)
  c.train.log_every = 50
  c.train.eval_batch_size = 500
  c.optim.schedule = "cosine"
  c.optim.warmup_frac = 0.05
  c.optim.weight_decay = 0.05
  c.checkpoint.every = 0
  if arm == "pretrain":
    c.model.path = SMALL_VIT
    c.model.from_scratch = True
    c.data.train = os.path.join(FMNIST, "train-images-idx3-ubyte.gz")
    c.data.eval = os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz")
    c.data.label_names = FMNIST_NAMES
    c.train.batch_size = 128
    c.train.num_steps = 1500
    c.optim.lr = 1e-3
    return c
  c.model.path = SMALL_VIT if arm == "scratch" else PRETRAINED
  c.model.from_scratch = arm == "scratch"
  c.data.train = os.path.join(DIGITS, "train.npz")
  c.data.eval = os.path.join(DIGITS, "test.npz")
  c.data.flip = False  # A mirrored digit is another glyph (or none).
  c.train.batch_size = 64
  c.train.num_steps = 300
  c.optim.lr = 1e-3
  if arm == "probe":
    c.optim.rules = (("classifier/.*", 1.0), (".*", None))
    c.optim.lr = 0.3  # A linear head on frozen features takes a large rate.
  return c
