"""klgrade.ingest.dicom: the one DICOM reader (LUTs, MONOCHROME1, spacing, compression, refusals)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from dicom_util import jpeg_lossless
from klgrade.ingest.dicom import DicomError, read_radiograph
from klgrade.ingest.images import read_image
from klgrade.synthetic import bilateral_dataset, save_dataset, to_stored

FAKE_NAME = "ZZTEST^PLANTED"


def _image(shape=(48, 64)) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((xx + yy) / (shape[0] + shape[1] - 2)).astype(np.float32)  # a ramp 0..1, bone bright


def _write(tmp_path, name, img=None, photometric="MONOCHROME2", **kw):
    img = _image() if img is None else img
    rescale = kw.pop("rescale", (1.0, 0.0))
    stored = to_stored(img, photometric, 12, rescale, kw.pop("value_range", None))
    ds = bilateral_dataset(stored, kw.pop("spacing", 0.15), photometric, rescale=rescale,
                           patient_name=FAKE_NAME, **kw)
    return save_dataset(ds, tmp_path / name), ds


def test_monochrome1_is_inverted_and_rescale_applied(tmp_path):
    img = _image()
    # a window spanning the whole range leaves the ramp linear
    p2, _ = _write(tmp_path, "m2.dcm", img, "MONOCHROME2", window=(1987.5, 3975.0), value_range=3975.0)
    p1, _ = _write(tmp_path, "m1.dcm", img, "MONOCHROME1", window=(1987.5, 3975.0), value_range=3975.0)
    # stored = (value + 1024) / 2: the modality LUT must undo it before the window applies
    p3, _ = _write(tmp_path, "rs.dcm", img, "MONOCHROME2", rescale=(2.0, -1024.0),
                   window=(3000.0, 6000.0), value_range=6000.0)
    a, b, c = read_radiograph(p2), read_radiograph(p1), read_radiograph(p3)
    assert a.pixels.dtype == np.float32 and a.pixels.shape == img.shape
    assert 0.0 <= a.pixels.min() and a.pixels.max() <= 1.0
    assert a.meta["voi"] == "window" and b.meta["photometric"] == "MONOCHROME1"
    # bone stays bright after MONOCHROME1 inversion: the same picture either way
    np.testing.assert_allclose(a.pixels, b.pixels, atol=2e-3)
    np.testing.assert_allclose(a.pixels, img, atol=3e-3)
    np.testing.assert_allclose(c.pixels, img, atol=3e-3)


def test_window_clips_and_keep_values(tmp_path):
    p, _ = _write(tmp_path, "w.dcm", _image(), window=(2000.0, 1000.0), value_range=3975.0)
    r = read_radiograph(p, keep_values=True)
    assert r.pixels.min() == 0.0 and r.pixels.max() == 1.0  # values outside the window clip
    assert r.values is not None and r.values.max() > 3000  # full-precision modality values kept
    mid = (r.values > 1600) & (r.values < 2400)
    np.testing.assert_allclose(r.pixels[mid], (r.values[mid] - 1500.0) / 999.0, atol=1e-4)


def test_spacing_prefers_imager_then_pixel_then_none(tmp_path):
    p, ds = _write(tmp_path, "both.dcm", spacing_tag="both")
    ds.PixelSpacing = ["0.2", "0.25"]
    ds.save_as(p, enforce_file_format=True)
    r = read_radiograph(p)
    assert r.spacing_mm == (0.15, 0.15) and r.spacing_source == "ImagerPixelSpacing"
    p, _ = _write(tmp_path, "ps.dcm", spacing=(0.2, 0.25), spacing_tag="PixelSpacing")
    r = read_radiograph(p)
    assert r.spacing_mm == (0.2, 0.25) and r.spacing_source == "PixelSpacing"
    p, _ = _write(tmp_path, "none.dcm", spacing_tag="none")
    r = read_radiograph(p)
    assert r.spacing_mm is None and r.spacing_source is None


def test_compressed_transfer_syntaxes_round_trip(tmp_path):
    img = np.random.default_rng(0).random((40, 56)).astype(np.float32)
    src, ds = _write(tmp_path, "raw.dcm", img)
    ref = read_radiograph(src)
    for uid, name in ((RLELossless, "rle.dcm"), (JPEG2000Lossless, "j2k.dcm")):
        d = copy.deepcopy(ds)
        d.compress(uid)
        d.save_as(tmp_path / name, enforce_file_format=True)
    jpeg_lossless(src, tmp_path / "jll.dcm")
    for name, syntax in (("rle.dcm", "RLE"), ("j2k.dcm", "JPEG 2000"), ("jll.dcm", "JPEG Lossless")):
        r = read_radiograph(tmp_path / name)
        assert syntax in r.meta["transfer_syntax"]
        np.testing.assert_array_equal(r.pixels, ref.pixels)  # lossless: exactly the same
    # images.read_image hands DICOM to the same reader
    np.testing.assert_array_equal(read_image(tmp_path / "jll.dcm"), ref.pixels)


def _rgb_secondary_capture(path):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "OT", FAKE_NAME
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.zeros((16, 16, 3), np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("case, reason", [
    ("text", "not a DICOM file"),
    ("truncated", "truncated pixel data"),
    ("rgb", "colour image"),
    ("multiframe", "multi-frame"),
    ("ct", "not a projection radiograph"),
    ("nopixels", "no pixel data"),
    ("badj2k", "undecodable"),
])
def test_refusals_name_the_file_and_reason(tmp_path, case, reason):
    path = tmp_path / f"{case}.dcm"
    if case == "text":
        path.write_text("ID|SIDE\n" * 40)
    elif case == "rgb":
        _rgb_secondary_capture(path)
    else:
        p, ds = _write(tmp_path, "src.dcm")
        if case == "truncated":
            data = p.read_bytes()
            path.write_bytes(data[: len(data) - 1000])
        else:
            if case == "multiframe":
                ds.NumberOfFrames = 2
            elif case == "ct":
                ds.Modality = "CT"
            elif case == "nopixels":
                del ds.PixelData
            elif case == "badj2k":
                ds.compress(JPEG2000Lossless)
                ds.PixelData = ds.PixelData[:40] + b"\x00" * 64 + ds.PixelData[-8:]
            ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError) as ei:
        read_radiograph(path)
    msg = str(ei.value)
    assert str(path) in msg and reason in msg
    assert FAKE_NAME not in msg and "PLANTED" not in msg  # never a patient field in a message


def test_meta_is_technical_only(tmp_path):
    p, _ = _write(tmp_path, "m.dcm", birth_date="19111111", patient_id="ZZPID123")
    r = read_radiograph(p)
    assert set(r.meta) == {"modality", "photometric", "bits_stored", "rows", "cols", "transfer_syntax",
                           "series_description", "voi"}
    text = repr(r.meta) + repr(r.spacing_mm)
    for secret in (FAKE_NAME, "ZZPID123", "19111111"):
        assert secret not in text
