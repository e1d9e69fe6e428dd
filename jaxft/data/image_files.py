"""Image data from files: decoded once, at load, into uint8 [N, H, W, C] with labels.

Readers for an image folder (one subfolder per class, like `datasets`'
imagefolder), IDX files (the MNIST / Fashion-MNIST format, optionally
gzipped), a .npz, and a table with an image column (parquet / json / csv or a
hub dataset); `load` picks one by the form of its argument. Files decoded at
another size are resized with Pillow's bilinear filter. DICOM files (.dcm, or
any file with the DICM marker) are read with pydicom (`jaxft.data.dicom`),
in folders and in tables of file paths alike.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import io
import math
import os
import struct
from typing import Any, Callable, Sequence, Sized

import datasets
import numpy as np
from PIL import Image

from jaxft.runtime import storage
from jaxft.data import dicom
from jaxft.data import sources
from jaxft.data import text
from jaxft.errors import UserError
from jaxft.models import layers

Size = tuple[int, int]  # (height, width)

FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                        "Shirt", "Sneaker", "Bag", "Ankle boot"]

# Decoding releases the GIL, so threads overlap it; a few suffice to saturate a disk.
_DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclasses.dataclass
class ImageSet:
  """Decoded images and their labels.

  images: uint8 [N, H, W, C], C in {1, 3}.
  label_names: class names in id order.
  labels: int32 [N], ids into label_names.
  skipped: how many unreadable files `skip_bad=True` left out (folders only).
  skipped_files: their paths.
  """
  images: np.ndarray
  label_names: list[str]
  labels: np.ndarray
  skipped: int = 0
  skipped_files: list[str] = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return len(self.labels)


def _check_not_empty(images: Sized, spec: str) -> None:
  if len(images) == 0:
    raise UserError(f"image data {spec!r} is empty")


# ---------------------------------------------------------------- image folders


def _to_uint8(img: Image.Image) -> np.ndarray:
  """A decoded Pillow image as uint8 [H, W] (gray) or [H, W, 3] (anything with colour)."""
  if img.mode in ("1", "L", "LA"):
    return np.asarray(img.convert("L"))
  if img.mode.startswith("I;16"):
    # 16-bit gray (common in medical PNGs): keep the full range rather than
    # Pillow's L conversion, which clips everything above 255 to white.
    return np.round(np.asarray(img, np.float32) / 257.0).astype(np.uint8)
  if img.mode in ("I", "F"):
    a = np.asarray(img, np.float64)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 255:
      return a.round().astype(np.uint8)
    if lo >= 0 and hi <= 65535:
      return np.round(a / 257.0).astype(np.uint8)
    # No known range: stretch this image's own range over 0..255.
    return np.round((a - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8)
  return np.asarray(img.convert("RGB"))


def _fit(a: np.ndarray, size: Size | None) -> np.ndarray:
  """A decoded uint8 image resized (Pillow bilinear) to `size` unless it has it already."""
  if size is None or a.shape[:2] == size:
    return a
  return np.asarray(Image.fromarray(a).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def _decode(path: str | io.BytesIO, size: Size | None) -> np.ndarray | str:
  """The file at `path` as uint8 [H, W(, 3)] resized to `size`; an error message if unreadable.

  DICOM files are read by `dicom.read` (its first frame); others by Pillow.
  """
  try:
    if dicom.is_dicom(path):
      a = dicom.read(path)
    else:
      with Image.open(path) as img:
        img.load()
        a = _to_uint8(img)
  except MemoryError:
    raise  # Not the file's fault alone: let it surface.
  except dicom.DicomError as e:
    return e.reason  # The caller names the file.
  except Exception as e:  # pylint: disable=broad-except
    # Pillow's decoders signal corrupt, truncated and non-image files with many
    # types (OSError, SyntaxError, struct.error, EOFError, IndexError, ...).
    return f"{type(e).__name__}: {e}"
  return _fit(a, size)


def _class_files(root: str) -> tuple[list[str], list[str], list[int]]:
  """(class names, files, class ids): every non-hidden file under each class subfolder."""
  names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
  if not names:
    raise UserError(f"image folder {root!r} has no class subfolders; put each image in a "
                    "subfolder named after its class")
  files, ids = [], []
  for i, name in enumerate(names):
    found = walk_files(os.path.join(root, name))
    files += found
    ids += [i] * len(found)
  return names, files, ids


def walk_files(folder: str) -> list[str]:
  """Every non-hidden file below `folder`: its own first, then each subfolder's in turn,
  names sorted at every level (the order `load_folder` reads a class folder in)."""
  files = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    # Hidden files are OS litter (.DS_Store), not images someone meant to train on.
    files += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
  return files


def load_folder(path: str, *, size: int | Sequence[int] | None = None,
                skip_bad: bool = False) -> ImageSet:
  """Reads an image folder: `path/<class name>/**/<image file>`.

  Class names are the sorted subfolder names. Every image is resized
  (bilinear) to `size` (an int or (height, width)), or when None to the size of
  the first readable image. Images are gray (C=1) if all files are gray, else
  RGB (C=3, gray files repeated); alpha is dropped; 16-bit gray is scaled to 8 bits.
  DICOM files give their first frame as `dicom.read` displays it.

  Raises:
    UserError: no class subfolders, no images, or an unreadable file (named)
      unless `skip_bad`, which leaves such files out and counts them in `skipped`.
  """
  names, files, ids = _class_files(path)
  _check_not_empty(files, path)
  bad: list[str] = []

  def failed(file: str, err: str) -> None:
    if not skip_bad:
      raise UserError(f"cannot read image {file}: {err} (skip_bad=True leaves such files out)")
    bad.append(file)

  hw = layers.pair(size) if size is not None else None
  if hw is None:
    # The common size is the first good image's; decode in order until one reads.
    for f in files:
      first = _decode(f, None)
      if not isinstance(first, str):
        hw = first.shape[:2]
        break
    else:
      hw = (1, 1)  # No file reads: the loop below reports them.

  # Preallocate for gray and widen to RGB at the first colour image, so the peak
  # is about the final array, not a list of decoded images plus their stack.
  images = np.empty((len(files), *hw, 1), np.uint8)
  labels = np.empty(len(files), np.int32)
  n = 0
  pool = concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS)
  try:
    for f, i, a in zip(files, ids, pool.map(lambda f: _decode(f, hw), files)):
      if isinstance(a, str):
        failed(f, a)
        continue
      if a.ndim == 3 and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
      images[n] = a[..., None] if a.ndim == 2 else a
      labels[n] = i
      n += 1
  finally:
    # After an error, drop the queued decodes rather than wait for the whole folder.
    pool.shutdown(cancel_futures=True)
  if n == 0:
    raise UserError(f"image folder {path!r} has no readable images ({len(bad)} skipped)")
  return ImageSet(images[:n], names, labels[:n], skipped=len(bad), skipped_files=bad)


# ---------------------------------------------------------------- IDX (MNIST format)


def idx_labels_path(images_path: str) -> str:
  """The labels file beside an IDX images file: `*-images-idx3-ubyte[.gz]` -> `*-labels-idx1-ubyte[.gz]`.

  Tries the same compression first, then the other one.
  """
  folder, base = os.path.split(images_path)
  if "idx3-ubyte" not in base:
    raise UserError(f"{images_path!r} is not named like an IDX images file (*-images-idx3-ubyte[.gz])")
  stem = base.replace("idx3-ubyte", "idx1-ubyte").replace("images", "labels")
  other = stem[:-3] if stem.endswith(".gz") else stem + ".gz"
  tried = [os.path.join(folder, stem), os.path.join(folder, other)]
  for p in tried:
    if os.path.isfile(p):
      return p
  raise UserError(f"no labels file for {images_path}: looked for {tried[0]} and {tried[1]}")


def read_idx(path: str, ndim: int) -> np.ndarray:
  """One IDX file of unsigned bytes with `ndim` dimensions (gzipped if it ends in .gz).

  Raises:
    UserError: unreadable, wrong magic number (not IDX, not bytes, other rank),
      or a size that disagrees with the header (truncated or padded).
  """
  try:
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
      data = bytearray(f.read())  # bytearray so the array is writable, like the other readers'.
  except (OSError, EOFError) as e:
    raise UserError(f"cannot read IDX file {path}: {e}") from e
  want = 0x0800 + ndim
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[3] != ndim:
    got = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    raise UserError(f"{path} is not an IDX file with {ndim} dimensions: magic number "
                    f"{'missing' if got is None else f'0x{got:08x}'}, expected 0x{want:08x}")
  if data[2] != 0x08:
    raise UserError(f"{path} holds IDX type 0x{data[2]:02x}; only unsigned bytes (0x08) are supported")
  header = 4 + 4 * ndim
  if len(data) < header:
    raise UserError(f"{path} is truncated: {len(data)} bytes, the header alone is {header}")
  dims = struct.unpack(f">{ndim}I", bytes(data[4:header]))
  expected = header + math.prod(dims)
  if len(data) != expected:
    raise UserError(f"{path} holds {len(data)} bytes, but its header (shape {list(dims)}) "
                    f"says {expected}")
  return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def load_idx(images_path: str, label_names: Sequence[str] | None = None) -> ImageSet:
  """Reads an IDX images file and its labels file (found by `idx_labels_path`).

  `label_names` default to "0".."9" (or more digits if a label is >= 10); pass
  FASHION_MNIST_LABELS for Fashion-MNIST.
  """
  images = read_idx(images_path, 3)
  labels_path = idx_labels_path(images_path)
  labels = read_idx(labels_path, 1).astype(np.int32)
  if len(images) != len(labels):
    raise UserError(f"{images_path} has {len(images)} images but {labels_path} has "
                    f"{len(labels)} labels")
  _check_not_empty(images, images_path)
  top = int(labels.max())
  if label_names is None:
    label_names = [str(i) for i in range(max(10, top + 1))]
  elif top >= len(label_names):
    raise UserError(f"{labels_path} has label {top}, but only {len(label_names)} label names "
                    "were given")
  return ImageSet(images[..., None], list(label_names), labels)


# ---------------------------------------------------------------- .npz


def _npz_images(a: np.ndarray, path: str) -> np.ndarray:
  """`images` of a .npz as uint8 NHWC: uint8 as is, integers in 0..255, floats in [0, 1] scaled."""
  if a.ndim == 3:
    a = a[..., None]
  if a.ndim != 4 or a.shape[-1] not in (1, 3):
    raise UserError(f"{path}: 'images' has shape {list(a.shape)}; expected (N, H, W) or "
                    "(N, H, W, C) with C 1 or 3")
  if a.dtype == np.uint8:
    return a
  if a.size == 0:
    return a.astype(np.uint8)
  if np.issubdtype(a.dtype, np.integer):
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi > 255:
      raise UserError(f"{path}: integer 'images' span {lo}..{hi}; expected 0..255")
    return a.astype(np.uint8)
  if np.issubdtype(a.dtype, np.floating):
    lo, hi = float(a.min()), float(a.max())
    if not (0.0 <= lo and hi <= 1.0):  # Also catches NaN.
      raise UserError(f"{path}: float 'images' span {lo}..{hi}; expected values in [0, 1]")
    return np.round(a * 255.0).astype(np.uint8)
  raise UserError(f"{path}: 'images' has dtype {a.dtype}; expected uint8 or float in [0, 1]")


def _npz_arrays(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # zipfile, pickle and format errors: all mean "not a usable .npz".
    raise UserError(f"cannot read {path}: {e}") from e


def load_npz(path: str) -> ImageSet:
  """Reads a .npz with `images` ((N, H, W) or (N, H, W, C); uint8, or float in [0, 1]),
  `labels` (N integer ids, or N strings) and optionally `label_names`.

  String labels become ids into their sorted distinct values (or into
  `label_names` when present). Integer labels without `label_names` are named
  "0".."max".
  """
  arrays = _npz_arrays(path)
  missing = [k for k in ("images", "labels") if k not in arrays]
  if missing:
    raise UserError(f"{path} has no array {missing[0]!r}; arrays are {sorted(arrays)}")
  images = _npz_images(arrays["images"], path)
  raw = arrays["labels"]
  if raw.ndim != 1 or len(raw) != len(images):
    raise UserError(f"{path}: 'labels' has shape {list(raw.shape)}; expected ({len(images)},), "
                    "one per image")
  _check_not_empty(images, path)
  names = [str(n) for n in arrays["label_names"]] if "label_names" in arrays else None
  if raw.dtype.kind in "US":
    values = [str(v) for v in raw]
    names = names if names is not None else sorted(set(values))
    return align_labels(ImageSet(images, values, np.arange(len(values), dtype=np.int32)),
                        names, path)
  if raw.dtype.kind not in "iu":
    raise UserError(f"{path}: 'labels' has dtype {raw.dtype}; expected integers or strings")
  labels = raw.astype(np.int32)
  if int(labels.min()) < 0:
    raise UserError(f"{path}: labels must be >= 0, got {int(labels.min())}")
  top = int(labels.max())
  if names is None:
    names = [str(i) for i in range(top + 1)]
  elif top >= len(names):
    raise UserError(f"{path} has label {top}, but 'label_names' has only {len(names)} names")
  return ImageSet(images, names, labels)


# ---------------------------------------------------------------- tables (parquet, hub datasets)


def _table_file(value: str, folder: str | None) -> str:
  """A file path from a table: relative ones are taken from the table's `folder`.

  Where only the working directory has the file, it is used: tables written
  before paths were read relative to the table kept working.
  """
  value = os.path.expanduser(value)
  if folder is None or os.path.isabs(value):
    return value
  beside = os.path.join(folder, value)
  return value if not os.path.exists(beside) and os.path.exists(value) else beside


def _table_image(value: Any, size: Size | None, folder: str | None = None) -> np.ndarray | str:
  """One cell of an image column (a decoded image, {"bytes", "path"} or a file path,
  relative ones from `folder`)."""
  if isinstance(value, str):
    return _decode(_table_file(value, folder), size)
  if isinstance(value, dict):
    data = value.get("bytes")
    return _decode(io.BytesIO(data) if data else value.get("path"), size)
  try:
    a = _to_uint8(value)
  except (AttributeError, OSError, ValueError) as e:
    return f"{type(e).__name__}: {e}"
  return _fit(a, size)


def _table_folder(spec: str) -> str | None:
  """The folder of a local table file, where its relative image paths start; else None."""
  local = None if storage.is_remote(spec) else os.path.expanduser(spec)
  return os.path.dirname(os.path.abspath(local)) if local and os.path.isfile(local) else None


def load_table(spec: str, split: str = "train", *, size: int | Sequence[int] | None = None,
               skip_bad: bool = False, image_key: str = "image",
               label_key: str = "label") -> ImageSet:
  """Reads a table with an image column and a label column: a parquet / json / csv
  file or a Hugging Face hub dataset (`split` picks the hub split).

  The image column (`image_key`) holds images, or paths of image / DICOM files
  (a csv of `path,label` with image_key="path"); a relative path is taken
  from the folder of a local table file. Labels are a ClassLabel's names, or
  the sorted distinct values.

  Raises:
    UserError: unreadable or empty data, a missing column, or an unreadable
      image (named by its row) unless `skip_bad`.
  """
  ds = sources.load_split(spec, split, required=[image_key, label_key])
  names = text.label_names(ds, label_key)
  ids = text.label_ids(ds, label_key, names, spec)
  hw = layers.pair(size) if size is not None else None
  folder = _table_folder(spec)
  kept, labels, bad = [], [], []
  for row, (value, label) in enumerate(zip(ds[image_key], ids)):
    a = _table_image(value, hw, folder)
    if isinstance(a, str):
      if not skip_bad:
        raise UserError(f"cannot read the image in row {row} of {spec}: {a} "
                        "(skip_bad=True leaves such rows out)")
      bad.append(f"{spec} row {row}")
      continue
    hw = hw or a.shape[:2]
    kept.append(a[..., None] if a.ndim == 2 else a)
    labels.append(label)
  if not kept:
    raise UserError(f"image data {spec!r} has no readable images ({len(bad)} skipped)")
  if any(a.shape[-1] == 3 for a in kept):
    kept = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in kept]
  return ImageSet(np.stack(kept), names, np.asarray(labels, np.int32), skipped=len(bad),
                  skipped_files=bad)


# ---------------------------------------------------------------- dispatch and labels


# File types read as tables by `load` (with `datasets`, like text data).
_TABLES = (".parquet", ".json", ".jsonl", ".csv", ".tsv")


def load(spec: str, *, skip_bad: bool = False, size: int | Sequence[int] | None = None,
         label_names: Sequence[str] | None = None, split: str = "train",
         image_key: str = "image", label_key: str = "label") -> ImageSet:
  """Reads image data by the form of `spec`.

  A directory is an image folder (`load_folder`, with `size` and `skip_bad`);
  a file named *idx3-ubyte* (optionally .gz) is IDX (`load_idx`, with
  `label_names`); a .npz file is `load_npz`; a parquet / json / csv file or a
  name that is not a path (a hub dataset, its `split`) is `load_table`.

  Raises:
    UserError: the path is missing, of another kind, unreadable, or empty.
  """
  path = os.path.expanduser(storage.local_copy(spec))
  if os.path.isdir(path):
    return load_folder(path, size=size, skip_bad=skip_bad)
  looks_like_path = spec.startswith((".", "/", "~")) or os.path.splitext(spec)[1] != ""
  if not os.path.exists(path) and not looks_like_path:
    return load_table(spec, split, size=size, skip_bad=skip_bad, image_key=image_key,
                      label_key=label_key)
  if not os.path.exists(path):
    raise UserError(f"image data not found: {spec}")
  if path.lower().endswith(_TABLES):
    return load_table(path, split, size=size, skip_bad=skip_bad, image_key=image_key,
                      label_key=label_key)
  base = os.path.basename(path)
  if "idx3-ubyte" in base:
    return load_idx(path, label_names)
  if base.lower().endswith(".npz"):
    return load_npz(path)
  hint = "; pass the images file, its labels file is found by name" if "idx1-ubyte" in base else ""
  raise UserError(f"cannot read image data {spec!r}: expected an image folder (one subfolder "
                  f"per class), an IDX images file (*-images-idx3-ubyte[.gz]), a .npz, a "
                  f"parquet / json / csv table or a hub dataset name{hint}")


def align_labels(data: ImageSet, names: Sequence[str], name: str) -> ImageSet:
  """`data` with its labels re-numbered as ids into `names` (eval data under the training labels).

  Raises:
    UserError: `data` has labels not in `names`.
  """
  index = {n: i for i, n in enumerate(names)}
  unknown = sorted({data.label_names[i] for i in np.unique(data.labels)} - set(index))
  if unknown:
    raise UserError(f"{name} data has labels {unknown[:5]} not among the training labels "
                    f"{list(names)}")
  remap = np.asarray([index.get(n, -1) for n in data.label_names], np.int32)
  return dataclasses.replace(data, label_names=list(names), labels=remap[data.labels])


# ---------------------------------------------------------------- images without labels (predict)


@dataclasses.dataclass
class Unlabeled:
  """Images to predict on, in a fixed order, decoded a slice at a time (`read`).

  ids: per image, its file path (a folder, a single file) or its row (an array file,
    a table: its `id` column where it has one).
  truth: per image, the label the data gives it, or None where it gives none: a class
    subfolder's name, or a label column's or labels array's value (an integer id
    where the data holds ids).
  """
  ids: list[Any]
  truth: list[Any] | None
  _read: Callable[[int, int], list[np.ndarray | str]]

  def __len__(self) -> int:
    return len(self.ids)

  def read(self, start: int, stop: int) -> list[np.ndarray | str]:
    """Images start..stop-1 as uint8 [H, W] or [H, W, C], or for an unreadable file a
    one-line reason. Files and tables are decoded at the `size` they were opened with,
    arrays come as stored: as `load` reads them."""
    return self._read(start, stop)


def _decode_many(decode: Callable[[Any], np.ndarray | str], values: Sequence[Any]
                 ) -> list[np.ndarray | str]:
  with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
    return list(pool.map(decode, values))


def _unlabeled_folder(spec: str, path: str, hw: Size | None) -> Unlabeled:
  files = walk_files(path)
  _check_not_empty(files, spec)
  rel = [os.path.relpath(f, path).split(os.sep) for f in files]
  # A file in a subfolder of a class-folder layout: the subfolder names its class.
  truth = [parts[0] if len(parts) > 1 else None for parts in rel]
  return Unlabeled([storage.join(spec, *parts) for parts in rel],
                   truth if any(t is not None for t in truth) else None,
                   lambda a, b: _decode_many(lambda f: _decode(f, hw), files[a:b]))


def _unlabeled_table(spec: str, split: str, hw: Size | None, image_key: str,
                     label_key: str) -> Unlabeled:
  ds = sources.load_split(spec, split, required=[image_key])
  ids = list(ds["id"]) if "id" in ds.column_names else list(range(len(ds)))
  truth = None
  if label_key in ds.column_names:
    feature = ds.features[label_key]
    truth = list(ds[label_key])
    if isinstance(feature, datasets.ClassLabel):
      # Hub test splits mark a missing label -1.
      truth = [feature.names[t] if t is not None and 0 <= t < len(feature.names) else None
               for t in truth]
  images, folder = ds.select_columns([image_key]), _table_folder(spec)
  return Unlabeled(ids, truth, lambda a, b: _decode_many(
      lambda v: _table_image(v, hw, folder), images[a:b][image_key]))


def _unlabeled_arrays(images: np.ndarray, truth: list[Any] | None) -> Unlabeled:
  return Unlabeled(list(range(len(images))), truth, lambda a, b: list(images[a:b]))


def _unlabeled_npz(path: str) -> Unlabeled:
  arrays = _npz_arrays(path)
  if "images" not in arrays:
    raise UserError(f"{path} has no array 'images'; arrays are {sorted(arrays)}")
  images = _npz_images(arrays["images"], path)
  _check_not_empty(images, path)
  labels = arrays.get("labels")
  if labels is None or labels.ndim != 1 or len(labels) != len(images):
    return _unlabeled_arrays(images, None)  # Labels are not needed to predict.
  names = [str(n) for n in arrays["label_names"]] if "label_names" in arrays else None
  truth = [str(v) if labels.dtype.kind in "US" else
           names[int(v)] if names is not None and 0 <= int(v) < len(names) else int(v)
           for v in labels]
  return _unlabeled_arrays(images, truth)


def _unlabeled_idx(path: str) -> Unlabeled:
  images = read_idx(path, 3)[..., None]
  _check_not_empty(images, path)
  try:
    labels = read_idx(idx_labels_path(path), 1)
  except UserError:
    labels = None  # Labels are not needed to predict.
  truth = [int(v) for v in labels] if labels is not None and len(labels) == len(images) else None
  return _unlabeled_arrays(images, truth)


def open_unlabeled(spec: str, *, size: int | Sequence[int] | None = None, split: str = "train",
                   image_key: str = "image", label_key: str = "label") -> Unlabeled:
  """Image data to predict on, by the form of `spec` as `load` reads it, labels not needed.

  A folder: every non-hidden file below it (`walk_files`' order; flat, or one
  subfolder per class as `load_folder` reads); an IDX images file, a .npz
  (`images`; `labels` optional), a parquet / json / csv table or hub dataset
  with an `image_key` column (its `label_key` column optional); any other
  file is one image (a DICOM file, a PNG, ...). Decoding waits for `read`.

  Raises:
    UserError: the path is missing, empty, or an array or table that cannot be read.
  """
  hw = layers.pair(size) if size is not None else None
  path = os.path.expanduser(storage.local_copy(spec))
  if os.path.isdir(path):
    return _unlabeled_folder(spec, path, hw)
  looks_like_path = spec.startswith((".", "/", "~")) or os.path.splitext(spec)[1] != ""
  if not os.path.exists(path) and not looks_like_path:
    return _unlabeled_table(spec, split, hw, image_key, label_key)
  if not os.path.exists(path):
    raise UserError(f"image data not found: {spec}")
  base = os.path.basename(path).lower()
  if base.endswith(_TABLES):
    return _unlabeled_table(path, split, hw, image_key, label_key)
  if "idx3-ubyte" in base:
    return _unlabeled_idx(path)
  if base.endswith(".npz"):
    return _unlabeled_npz(path)
  return Unlabeled([spec], None, lambda a, b: [_decode(path, hw)][a:b])
