"""The one DICOM reader for knee radiographs.

``read_radiograph(path)`` turns a single-frame grayscale projection radiograph into a 2-D float32
array in [0, 1] with bone bright, following the display pipeline of PS3.3 C.11: modality LUT
(rescale slope/intercept or a Modality LUT Sequence), then the VOI LUT or window, then MONOCHROME1
inversion. Compressed transfer syntaxes (JPEG lossless, JPEG 2000, RLE, JPEG-LS) decode through
pydicom's pixel backends (pylibjpeg plugins, gdcm when installed).

Anything that is not a usable radiograph raises :class:`DicomError` (a ``ValueError``) whose
message names the file and the reason. Patient-identifying attributes are never copied into the
result, the log or an error message: ``meta`` holds only technical fields (see ``META_FIELDS``).
"""
from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Projection radiography modalities (PS3.3 C.7.3.1.1.1): computed radiography, digital X-ray,
# radiographic imaging; "DR" is not a defined term but is written by some vendors' exports.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "RG", "DR"})
# Technical, non-identifying attributes copied into Radiograph.meta.
META_FIELDS = ("modality", "photometric", "bits_stored", "rows", "cols", "transfer_syntax",
               "series_description", "voi")
_SPACING_TAGS = ("ImagerPixelSpacing", "PixelSpacing")
# Plausible detector pixel size for a radiograph; anything outside is a broken header, not data.
_SPACING_RANGE_MM = (0.01, 2.0)


class DicomError(ValueError):
    """A DICOM file that is not a usable radiograph; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass
class Radiograph:
    """A decoded radiograph. ``pixels``: (rows, cols) float32 in [0, 1], bone bright.

    ``spacing_mm`` is (row, column) spacing in mm/px, or None when the file has no usable spacing
    (``spacing_source`` then is None as well). ``values`` holds the full-precision modality-LUT
    output (before VOI and inversion) when ``read_radiograph(..., keep_values=True)`` was used.
    """

    pixels: np.ndarray
    spacing_mm: tuple[float, float] | None
    spacing_source: str | None
    meta: dict = field(default_factory=dict)
    values: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape  # type: ignore[return-value]


def read_dataset(path: str | Path, stop_before_pixels: bool = False, defer_size: int | None = None):
    """``pydicom.dcmread`` with every read failure turned into a DicomError naming the file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels, defer_size=defer_size)
    except InvalidDicomError as e:
        raise DicomError(path, f"not a DICOM file ({e})") from e
    except FileNotFoundError:
        raise
    except (EOFError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
            struct.error, zlib.error, OverflowError, MemoryError) as e:
        # pydicom signals a file cut short with EOFError/struct errors deep in the parser.
        raise DicomError(path, f"truncated or corrupt DICOM ({type(e).__name__}: {e})") from e


def read_radiograph(path: str | Path, keep_values: bool = False,
                    modalities: frozenset[str] | set[str] = PROJECTION_MODALITIES) -> Radiograph:
    """Read a single-frame grayscale projection radiograph; raise DicomError otherwise."""
    path = Path(path)
    ds = read_dataset(path)
    return radiograph_from_dataset(ds, path, keep_values=keep_values, modalities=modalities)


def radiograph_from_dataset(ds, path: str | Path = "<dataset>", keep_values: bool = False,
                            modalities: frozenset[str] | set[str] = PROJECTION_MODALITIES) -> Radiograph:
    """The checks and display pipeline of :func:`read_radiograph` on an already-read dataset."""
    check_radiograph(ds, path, modalities)
    meta = technical_meta(ds)
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as e:
        raise DicomError(path, f"undecodable pixel data ({meta['transfer_syntax']}: {_short(e)})") from e
    except (ValueError, EOFError, OSError, AttributeError, TypeError) as e:
        reason = _short(e)
        kind = "truncated pixel data" if _looks_truncated(reason) else "undecodable pixel data"
        raise DicomError(path, f"{kind} ({meta['transfer_syntax']}: {reason})") from e
    if arr.ndim != 2:
        raise DicomError(path, f"expected one 2-D grayscale frame, decoded array has shape {arr.shape}")
    try:
        values = modality_lut(arr, ds)
        # work in place unless the caller wants the modality values too (saves a 20 MB copy)
        pixels, meta["voi"] = voi_to_unit(values if not keep_values else values.copy(), ds, inplace=True)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError) as e:
        # a malformed rescale, LUT or window attribute: the header, not the pixels, is broken
        raise DicomError(path, f"unusable modality/VOI LUT or window in the header ({_short(e)})") from e
    if meta["photometric"] == "MONOCHROME1":
        # MONOCHROME1: low values are white; flip so bone is bright in every image we hand on.
        np.subtract(1.0, pixels, out=pixels)
    spacing, source = pixel_spacing(ds)
    return Radiograph(pixels=pixels, spacing_mm=spacing, spacing_source=source, meta=meta,
                      values=values if keep_values else None)


def _short(e: Exception, limit: int = 300) -> str:
    """A decoder's message on one line (pydicom lists every backend's failure on its own line)."""
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _looks_truncated(msg: str) -> bool:
    msg = msg.lower()
    return any(k in msg for k in ("length", "shorter", "less than", "insufficient", "truncat", "end of"))


