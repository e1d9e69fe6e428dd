"""Image readers: folders, IDX, npz and tables into uint8 arrays with labels; label alignment."""

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from jaxft.data import image_files
from jaxft.errors import UserError


def _rng(seed=0):
  return np.random.default_rng(seed)


def _write_folder(root, *, corrupt=False):
  """cat/ holds two 8x6 RGB PNGs, dog/ a 4x4 gray JPEG and a 8x6 gray PNG; maybe dog/x.png is text."""
  (root / "cat").mkdir(parents=True)
  (root / "dog").mkdir()
  pixels = _rng().integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
  for i, p in enumerate(pixels):
    Image.fromarray(p).save(root / "cat" / f"{i}.png")
  Image.fromarray(np.full((4, 4), 200, np.uint8)).save(root / "dog" / "a.jpg", quality=95)
  Image.fromarray(np.full((8, 6), 50, np.uint8)).save(root / "dog" / "b.png")
  (root / "dog" / ".DS_Store").write_bytes(b"\0junk")  # Hidden: ignored.
  if corrupt:
    (root / "dog" / "x.png").write_text("not an image at all")
  return pixels


def test_folder_reads_classes_shapes_and_labels(tmp_path):
  pixels = _write_folder(tmp_path)
  data = image_files.load(str(tmp_path))
  assert data.label_names == ["cat", "dog"]
  # Size of the first image (cat/0.png), RGB because some files have colour.
  assert data.images.shape == (4, 8, 6, 3) and data.images.dtype == np.uint8
  np.testing.assert_array_equal(data.labels, [0, 0, 1, 1])
  assert data.labels.dtype == np.int32 and data.skipped == 0
  np.testing.assert_array_equal(data.images[:2], pixels)  # PNG is lossless, no resize.
  # Gray files repeat their value over RGB; the 4x4 JPEG is resized to 8x6.
  assert np.abs(data.images[2].astype(int) - 200).max() <= 2
  np.testing.assert_array_equal(data.images[3], np.full((8, 6, 3), 50))
  sized = image_files.load(str(tmp_path), size=5)
  assert sized.images.shape == (4, 5, 5, 3)


def test_all_gray_folder_stays_one_channel(tmp_path):
  for c in ("a", "b"):
    (tmp_path / c).mkdir()
    Image.fromarray(np.full((3, 3), 7, np.uint8)).save(tmp_path / c / "i.png")
  data = image_files.load(str(tmp_path))
  assert data.images.shape == (2, 3, 3, 1)


def test_folder_16_bit_png_keeps_its_range(tmp_path):
  for c in ("a", "b"):
    (tmp_path / c).mkdir()
  Image.fromarray(np.full((2, 2), 65535, np.uint16)).save(tmp_path / "a" / "i.png")
  Image.fromarray(np.full((2, 2), 32768, np.uint16)).save(tmp_path / "b" / "i.png")
  data = image_files.load(str(tmp_path))
  np.testing.assert_array_equal(data.images[:, 0, 0, 0], [255, 128])


def test_corrupt_file_is_named_or_skipped(tmp_path):
  _write_folder(tmp_path, corrupt=True)
  with pytest.raises(UserError, match=r"x\.png"):
    image_files.load(str(tmp_path))
  data = image_files.load(str(tmp_path), skip_bad=True)
  assert data.skipped == 1 and data.skipped_files[0].endswith("x.png")
  assert data.images.shape == (4, 8, 6, 3)
  np.testing.assert_array_equal(data.labels, [0, 0, 1, 1])


def test_folder_errors(tmp_path):
  with pytest.raises(UserError, match="not found"):
    image_files.load(str(tmp_path / "missing"))
  (tmp_path / "flat").mkdir()
  Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "flat" / "i.png")
  with pytest.raises(UserError, match="no class subfolders"):
    image_files.load(str(tmp_path / "flat"))
  (tmp_path / "empty" / "a").mkdir(parents=True)
  with pytest.raises(UserError, match="empty"):
    image_files.load(str(tmp_path / "empty"))
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(UserError, match="expected an image folder"):
    image_files.load(str(tmp_path / "notes.txt"))


def _idx(array, dtype_code=0x08):
  header = bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write_idx(folder, prefix, pixels, labels, gz=True):
  ext = ".gz" if gz else ""
  opener = gzip.open if gz else open
  path = folder / f"{prefix}-images-idx3-ubyte{ext}"
  with opener(path, "wb") as f:
    f.write(_idx(pixels))
  with opener(folder / f"{prefix}-labels-idx1-ubyte{ext}", "wb") as f:
    f.write(_idx(labels))
  return str(path)


