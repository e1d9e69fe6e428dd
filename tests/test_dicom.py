"""DICOM input: `dicom.read` against pydicom's own LUTs on real files, and DICOM in image folders and tables.

The files are the real ones pydicom ships with (pydicom.data); each expected
image is computed here from pydicom's pixel_array, apply_modality_lut and
apply_voi_lut with the display mapping written out again, not by `dicom.read`.
"""

import importlib.util
import io
import pathlib
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from jaxft.data import dicom
from jaxft.data import image_files
from jaxft.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNEUMONIA = ROOT / "data" / "pneumoniamnist" / "val.npz"

# Real files from pydicom's test data, by what they exercise.
MR = "MR_small.dcm"  # Signed 16-bit, window 600/1600, no rescale.
CT = "CT_small.dcm"  # Signed 16-bit CT, rescale -1024, no window.
CT_WINDOW = "dicomdirtests/77654033/CT2/17106"  # Signed 16-bit CT, rescale and window 30/100; no suffix.
CR_MONO1 = "dicomdirtests/77654033/CR1/6154"  # MONOCHROME1, 12-bit unsigned, rescale 0.684/200, window.
TWO_WINDOWS = "examples_overlay.dcm"  # 12-bit unsigned with two windows: [450, 790] / [200, 443].
EIGHT_BIT = "image_dfl.dcm"  # 8-bit unsigned (deflated syntax), no window.
MULTI_FRAME = "rtdose.dcm"  # 15 frames of 32-bit unsigned dose, no window.
RGB = "examples_rgb_color.dcm"
RGB_16 = "SC_rgb_rle_16bit.dcm"
RGB_2_FRAMES = "SC_rgb_rle_2frame.dcm"
PALETTE = "examples_palette.dcm"  # PALETTE COLOR with 16-bit palette entries.
JPEG_LS = "MR_small_jpeg_ls_lossless.dcm"  # No JPEG-LS decoder is installed (pylibjpeg, gdcm, pyjpegls).


def _file(name):
  return get_testdata_file(name)


