"""Hostile inputs for the regression tests, the fuzz suite and benchmarks/fuzz_deep.py.

Every generator takes a ``Chooser`` (``int(lo, hi)``, ``choice(seq)``, ``bytes(n)``), so the same
cases come from hypothesis (``HypChooser``: shrinking, CI profile) or from a seeded ``random.Random``
(``RandChooser``: thousands of inputs in the deep benchmark) alike.
"""
from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np

GOOD = "good"  # what a case promises: "good" (a usable radiograph) or "any" (may be refused)


class RandChooser:
    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)

    def choice(self, seq):
        return seq[self.r.randrange(len(seq))]

    def bytes(self, n: int) -> bytes:
        return self.r.randbytes(n)


class HypChooser:
    def __init__(self, data):
        self.data = data

    def int(self, lo: int, hi: int) -> int:
        from hypothesis import strategies as st

        return self.data.draw(st.integers(lo, hi))

    def choice(self, seq):
        from hypothesis import strategies as st

        return self.data.draw(st.sampled_from(list(seq)))

    def bytes(self, n: int) -> bytes:
        from hypothesis import strategies as st

        return self.data.draw(st.binary(min_size=0, max_size=n))


# ---------------------------------------------------------------------- raw PNG headers

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int, bit_depth: int = 8, colour: int = 0, idat: bytes = b"") -> bytes:
    """A PNG whose header declares ``width`` x ``height`` with (almost) no pixel data: 69 bytes can
    declare 60000 x 60000 (a decompression bomb for a reader that trusts it)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    body = idat or zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


# ---------------------------------------------------------------------- images through PIL

def knee_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A [0, 1] image with a bright band pair and a dark gap: enough structure for the view."""
    rng = np.random.default_rng(seed)
    y = np.linspace(-1, 1, h)[:, None]
    x = np.linspace(-1, 1, w)[None, :]
    img = 0.3 + 0.5 * (np.abs(x) < 0.6) * (np.abs(y) > 0.08) + 0.05 * rng.standard_normal((h, w))
    return np.clip(img, 0, 1).astype(np.float32)


def _side(c, top: int) -> int:
    """Mostly usable sizes, sometimes below the minimum (16 px)."""
    return c.int(1, 15) if c.int(0, 3) == 0 else c.int(16, top)


PIL_MODES = ("1", "L", "LA", "P", "I;16", "I", "F", "RGB", "RGBA", "CMYK", "YCbCr")
FORMATS = {"PNG": ("1", "L", "LA", "P", "I;16", "I", "RGB", "RGBA"), "JPEG": ("L", "RGB", "CMYK"),
           "TIFF": ("1", "L", "I;16", "I", "F", "RGB", "CMYK"), "BMP": ("1", "L", "P", "RGB")}
SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp"}


def pil_image(c, small: bool = True) -> tuple[bytes, str]:
    """(file bytes, suffix) of a PIL-written image in an odd format/mode/bit depth/size."""
    from PIL import Image

    fmt = c.choice(sorted(FORMATS))
    mode = c.choice(FORMATS[fmt])
    h, w = _side(c, 48 if small else 300), _side(c, 48 if small else 300)
    base = knee_like(h, w, c.int(0, 99))
    if c.int(0, 3) == 0:  # colour that is not grey
        rgb = np.stack([base, base[::-1], base[:, ::-1]], -1)
        im = Image.fromarray((rgb * 255).astype(np.uint8), "RGB")
    elif mode in ("I;16", "I"):
        im = Image.fromarray((base * c.choice((255, 4095, 65535))).astype(np.uint16))
    elif mode == "F":
        arr = base * c.choice((1.0, 1e6, -3.0))
        if c.int(0, 2) == 0:
            arr[0, 0] = c.choice((np.nan, np.inf, -np.inf))
        im = Image.fromarray(arr.astype(np.float32), "F")
    else:
        im = Image.fromarray((base * 255).astype(np.uint8), "L")
    try:
        im = im.convert(mode) if im.mode != mode and mode not in ("I;16", "F") else im
        buf = io.BytesIO()
        im.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):  # a combination PIL cannot write: plain grey PNG
        buf = io.BytesIO()
        Image.fromarray((base * 255).astype(np.uint8)).save(buf, format="PNG")
        fmt = "PNG"
    return buf.getvalue(), SUFFIX[fmt]


# ---------------------------------------------------------------------- DICOM

TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2",
                     "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5")
PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL", "", "monochrome2")


