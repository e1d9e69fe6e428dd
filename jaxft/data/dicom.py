"""DICOM image files as uint8 arrays, the way a viewer shows them.

`read` decodes one frame with pydicom and applies what the file says about
display: the modality LUT (rescale slope / intercept), then the VOI LUT or
window, then MONOCHROME1 inversion, so that every image ends up as 0..255 with
higher meaning brighter, like the rest of jaxft's image data.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np
import pydicom
import pydicom.errors
import pydicom.pixels

from jaxft.errors import UserError

PathOrFile = str | os.PathLike | BinaryIO

SUFFIXES = (".dcm", ".dicom")
_PREAMBLE = 128  # Bytes before the b"DICM" marker in a DICOM file (PS3.10 7.1).
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class DicomError(UserError):
  """A DICOM file that cannot be read; `reason` says why in one line, without the path."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"cannot read DICOM file {path}: {reason}")
    self.path = path
    self.reason = reason


def _name(path: PathOrFile) -> str:
  if isinstance(path, (str, os.PathLike)):
    return os.fspath(path)
  return getattr(path, "name", None) or "<in-memory file>"


def _one_line(e: BaseException) -> str:
  # pydicom's messages span lines (a list of missing decoder plugins, say).
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return "; ".join(lines).replace(":; ", ": ") or type(e).__name__


def is_dicom(path: PathOrFile) -> bool:
  """Whether `path` is a DICOM file: named *.dcm / *.dicom, or starting with the
  128-byte preamble and b"DICM". A binary file object is peeked at and rewound."""
  if isinstance(path, (str, os.PathLike)):
    if os.fspath(path).lower().endswith(SUFFIXES):
      return True
    try:
      with open(path, "rb") as f:
        head = f.read(_PREAMBLE + 4)
    except OSError:
      return False  # Whoever opens it next reports why.
  else:
    try:
      start = path.tell()
      head = path.read(_PREAMBLE + 4)
      path.seek(start)
    except (OSError, AttributeError, ValueError):
      return False
  return head[_PREAMBLE:] == b"DICM"


def read(path: PathOrFile, frame: int = 0) -> np.ndarray:
  """One frame of a DICOM file as uint8 [H, W] (monochrome) or [H, W, 3] (colour).

  `frame` picks the frame of multi-frame data (0, the first, by default).

  Monochrome images: pydicom's modality LUT (rescale slope / intercept or a
  Modality LUT Sequence), then its VOI LUT when the file has a VOI LUT
  Sequence or a WindowCenter / WindowWidth (the first of several). A window
  maps [center - width/2, center + width/2] onto 0..255, clipped outside; a
  VOI LUT maps its output range (0..2**bits per entry - 1) onto 0..255.
  Without either, the frame's own min..max is stretched over 0..255 (a
  constant frame is all 0). MONOCHROME1 is inverted (255 - x) so that higher
  is brighter, as in MONOCHROME2.

  Colour images (RGB, YBR_* as decoded to RGB by pydicom, PALETTE COLOR through
  its palette) map their sample range (0..2**BitsStored - 1, or the palette's
  0..255 / 0..65535) onto 0..255; no LUT or window applies to them.

  Raises:
    DicomError (a UserError): not a DICOM file, no pixel data, a compressed
      transfer syntax without an installed decoder, a frame out of range, or
      any other failure, with the file and a one-line reason.
  """
  try:
    return _read(path, frame)
  except (DicomError, MemoryError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Corrupt files fail deep inside pydicom with many types (struct.error,
    # EOFError, ValueError, KeyError, ...): all mean "this file cannot be read".
    raise DicomError(_name(path), f"{type(e).__name__}: {_one_line(e)}") from e


def _read(path: PathOrFile, frame: int) -> np.ndarray:
  name = _name(path)
  try:
    ds = pydicom.dcmread(path)  # Not force=True: a non-DICOM file must say so.
  except pydicom.errors.InvalidDicomError as e:
    raise DicomError(name, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from e
  if not any(k in ds for k in _PIXEL_KEYWORDS):
    raise DicomError(name, "it has no pixel data (a DICOMDIR, report or other non-image object)")
  frames = int(ds.get("NumberOfFrames") or 1)
  if not 0 <= frame < frames:
    raise DicomError(name, f"frame {frame} is out of range; it has {frames} "
                           f"frame{'s' if frames != 1 else ''}")
  try:
    arr = ds.pixel_array
  except Exception as e:  # pylint: disable=broad-except
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    what = f" ({syntax.name})" if syntax is not None else ""
    raise DicomError(name, f"cannot decode its pixel data{what}: {_one_line(e)}") from e
  if frames > 1:
    arr = arr[frame]
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
  if photometric.startswith("MONOCHROME"):
    gray = _monochrome(arr, ds)
    return 255 - gray if photometric == "MONOCHROME1" else gray
  return _colour(arr, ds, photometric, name)


def _monochrome(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
  """Stored values through the modality and VOI LUTs onto 0..255 (MONOCHROME2 sense)."""
  arr = pydicom.pixels.apply_modality_lut(arr, ds)
  out_range = _voi_output_range(ds)
  arr = pydicom.pixels.apply_voi_lut(arr, ds)
  if out_range is None:
    out_range = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
  return _scale(arr, *out_range)


def _voi_output_range(ds: pydicom.Dataset) -> tuple[float, float] | None:
  """What `apply_voi_lut` maps onto (its darkest, brightest value); None if it leaves values be.

  Mirrors pydicom 3's choice and ranges (pixels/processing.py): a usable VOI LUT
  Sequence wins over a window and gives 0..2**bits - 1 of its LUT Descriptor;
  a window gives the range of the stored bits (unsigned 0..2**n - 1, signed
  -2**(n-1)..2**(n-1) - 1, or 0..2**bits - 1 of a Modality LUT), passed
  through the rescale when the file has one.
  """
  voi = ds.get("VOILUTSequence")
  if voi and None not in (voi[0].get("LUTDescriptor"), voi[0].get("LUTData")):
    return 0.0, float(2 ** int(voi[0].LUTDescriptor[2]) - 1)
  if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
    return None
  if ds.get("ModalityLUTSequence"):
    lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
  elif ds.PixelRepresentation == 0:
    lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
  else:
    lo, hi = -float(2 ** (int(ds.BitsStored) - 1)), float(2 ** (int(ds.BitsStored) - 1) - 1)
  slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
  if slope is not None and intercept is not None:
    lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
  return lo, hi


def _colour(arr: np.ndarray, ds: pydicom.Dataset, photometric: str, name: str) -> np.ndarray:
  """RGB samples (or palette entries) onto 0..255 by their nominal range."""
  if photometric == "PALETTE COLOR":
    arr = pydicom.pixels.apply_color_lut(arr, ds)[..., :3]  # RGB(A) of 8 or 16-bit entries.
    top = float(np.iinfo(arr.dtype).max)
  else:
    top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise DicomError(name, f"{photometric} pixel data has shape "
                     f"{list(arr.shape)}; expected [rows, columns, 3]")
  return _scale(arr, 0.0, top)


def _scale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """`arr` with `lo` -> 0 and `hi` -> 255 linearly, rounded and clipped, as uint8."""
  if hi == lo:
    return np.zeros(arr.shape, np.uint8)
  scaled = (arr.astype(np.float64) - lo) * (255.0 / (hi - lo))
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