def _to_255(x, lo, hi):
  """lo -> 0, hi -> 255 linearly; rounded and clipped."""
  return np.clip(np.rint((np.asarray(x, np.float64) - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)


def _expected(name, lo=None, hi=None, frame=None):
  """pydicom's modality then VOI LUT on the stored frame, [lo, hi] (default: its min..max) -> 0..255."""
  ds = pydicom.dcmread(_file(name))
  stored = ds.pixel_array if frame is None else ds.pixel_array[frame]
  x = apply_voi_lut(apply_modality_lut(stored, ds), ds)
  return _to_255(x, x.min() if lo is None else lo, x.max() if hi is None else hi)


# The window output of apply_voi_lut spans the range of the stored bits, passed
# through the rescale: that range is what maps onto 0..255.
SIGNED_16 = (-2.0 ** 15, 2.0 ** 15 - 1)


def test_window_maps_the_stored_bit_range_of_pydicom_onto_0_255():
  got = dicom.read(_file(MR))
  assert got.dtype == np.uint8 and got.shape == (64, 64)
  np.testing.assert_array_equal(got, _expected(MR, *SIGNED_16))
  # The DICOM LINEAR window (PS3.3 C.11.2.1.2.1) straight from the stored
  # values: within 1 gray level, as the two computations round floats apart.
  x = pydicom.dcmread(_file(MR)).pixel_array.astype(np.float64)
  c, w = 600, 1600
  direct = np.clip(((x - (c - 0.5)) / (w - 1) + 0.5) * 255, 0, 255)
  assert np.abs(got - direct).max() <= 1
  assert (got[x > c + w / 2] == 255).all() and got.min() > 0  # Clipped above, not below (min 127).


def test_signed_ct_without_a_window_stretches_its_own_range():
  got = dicom.read(_file(CT))
  np.testing.assert_array_equal(got, _expected(CT))
  assert got.min() == 0 and got.max() == 255


def test_signed_ct_with_rescale_and_window():
  lo, hi = (v * 1 - 1024 for v in SIGNED_16)  # Slope 1, intercept -1024.
  got = dicom.read(_file(CT_WINDOW))
  np.testing.assert_array_equal(got, _expected(CT_WINDOW, lo, hi))
  ds = pydicom.dcmread(_file(CT_WINDOW))
  hu = apply_modality_lut(ds.pixel_array, ds)
  assert (got[hu <= 30 - 50] == 0).all() and (got[hu >= 30 + 50] == 255).all()


def test_monochrome1_is_inverted_so_higher_is_brighter():
  ds = pydicom.dcmread(_file(CR_MONO1))
  assert ds.PhotometricInterpretation == "MONOCHROME1"
  lo, hi = 0 * 0.684 + 200, (2 ** 12 - 1) * 0.684 + 200  # 12 bits unsigned, rescaled.
  np.testing.assert_array_equal(dicom.read(_file(CR_MONO1)), 255 - _expected(CR_MONO1, lo, hi))


def test_first_of_several_windows():
  ds = pydicom.dcmread(_file(TWO_WINDOWS))
  assert list(ds.WindowCenter) == [450, 200]
  got = dicom.read(_file(TWO_WINDOWS))
  np.testing.assert_array_equal(got, _expected(TWO_WINDOWS, 0, 2 ** 12 - 1))
  x = ds.pixel_array
  assert (got[x <= 450 - 790 / 2] == 0).all() and (got[x >= 450 + 790 / 2] == 255).all()


def test_voi_lut_sequence_maps_its_entry_range(tmp_path):
  # No bundled file has a VOI LUT Sequence: MR_small with one added, 16 bits per
  # entry from stored value 0, rising steeply, so some entries pass 2**15.
  ds = pydicom.dcmread(_file(MR))
  item = Dataset()
  item.LUTDescriptor = [4096, 0, 16]
  item.add_new("LUTData", "US", [min(v * 40, 65535) for v in range(4096)])
  ds.VOILUTSequence = [item]
  path = tmp_path / "voi.dcm"
  ds.save_as(path)
  x = apply_voi_lut(ds.pixel_array, ds)  # Prefers the LUT over the window, like the file's readers.
  np.testing.assert_array_equal(dicom.read(str(path)), _to_255(x, 0, 65535))


def test_8_bit_file():
  got = dicom.read(_file(EIGHT_BIT))
  assert got.shape == (512, 512)
  np.testing.assert_array_equal(got, _expected(EIGHT_BIT))
  np.testing.assert_array_equal(got, pydicom.dcmread(_file(EIGHT_BIT)).pixel_array)  # It spans 0..255.


def test_multi_frame_picks_a_frame_and_checks_its_index():
  assert pydicom.dcmread(_file(MULTI_FRAME)).NumberOfFrames == 15
  np.testing.assert_array_equal(dicom.read(_file(MULTI_FRAME)), _expected(MULTI_FRAME, frame=0))
  np.testing.assert_array_equal(dicom.read(_file(MULTI_FRAME), frame=14),
                                _expected(MULTI_FRAME, frame=14))
  with pytest.raises(UserError, match=r"rtdose\.dcm: frame 15 is out of range; it has 15 frames"):
    dicom.read(_file(MULTI_FRAME), frame=15)
  with pytest.raises(UserError, match="frame -1 is out of range"):
    dicom.read(_file(MULTI_FRAME), frame=-1)
  with pytest.raises(UserError, match=r"MR_small\.dcm: frame 1 is out of range; it has 1 frame$"):
    dicom.read(_file(MR), frame=1)


def test_colour_files_keep_three_channels():
  rgb = dicom.read(_file(RGB))
  assert rgb.shape == (240, 320, 3)
  np.testing.assert_array_equal(rgb, pydicom.dcmread(_file(RGB)).pixel_array)
  np.testing.assert_array_equal(dicom.read(_file(RGB_16)),
                                _to_255(pydicom.dcmread(_file(RGB_16)).pixel_array, 0, 65535))
  np.testing.assert_array_equal(dicom.read(_file(RGB_2_FRAMES), frame=1),
                                pydicom.dcmread(_file(RGB_2_FRAMES)).pixel_array[1])
  ds = pydicom.dcmread(_file(PALETTE))
  np.testing.assert_array_equal(dicom.read(_file(PALETTE)),
                                _to_255(apply_color_lut(ds.pixel_array, ds), 0, 65535))


def test_failures_are_user_errors_naming_the_file(tmp_path):
  fake = tmp_path / "x.dcm"
  fake.write_text("not a DICOM file")
  with pytest.raises(UserError, match=rf"{fake}: not a DICOM file"):
    dicom.read(str(fake))
  with pytest.raises(UserError, match=r"DICOMDIR: it has no pixel data"):
    dicom.read(_file("DICOMDIR"))
  with pytest.raises(UserError, match=r"JPEG-LS Lossless Image Compression.*missing dependencies") as e:
    dicom.read(_file(JPEG_LS))
  assert "\n" not in str(e.value)
  truncated = tmp_path / "cut.dcm"
  truncated.write_bytes(pathlib.Path(_file(MR)).read_bytes()[:5000])
  with pytest.raises(UserError, match=rf"{truncated}: "):
    dicom.read(str(truncated))


def test_is_dicom_by_suffix_or_marker(tmp_path):
  assert dicom.is_dicom(_file(CT_WINDOW))  # No suffix: the DICM marker.
  assert dicom.is_dicom(str(tmp_path / "missing.DCM"))
  png = tmp_path / "a.png"
  png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
  assert not dicom.is_dicom(str(png)) and not dicom.is_dicom(str(tmp_path / "missing"))
  f = io.BytesIO(pathlib.Path(_file(CT)).read_bytes())
  assert dicom.is_dicom(f) and f.tell() == 0


def _write_dicom_folder(root):
  """normal/ holds MR and CT (64x64, 128x128), pneumonia/ two 16x16 CTs, one nested, without suffix."""
  (root / "normal").mkdir(parents=True)
  (root / "pneumonia" / "series").mkdir(parents=True)
  shutil.copy(_file(MR), root / "normal" / "a.dcm")
  shutil.copy(_file(CT), root / "normal" / "b.dcm")
  shutil.copy(_file(CT_WINDOW), root / "pneumonia" / "c.dcm")
  shutil.copy(_file("dicomdirtests/77654033/CT2/17136"), root / "pneumonia" / "series" / "17136")
  return [root / "normal" / "a.dcm", root / "normal" / "b.dcm", root / "pneumonia" / "c.dcm",
          root / "pneumonia" / "series" / "17136"]


def test_dicom_folder_loads_with_labels_and_size(tmp_path):
  files = _write_dicom_folder(tmp_path / "xray")
  data = image_files.load(str(tmp_path / "xray"), size=32)
  assert data.label_names == ["normal", "pneumonia"] and data.labels.tolist() == [0, 0, 1, 1]
  assert data.images.shape == (4, 32, 32, 1) and data.images.dtype == np.uint8
  for got, f in zip(data.images, files):
    np.testing.assert_array_equal(got[..., 0], image_files._fit(dicom.read(str(f)), (32, 32)))
  as_stored = image_files.load(str(tmp_path / "xray"))  # The first file's size: MR's 64x64.
  assert as_stored.images.shape == (4, 64, 64, 1)
  np.testing.assert_array_equal(as_stored.images[0, ..., 0], dicom.read(str(files[0])))


def test_non_dicom_dcm_in_a_folder_is_named_or_skipped(tmp_path):
  _write_dicom_folder(tmp_path / "xray")
  bad = tmp_path / "xray" / "normal" / "x.dcm"
  bad.write_text("hello")
  with pytest.raises(UserError, match=rf"cannot read image {bad}: not a DICOM file"):
    image_files.load(str(tmp_path / "xray"), size=16)
  data = image_files.load(str(tmp_path / "xray"), size=16, skip_bad=True)
  assert len(data) == 4 and data.skipped_files == [str(bad)]


def test_csv_of_paths_and_labels(tmp_path):
  files = _write_dicom_folder(tmp_path / "xray")
  rows = ["path,label", "xray/normal/a.dcm,normal", f"{files[2]},pneumonia",
          "xray/pneumonia/series/17136,pneumonia", "xray/normal/b.dcm,normal"]
  (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
  data = image_files.load(str(tmp_path / "table.csv"), image_key="path", size=(16, 20))
  assert data.label_names == ["normal", "pneumonia"] and data.labels.tolist() == [0, 1, 1, 0]
  assert data.images.shape == (4, 16, 20, 1)
  for got, f in zip(data.images, [files[0], files[2], files[3], files[1]]):
    np.testing.assert_array_equal(got[..., 0], image_files._fit(dicom.read(str(f)), (16, 20)))
  with pytest.raises(UserError, match="has no column 'image'"):
    image_files.load(str(tmp_path / "table.csv"))


def _script():
  spec = importlib.util.spec_from_file_location("pneumonia_to_dicom",
                                                ROOT / "scripts" / "pneumonia_to_dicom.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_pneumonia_npz_to_dicom_round_trips(tmp_path):
  out = tmp_path / "dicom"
  assert _script().main(["--npz", str(PNEUMONIA), "--out", str(out), "--limit", "20"]) == 0
  with np.load(PNEUMONIA) as z:
    images, labels, names = z["images"][:20], z["labels"][:20], list(z["label_names"])
  files = sorted(out.rglob("*.dcm"))
  assert len(files) == 20 and (out / "pneumonia" / "000.dcm").exists()
  ds = pydicom.dcmread(files[0])
  assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
  assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
  assert (ds.PhotometricInterpretation, ds.BitsStored) == ("MONOCHROME2", 8)
  assert len({pydicom.dcmread(f).SOPInstanceUID for f in files}) == 20
  assert pathlib.Path(files[0]).read_bytes()[128:132] == b"DICM"
  data = image_files.load(str(out))
  # Class by class in sorted name order, each in index order.
  order = np.concatenate([np.flatnonzero(labels == i) for i in range(len(names))])
  assert data.label_names == names
  np.testing.assert_array_equal(data.labels, labels[order])
  np.testing.assert_array_equal(data.images[..., 0], images[order])
