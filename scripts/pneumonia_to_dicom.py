"""Writes the images of a PneumoniaMNIST-style .npz as a folder of DICOM files.

  python scripts/pneumonia_to_dicom.py --npz data/pneumoniamnist/val.npz --out DIR [--limit N]

Each image (uint8 [H, W] of the npz's `images`) becomes DIR/<label name>/<index>.dcm:
a Secondary Capture, MONOCHROME2, 8 bits, explicit VR little endian, with its
own SOP Instance UID. Indices are zero-padded so that sorted names are index
order. The result is an image folder `jaxft` reads like any other (a real
DICOM input to try the pipeline on); `image_files.load(DIR)` gives back the
npz's pixels exactly.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def to_dataset(image: np.ndarray, study: str, series: str, number: int) -> Dataset:
  """One uint8 [H, W] image as a Secondary Capture dataset of study / series UIDs."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
  ds.Modality = "OT"
  ds.ConversionType = "WSD"  # Workstation: made from other data, not scanned.
  ds.PatientName, ds.PatientID = "", ""
  ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "", "", "", ""
  ds.ReferringPhysicianName = ""
  ds.SeriesNumber, ds.InstanceNumber = 1, number
  ds.PatientOrientation = ""
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.Rows, ds.Columns = image.shape
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
  ds.PixelRepresentation = 0
  # The stored values already are display values: this window shows them as
  # they are (0 -> black, 255 -> white), where a reader without a window would
  # stretch each image's own min..max.
  ds.WindowCenter, ds.WindowWidth = 128, 256
  data = np.ascontiguousarray(image, np.uint8).tobytes()
  ds.PixelData = data + b"\0" * (len(data) % 2)  # DICOM values have even lengths.
  return ds


def write(images: np.ndarray, labels: np.ndarray, names: Sequence[str], out: str,
          total: int | None = None) -> list[str]:
  """Writes out/<names[label]>/<index>.dcm for each image; returns the paths.

  Indices are zero-padded to the digits of `total - 1` (default: of these images).
  """
  width = len(str(max((total or len(images)) - 1, 0)))
  study, series = generate_uid(), generate_uid()
  paths = []
  for i, (image, label) in enumerate(zip(images, labels)):
    folder = os.path.join(out, names[int(label)])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{i:0{width}d}.dcm")
    pydicom.dcmwrite(path, to_dataset(image, study, series, i + 1), enforce_file_format=True)
    paths.append(path)
  return paths


def main(argv: Sequence[str] | None = None) -> int:
  """The command line: --npz, --out, --limit."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--npz", required=True, help="a .npz with images (N, H, W) uint8, labels, "
                 "label_names")
  p.add_argument("--out", required=True, help="the folder to write <label name>/<index>.dcm into")
  p.add_argument("--limit", type=int, default=None, help="only the first N images")
  args = p.parse_args(argv)
  with np.load(args.npz, allow_pickle=False) as z:
    images, labels = z["images"], z["labels"].reshape(-1)
    names = ([str(n) for n in z["label_names"]] if "label_names" in z.files
             else [str(i) for i in range(int(labels.max()) + 1)])
  if images.ndim != 3 or images.dtype != np.uint8:
    p.error(f"{args.npz}: images are {images.dtype} {list(images.shape)}; expected uint8 (N, H, W)")
  total = len(images)
  if args.limit is not None:
    images, labels = images[:args.limit], labels[:args.limit]
  # Padded as for the whole file, so a --limit run names files as a full one would.
  paths = write(images, labels, names, args.out, total)
  print(f"wrote {len(paths)} DICOM files under {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
