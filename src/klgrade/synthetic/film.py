"""Synthetic knees, the film side: exposure and noise, unilateral/bilateral rendering, and the
DICOM datasets the films are stored in.

Split out of :mod:`klgrade.synthetic` (which re-exports the public names).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from klgrade import io
from klgrade.synthetic.anatomy import _knee_attenuation, _sig, random_anatomy, random_patient

KNEE_SERIES = "Bilateral PA Fixed Flexion Knee"
OTHER_SERIES = ("PA Hand", "PA Right Hand", "Lateral Left Knee")


def _expose(att: np.ndarray, rng: np.random.Generator, px_mm: float, exposure: float | None = None,
            noise: float | None = None) -> np.ndarray:
    """Attenuation -> detector image in [0, 1] (bone bright), with exposure, scatter and noise."""
    # draw every parameter even when given, so the random stream does not depend on the arguments
    k_r, sigma_r, gamma = rng.uniform(0.65, 0.95), rng.uniform(0.008, 0.025), rng.uniform(0.8, 1.25)
    lo, hi = rng.uniform(0.02, 0.08), rng.uniform(0.88, 0.98)
    k = float(exposure if exposure is not None else k_r)
    img = 1.0 - np.exp(-k * att)
    # scatter / veiling glare: a wide blur (done at 1/8 size, it is smooth) lowers contrast a little
    small = img[::8, ::8]
    glare = ndimage.zoom(ndimage.gaussian_filter(small, max(1.0, 1.5 / px_mm), mode="nearest"),
                         (img.shape[0] / small.shape[0], img.shape[1] / small.shape[1]), order=1)
    img = 0.9 * img + 0.1 * glare[: img.shape[0], : img.shape[1]]
    sigma = float(noise if noise is not None else sigma_r)
    if sigma > 0:  # quantum noise grows with the signal
        img = img + sigma * rng.standard_normal(img.shape, dtype=np.float32) * np.sqrt(0.3 + img)
    img = lo + (hi - lo) * np.clip(img, 0, 1) ** gamma
    return np.clip(img, 0, 1).astype(np.float32)


def _resize(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    if img.shape == (h, w):
        return img
    resample = Image.Resampling.BILINEAR if h > img.shape[0] else Image.Resampling.BOX
    return np.array(Image.fromarray(img.astype(np.float32), mode="F").resize((w, h), resample),
                    dtype=np.float32)


def render_knee(
    klg: int,
    rng: np.random.Generator,
    size_px: int = 224,
    spacing_mm: float | None = None,
    anatomy: dict | None = None,
    fov_mm: float = 140.0,
    jitter_mm: float = 3.0,
    exposure: float | None = None,
    noise: float | None = None,
) -> tuple[np.ndarray, tuple[float, float]]:
    """One unilateral knee in canonical orientation (right knee: lateral/fibula on the image left).

    The square image spans ``fov_mm`` (140 mm by default, i.e. ``spacing_mm = fov_mm / size_px``)
    around the joint centre, displaced by up to ``jitter_mm`` like an imperfect crop; a given
    ``spacing_mm`` overrides ``fov_mm``. ``anatomy``: a :func:`random_anatomy` dict (or the
    ``ANATOMY_KEYS`` of a :func:`make_cohort` row); random when None. ``exposure``/``noise`` fix
    those image parameters; the random stream is consumed the same way whatever the grade or these
    arguments, so one knee drawn with the same seed at two grades differs only by its findings.
    Returns (float32 image in [0, 1], joint centre (x, y) in px).
    """
    if spacing_mm is None:
        spacing_mm = fov_mm / size_px
    anatomy = anatomy if anatomy is not None else random_anatomy(rng)
    # Draw at <= 0.5 mm/px (at most 2x supersampled) then box-downsample, so thin cortices and spurs do not alias.
    factor = min(2, max(1, int(np.ceil(spacing_mm / 0.5))))
    n = size_px * factor
    px = spacing_mm / factor
    off = rng.uniform(-jitter_mm, jitter_mm, size=2)
    coords = (np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * np.float32(px)
    att = _knee_attenuation(coords + np.float32(off[0]), coords + np.float32(off[1]), klg, anatomy, rng, px)
    img = _expose(att, rng, px, exposure, noise)
    img = _resize(img, (size_px, size_px))
    centre = ((size_px - 1) / 2.0 - off[0] / spacing_mm, (size_px - 1) / 2.0 - off[1] / spacing_mm)
    return np.clip(img, 0, 1).astype(np.float32), (float(centre[0]), float(centre[1]))


def _place_knees(ar: dict, al: dict, rng: np.random.Generator, width_mm: float,
                 height_mm: float) -> tuple[dict, dict]:
    """Each leg's soft-tissue half-width and knee centre (x, y) in mm on the film. Legs side by side
    with a 5-45 mm gap between the skins (knee centres ~130-190 mm apart); on a narrow detector the
    knees move together but stay >= 60 mm from the outer edges (a 140 mm crop may then run a little
    off the film, as with tight real framing)."""
    legs = {"R": ar["soft_tissue_mm"] * ar["scale"], "L": al["soft_tissue_mm"] * al["scale"]}
    sep = legs["R"] + legs["L"] + rng.uniform(5.0, 45.0)
    sep = float(np.clip(sep, 115.0, max(115.0, width_mm - 120.0)))
    slack_x = max(0.0, (width_mm - sep) / 2 - 72.0)
    slack_y = max(0.0, height_mm / 2 - 75.0)
    mid_x = width_mm / 2 + rng.uniform(-1, 1) * min(slack_x, 0.04 * width_mm)
    mid_y = height_mm / 2 + rng.uniform(-1, 1) * min(slack_y, 0.06 * height_mm)
    return legs, {"R": (mid_x - sep / 2, mid_y + rng.normal(0, 2.0)),
                  "L": (mid_x + sep / 2, mid_y + rng.normal(0, 2.0))}


def render_bilateral(
    klg_right: int,
    klg_left: int,
    rng: np.random.Generator,
    spacing_mm: float = 0.14,
    shape: tuple[int, int] = (2000, 2560),
    anatomy_right: dict | None = None,
    anatomy_left: dict | None = None,
    exposure: float | None = None,
    noise: float | None = None,
) -> tuple[np.ndarray, dict]:
    """A bilateral PA fixed-flexion radiograph (patient's RIGHT knee on the image's LEFT).

    Returns (float32 image in [0, 1] of ``shape`` (rows, cols), truth) where truth holds
    'R' and 'L' joint centres (x, y) in px, 'spacing_mm' and the grades.
    """
    rows, cols = shape
    if rows < 32 or cols < 64:
        raise ValueError(f"shape {shape} too small for a bilateral image")
    patient = random_patient(rng)
    ar = anatomy_right if anatomy_right is not None else random_anatomy(rng, patient)
    al = anatomy_left if anatomy_left is not None else random_anatomy(rng, patient)
    # Work on a coarse grid (~0.4 mm/px, about the crop resolution pipelines use) and upsample.
    px = max(spacing_mm, 0.4)
    ch, cw = int(np.ceil(rows * spacing_mm / px)), int(np.ceil(cols * spacing_mm / px))
    legs, centres_mm = _place_knees(ar, al, rng, cols * spacing_mm, rows * spacing_mm)
    xs = (np.arange(cw, dtype=np.float32) + 0.5) * px
    ys = (np.arange(ch, dtype=np.float32) + 0.5) * px
    att = np.zeros((ch, cw), np.float32)
    for side, klg, anat in (("R", klg_right, ar), ("L", klg_left, al)):
        cx, cy = centres_mm[side]
        half = 1.25 * legs[side] + 5.0  # the thigh is wider than the knee; beyond it there is only air
        c0 = int(np.clip(np.floor((cx - half) / px), 0, cw))
        c1 = int(np.clip(np.ceil((cx + half) / px) + 1, 0, cw))
        if c1 <= c0:
            continue
        xv = xs[c0:c1] - np.float32(cx)
        if side == "L":
            xv = -xv  # canonical = right knee (lateral on the image left); the left knee is its mirror
        att[:, c0:c1] += _knee_attenuation(xv, ys - np.float32(cy), klg, anat, rng, px)
    # exposure + noise: structure at coarse resolution, quantum noise at full resolution
    img = _expose(att, rng, px, exposure, noise=0.0)
    img = _resize(img, (rows, cols))
    sigma_r = rng.uniform(0.006, 0.02)
    sigma = float(noise if noise is not None else sigma_r)
    img += sigma * rng.standard_normal(img.shape, dtype=np.float32)
    np.clip(img, 0, 1, out=img)
    # the centre of pixel i is at (i + 0.5) * spacing mm
    truth = {side: (cx / spacing_mm - 0.5, cy / spacing_mm - 0.5) for side, (cx, cy) in centres_mm.items()}
    truth.update({"spacing_mm": float(spacing_mm), "klg": {"R": int(klg_right), "L": int(klg_left)}})
    return img, truth


# --------------------------------------------------------------------------- DICOM

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"    # Computed Radiography Image Storage


def to_stored(img: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12,
              rescale: tuple[float, float] = (1.0, 0.0), value_range: float | None = None) -> np.ndarray:
    """Map a [0, 1] image (bone bright) to stored uint16 pixel values.

    ``value_range``: span of the modality (rescaled) values; the stored value ``raw`` satisfies
    ``slope * raw + intercept = value``. MONOCHROME1 stores the inverted values (bone dark).
    """
    slope, intercept = rescale
    top = 2**bits_stored - 1
    if value_range is None:
        value_range = (top * slope + intercept) * 0.97
    v = np.clip(img, 0, 1) * value_range
    if photometric == "MONOCHROME1":
        v = value_range - v
    raw = np.round((v - intercept) / slope)
    return np.clip(raw, 0, top).astype(np.uint16)


def bilateral_dataset(
    pixels: np.ndarray,
    spacing_mm: float | tuple[float, float],
    photometric: str = "MONOCHROME2",
    *,
    modality: str = "DX",
    series_description: str = KNEE_SERIES,
    bits_stored: int = 12,
    rescale: tuple[float, float] = (1.0, 0.0),
    window: tuple[float, float] | None = None,
    spacing_tag: str = "ImagerPixelSpacing",
    patient_name: str = "SYNTH^ANONYMOUS",
    patient_id: str = "SYN00000000",
    birth_date: str = "19500101",
    study_date: str = "20050101",
    participant_id: str | None = None,
    barcode: str | None = None,
    body_part: str = "KNEE",
    view_position: str = "PA",
    uid_seed: str | int | None = None,
):
    """A pydicom Dataset for one radiograph, ready for ``ds.save_as(path, enforce_file_format=True)``.

    ``pixels``: 2-D uint16 *stored* values (see :func:`to_stored`), written uncompressed as
    Explicit VR Little Endian. ``uid_seed`` makes the UIDs deterministic. ``spacing_tag`` picks ImagerPixelSpacing, PixelSpacing, both, or
    none (``"both"``/``"none"``) to let tests exercise the readers' fall-backs. The patient fields
    are fake and distinctive so tests can check they never leak.
    """
    from pydicom.uid import generate_uid

    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {pixels.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    sop_class = CR_SOP_CLASS if modality == "CR" else DX_SOP_CLASS
    entropy = None if uid_seed is None else [str(uid_seed)]

    def uid(tag):
        return generate_uid(entropy_srcs=None if entropy is None else entropy + [tag])

    sop_uid = uid("sop")
    ds = _file_dataset(sop_class, sop_uid)
    attrs = {
        "SOPClassUID": sop_class, "SOPInstanceUID": sop_uid, "StudyInstanceUID": uid("study"),
        "SeriesInstanceUID": uid("series"), "Modality": modality, "StudyDate": study_date,
        "SeriesDate": study_date, "StudyDescription": "Bilateral knee" if "Knee" in series_description else "X-ray",
        "SeriesDescription": series_description, "BodyPartExamined": body_part, "ViewPosition": view_position,
        "Manufacturer": "klgrade synthetic", "PatientName": patient_name, "PatientID": patient_id,
        "PatientBirthDate": birth_date, "PatientSex": "O", "StudyID": "1", "SeriesNumber": 1, "InstanceNumber": 1,
    }
    if participant_id is not None:
        attrs["OtherPatientIDs"] = participant_id  # like OAI exports, which carry the participant id
    if barcode is not None:
        attrs["AccessionNumber"] = barcode
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    _set_image(ds, pixels, photometric, bits_stored, spacing_mm, spacing_tag, rescale, window)
    return ds


def _file_dataset(sop_class: str, sop_uid: str):
    """An empty Part-10 dataset (Explicit VR Little Endian) with its file meta."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)