def test_idx_round_trip(tmp_path):
  pixels = _rng().integers(0, 256, (5, 4, 3), dtype=np.uint8)
  labels = np.array([0, 9, 3, 3, 1], np.uint8)
  data = image_files.load(_write_idx(tmp_path, "train", pixels, labels))
  np.testing.assert_array_equal(data.images, pixels[..., None])
  np.testing.assert_array_equal(data.labels, labels)
  assert data.labels.dtype == np.int32
  assert data.label_names == [str(i) for i in range(10)]
  plain = image_files.load(_write_idx(tmp_path, "t10k", pixels, labels, gz=False),
                      label_names=image_files.FASHION_MNIST_LABELS)
  np.testing.assert_array_equal(plain.images[..., 0], pixels)
  assert plain.label_names[9] == "Ankle boot"


def test_idx_bad_magic_size_and_missing_labels(tmp_path):
  pixels = np.zeros((2, 3, 3), np.uint8)
  path = _write_idx(tmp_path, "train", pixels, np.zeros(2, np.uint8), gz=False)
  with open(path, "wb") as f:
    f.write(b"\x12\x34" + _idx(pixels)[2:])
  with pytest.raises(UserError, match="magic number 0x12340803, expected 0x00000803"):
    image_files.load(path)
  with open(path, "wb") as f:
    f.write(_idx(pixels)[:-1])
  with pytest.raises(UserError, match="header"):
    image_files.load(path)
  with open(path, "wb") as f:
    f.write(_idx(np.zeros((3, 3, 3), np.uint8)))
  with pytest.raises(UserError, match="3 images but .* 2 labels"):
    image_files.load(path)
  lonely = tmp_path / "x-images-idx3-ubyte.gz"
  with gzip.open(lonely, "wb") as f:
    f.write(_idx(pixels))
  with pytest.raises(UserError, match="no labels file .*x-labels-idx1-ubyte.gz"):
    image_files.load(str(lonely))


def test_npz_reads_uint8_float_and_string_labels(tmp_path):
  pixels = _rng().integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
  np.savez(tmp_path / "a.npz", images=pixels, labels=np.array([1, 0, 1]),
           label_names=np.array(["benign", "malignant"]))
  data = image_files.load(str(tmp_path / "a.npz"))
  np.testing.assert_array_equal(data.images, pixels)
  np.testing.assert_array_equal(data.labels, [1, 0, 1])
  assert data.label_names == ["benign", "malignant"]
  np.savez(tmp_path / "b.npz", images=pixels[..., 0] / 255.0, labels=np.array(["y", "x", "y"]))
  data = image_files.load(str(tmp_path / "b.npz"))
  np.testing.assert_array_equal(data.images, pixels[..., :1])
  assert data.label_names == ["x", "y"]
  np.testing.assert_array_equal(data.labels, [1, 0, 1])
  np.savez(tmp_path / "c.npz", images=pixels * 2.0, labels=np.zeros(3, int))
  with pytest.raises(UserError, match=r"expected values in \[0, 1\]"):
    image_files.load(str(tmp_path / "c.npz"))
  np.savez(tmp_path / "d.npz", images=pixels)
  with pytest.raises(UserError, match="no array 'labels'"):
    image_files.load(str(tmp_path / "d.npz"))


def test_align_labels_maps_eval_to_training_ids():
  data = image_files.ImageSet(np.zeros((3, 1, 1, 1), np.uint8), ["b", "c"],
                              np.array([0, 1, 0], np.int32))
  aligned = image_files.align_labels(data, ["a", "b", "c"], "eval")
  np.testing.assert_array_equal(aligned.labels, [1, 2, 1])
  with pytest.raises(UserError, match=r"eval data has labels \['c'\]"):
    image_files.align_labels(data, ["a", "b"], "eval")


def test_parquet_table_with_an_image_column_reads_like_a_hub_dataset(tmp_path):
  import datasets
  rng = np.random.default_rng(0)
  pictures = [Image.fromarray(rng.integers(0, 255, (10, 12), dtype=np.uint8)) for _ in range(4)]
  ds = datasets.Dataset.from_dict(
      {"img": pictures, "label": ["cat", "dog", "cat", "dog"]},
      features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("string")}))
  path = str(tmp_path / "pets.parquet")
  ds.to_parquet(path)
  data = image_files.load(path, image_key="img", size=8)
  assert data.label_names == ["cat", "dog"] and data.labels.tolist() == [0, 1, 0, 1]
  assert data.images.shape == (4, 8, 8, 1) and data.images.dtype == np.uint8
  with pytest.raises(UserError, match="has no column 'image'"):
    image_files.load(path, size=8)