def dicom_bytes(c, rows: int | None = None, cols: int | None = None, good: bool = False) -> bytes:
    """A DICOM radiograph; ``good`` keeps it usable, otherwise header fields are drawn odd."""
    from pydicom.uid import UID

    from klgrade.synthetic import bilateral_dataset, to_stored

    rows = rows or _side(c, 48)
    cols = cols or _side(c, 48)
    img = knee_like(rows, cols, c.int(0, 99))
    ds = bilateral_dataset(to_stored(img), c.choice((0.1, 0.14, 0.011, 1.9)), uid_seed=c.int(0, 9))
    if not good:
        _odd_header(c, ds)
    buf = io.BytesIO()
    try:
        ts = UID(ds.file_meta.TransferSyntaxUID)
        ds.save_as(buf, enforce_file_format=True, little_endian=not ts == "1.2.840.10008.1.2.2",
                   implicit_vr=ts == "1.2.840.10008.1.2")
    except Exception:  # noqa: BLE001 - a header pydicom refuses to write: write the plain one
        ds = bilateral_dataset(to_stored(img), 0.14, uid_seed=0)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _odd_header(c, ds) -> None:
    """Change a few header fields to values a hostile or broken exporter writes."""
    for _ in range(c.int(1, 3)):
        k = c.int(0, 9)
        if k == 0:
            ds.file_meta.TransferSyntaxUID = c.choice(TRANSFER_SYNTAXES)
        elif k == 1:
            ds.PhotometricInterpretation = c.choice(PHOTOMETRICS)
        elif k == 2:
            ds.BitsStored = c.choice((1, 8, 12, 16, 17, 0))
            ds.BitsAllocated = c.choice((8, 16, 32))
        elif k == 3:
            ds.Rows, ds.Columns = c.choice(((60000, 60000), (1, 1), (0, 0), (65535, 2), (8, 8)))
        elif k == 4:
            centre, width = c.choice(((0, 0), (-5, -1), (1e9, 1e-9), ("a", "b")))
            ds.add_new(0x00281050, "LO" if isinstance(centre, str) else "DS", centre)  # WindowCenter
            ds.add_new(0x00281051, "LO" if isinstance(width, str) else "DS", width)  # WindowWidth
        elif k == 5:
            ds.RescaleSlope, ds.RescaleIntercept = c.choice(((0, 0), (-1, 5), (1e30, -1e30)))
        elif k == 6:
            ds.NumberOfFrames = c.choice((0, 2, 100))
        elif k == 7:
            ds.SamplesPerPixel = c.choice((0, 3))
        elif k == 8:
            ds.Modality = c.choice(("CT", "", "MR", "DX"))
        else:
            ds.PixelRepresentation = c.choice((0, 1))


# ---------------------------------------------------------------------- any hostile file

KINDS = ("pil", "pil_truncated", "bomb", "dicom", "dicom_truncated", "random", "empty", "text")


def hostile_file(c) -> tuple[bytes, str, str]:
    """(bytes, suffix, kind) of one hostile input."""
    kind = c.choice(KINDS)
    if kind.startswith("pil"):
        data, suffix = pil_image(c)
    elif kind == "bomb":
        w, h = c.choice(((60000, 60000), (9400, 9400), (1, 100000), (100000, 1), (2**31 - 1, 2)))
        data, suffix = png_header_only(w, h, c.choice((8, 16)), c.choice((0, 2))), ".png"
    elif kind.startswith("dicom"):
        data, suffix = dicom_bytes(c), c.choice((".dcm", ""))
    elif kind == "random":
        data, suffix = c.bytes(600), c.choice((".png", ".jpg", ".dcm", ".tif"))
    elif kind == "empty":
        data, suffix = b"", c.choice((".png", ".dcm"))
    else:
        data, suffix = b"README: not an image\n", c.choice((".txt", ".png"))
    if kind.endswith("truncated") and len(data) > 8:
        data = data[: c.int(1, len(data) - 1)]
    return data, suffix, kind


# ---------------------------------------------------------------------- text files

MANIFEST_HEADER = "image_id,path,patient_id,visit,side,klg,split,source"


def manifest_text(c, good_paths: list[str]) -> str:
    """A manifest.csv that may be malformed: bad grades, sides, splits, missing columns, no rows,
    quotes, binary, paths that do not exist."""
    k = c.int(0, 6)
    if k == 0:
        return MANIFEST_HEADER + "\n"
    if k == 1:
        return c.bytes(200).decode("latin-1")
    if k == 2:
        return "a,b\n1,2\n"
    lines, valid = [MANIFEST_HEADER], k == 3  # k == 3: a usable manifest, the others are not
    for i, p in enumerate(good_paths):
        klg = c.choice(("0", "4") if valid else ("0", "4", "5", "-1", "x", "", "2.5", "nan"))
        side = c.choice(("L", "R", "") if valid else ("L", "R", "", "X"))
        split = c.choice(("test", "train", "val", "") if valid else ("test", "train", "val", "", "TEST"))
        visit = c.choice(("", "12") if valid else ("", "12", "abc"))
        path = p if valid or c.int(0, 4) else c.choice(("missing.png", "", '"quoted,comma.png"'))
        lines.append(f"k{i},{path},p{i},{visit},{side},{klg},{split},fuzz")
    return "\n".join(lines) + "\n"


CONFIG_TEXTS = (  # run config.yaml files that are not a usable mapping
    "kind: cnn\nmodel: [unclosed\n",
    "!!python/object/apply:os.system ['echo pwned']\n",
    "kind: !!python/name:os.system\n",
    "- kind: cnn\n- model: x\n",
    "42\n",
    "just a string\n",
    "kind: cnn\n\tbad: tab\n",
    "{{{{\n",
    "\x00\x01\x02binary",
)


def config_text(c) -> str:
    """A config.yaml text: bad syntax, unsafe tags, lists, scalars, binary."""
    return c.choice(CONFIG_TEXTS)
