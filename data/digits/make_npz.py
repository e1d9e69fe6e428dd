"""Writes data/digits/{train,test}.npz from scikit-learn's bundled digits (deterministic).

  python data/digits/make_npz.py

1,797 8x8 handwritten digits (0..16 intensities scaled to 0..255 uint8),
every fifth-ish image (index % 18 < 5) held out: 500 test, 1,297 train.
"""

import pathlib

import numpy as np
from sklearn.datasets import load_digits

HERE = pathlib.Path(__file__).resolve().parent


def main() -> None:
  digits = load_digits()
  images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
  labels = digits.target.astype(np.int32)
  test = np.arange(len(labels)) % 18 < 5
  names = np.array([str(i) for i in range(10)])
  for split, keep in (("train", ~test), ("test", test)):
    np.savez_compressed(HERE / f"{split}.npz", images=images[keep], labels=labels[keep],
                        label_names=names)


if __name__ == "__main__":
  main()