def _set_image(ds, pixels: np.ndarray, photometric: str, bits_stored: int, spacing_mm, spacing_tag: str,
               rescale: tuple[float, float], window: tuple[float, float] | None) -> None:
    """The image pixel, spacing, rescale and window attributes of ``ds`` for uint16 ``pixels``."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    sp = (spacing_mm, spacing_mm) if np.isscalar(spacing_mm) else tuple(spacing_mm)
    sp = [f"{float(v):.6g}" for v in sp]
    if spacing_tag in ("ImagerPixelSpacing", "both"):
        ds.ImagerPixelSpacing = sp
    if spacing_tag in ("PixelSpacing", "both"):
        ds.PixelSpacing = sp
    ds.RescaleSlope = f"{rescale[0]:g}"
    ds.RescaleIntercept = f"{rescale[1]:g}"
    ds.RescaleType = "US"
    if window is None:
        vals = pixels[::4, ::4].astype(np.float64) * rescale[0] + rescale[1]
        lo, hi = np.percentile(vals, [1, 99.5])
        window = ((lo + hi) / 2, max(hi - lo, 1.0))
    ds.WindowCenter = f"{window[0]:.1f}"
    ds.WindowWidth = f"{window[1]:.1f}"
    ds.PixelData = pixels.tobytes()


def save_dataset(ds, path: str | Path) -> Path:
    """Write a Dataset atomically as a DICOM Part-10 file (preamble + 'DICM')."""
    path = Path(path)
    with io.atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def _render_other(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A crude non-knee radiograph (hand-like: palm and five fingers) for series to be skipped."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx, yy = xx / w, yy / h
    att = 0.6 * _sig(0.22 - np.hypot((xx - 0.5) / 1.2, (yy - 0.72) / 1.0), 0.01)
    for i in range(5):
        cx = 0.22 + 0.14 * i + rng.normal(0, 0.01)
        top = 0.15 + 0.1 * abs(i - 2) + rng.normal(0, 0.02)
        d = np.minimum(0.035 - np.abs(xx - cx), yy - top)
        att += 0.9 * _sig(d, 0.005) * (yy < 0.75)
    img = 1.0 - np.exp(-att)
    img += 0.02 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 1).astype(np.float32)