def check_radiograph(ds, path, modalities=PROJECTION_MODALITIES) -> None:
    """Refuse what is not a single-frame grayscale projection radiograph, saying why."""
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomError(path, "no pixel data (not an image object, or the file is cut short)")
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise DicomError(path, "float pixel data is not a radiograph")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(path, f"multi-frame image ({frames} frames); expected one radiograph")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if spp != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(path, f"colour image (PhotometricInterpretation {photometric or 'missing'}, "
                               f"{spp} samples/pixel); a radiograph must be grayscale")
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality not in modalities:
        raise DicomError(path, f"modality {modality or 'missing'} is not a projection radiograph "
                               f"(accepted: {', '.join(sorted(modalities))})")
    for tag in ("Rows", "Columns", "BitsStored"):
        if tag not in ds:
            raise DicomError(path, f"no {tag} in the header")
    from klgrade.ingest.images import size_problem

    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (TypeError, ValueError) as e:
        raise DicomError(path, f"unreadable Rows/Columns in the header ({e})") from e
    problem = size_problem(cols, rows)  # the same rule as PNG/JPEG, before decoding a pixel
    if problem:
        raise DicomError(path, problem)


def technical_meta(ds) -> dict:
    """Non-identifying header fields: what the image is, never whose it is."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return {
        "modality": str(ds.get("Modality", "")).strip().upper(),
        "photometric": str(ds.get("PhotometricInterpretation", "")).strip().upper(),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "rows": int(ds.get("Rows", 0) or 0),
        "cols": int(ds.get("Columns", 0) or 0),
        "transfer_syntax": (ts.name if ts is not None else "unknown"),
        "series_description": str(ds.get("SeriesDescription", "")).strip(),
        "voi": None,
    }


def modality_lut(arr: np.ndarray, ds) -> np.ndarray:
    """Stored values → modality values as float32 (rescale, or a Modality LUT Sequence)."""
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    # Rescale by hand in float32: pydicom's apply_rescale works in float64, twice the memory and
    # time on a 5-Mpx radiograph, for precision a 16-bit image never needs.
    out = arr.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if slope != 1.0:
        out *= slope
    if intercept != 0.0:
        out += intercept
    return out


def _first(value) -> float:
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def voi_to_unit(values: np.ndarray, ds, inplace: bool = False) -> tuple[np.ndarray, str]:
    """Apply the VOI transform and return (float32 in [0, 1], which transform was used).

    Window Center/Width follows PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID) with the output
    range taken as [0, 1] directly. A VOI LUT Sequence goes through pydicom. Without either, the
    image's own value range is stretched to [0, 1] (what a viewer does without a VOI).
    ``inplace`` lets it overwrite a float32 ``values`` instead of allocating (5 Mpx: ~3x faster).
    """
    if ds.get("VOILUTSequence"):
        from pydicom.pixels import apply_voi

        lut = np.asarray(apply_voi(values, ds), dtype=np.float32)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return np.clip(lut / float(2**bits - 1), 0.0, 1.0), "lut"
    out = values if inplace and values.dtype == np.float32 else values.astype(np.float32)
    wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
    if wc is not None and ww is not None:
        centre, width = _first(wc), _first(ww)
        func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        if func == "SIGMOID" and width > 0:
            out -= np.float32(centre)
            out *= np.float32(-4.0 / width)
            np.exp(out, out=out)
            out += 1.0
            return np.reciprocal(out, out=out), "window"
        if func == "LINEAR_EXACT" and width > 0:
            return _linear(out, centre, width), "window"
        if func in ("LINEAR", "") and width >= 1:
            # LINEAR: centre - 0.5 and width - 1 (PS3.3 C.11.2.1.2.1); a width of 1 is a threshold.
            return _linear(out, centre - 0.5, max(width - 1.0, 1e-3)), "window"
        log.debug("ignoring invalid window (function %s, width %s)", func, width)
    lo, hi = float(out.min()), float(out.max())
    out -= np.float32(lo)
    if hi > lo:
        out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out), "range"


def _linear(out: np.ndarray, centre: float, width: float) -> np.ndarray:
    """In place: (x - (centre - width/2)) / width, clipped to [0, 1]."""
    out -= np.float32(centre - width / 2.0)
    out *= np.float32(1.0 / width)
    return np.clip(out, 0.0, 1.0, out=out)


def pixel_spacing(ds) -> tuple[tuple[float, float] | None, str | None]:
    """(row, col) spacing in mm and the tag it came from: ImagerPixelSpacing (the detector plane,
    what a projection radiograph measures), else PixelSpacing, else (None, None)."""
    from pydicom.multival import MultiValue

    for tag in _SPACING_TAGS:
        v = ds.get(tag)
        if v is None:
            continue
        try:
            vals = [float(x) for x in (v if isinstance(v, list | tuple | MultiValue) else [v])]
        except (TypeError, ValueError):
            continue
        if len(vals) == 1:
            vals = vals * 2
        lo, hi = _SPACING_RANGE_MM
        if len(vals) >= 2 and all(lo <= x <= hi for x in vals[:2]):
            return (vals[0], vals[1]), tag
    return None, None
