"""The Secondary Capture: the film, each knee's Grad-CAM overlay and the grades burned in.

Layout: a red banner "NOT FOR PRIMARY DIAGNOSIS" with the model's name and weights fingerprint; the
film (as graded, film orientation, the patient's right knee on the image's left) with each knee's
grade written at its joint; to its right, per knee (right knee first), the Grad-CAM overlay (the
clinic's own ``Grader.grade`` PNG) and the knee with its measured joint space (condyle margin cyan,
plateau margin yellow, each compartment's minimum red), captioned with grade, expected grade,
probabilities and the medial and lateral JSW. RGB, 8 bit, written with highdicom; Burned In Annotation YES. No patient data is
drawn: the viewer shows the copied header.
"""
from __future__ import annotations

import io

import highdicom as hd
import numpy as np

from klgrade.clinic.pacs.grading import InstanceResult, ModelInfo
from klgrade.clinic.pacs.sr import copy_identity, evidence_header
from klgrade.measure.overlay import caption as jsw_caption

BANNER = "NOT FOR PRIMARY DIAGNOSIS"
FILM_H = 768  # rows of the film in the capture: enough to read the joints, small enough to store fast
PANEL = 384  # the clinic's overlay size (klgrade.clinic.grader.DISPLAY_PX)
HEADER_H = 64
CAPTION_H = 68  # three caption lines above each knee's panels


def series_description(model: ModelInfo) -> str:
    return f"klgrade KL overlay {model.short} {BANNER}"[:64]


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _caption(knee: dict) -> str:
    if knee.get("klg") is None:
        return f"{knee['side_name']} knee: not graded"
    probs = " ".join(f"{p:.2f}" for p in knee["probabilities"])
    text = f"{knee['side_name']} knee: KL {knee['klg']} (expected {knee['expected_grade']:.2f})\np(KL0-4) {probs}"
    return text + (f"\nJSW {jsw_caption(knee['jsw'])}" if knee.get("jsw") else "")


def compose(res: InstanceResult, model: ModelInfo) -> np.ndarray:
    """RGB uint8 (H, W, 3) capture of one graded instance."""
    from PIL import Image, ImageDraw

    film = np.clip(res.film * 255.0 + 0.5, 0, 255).astype(np.uint8)
    scale = FILM_H / film.shape[0]
    fw = max(1, round(film.shape[1] * scale))
    film_img = Image.fromarray(film).resize((fw, FILM_H), Image.Resampling.BILINEAR).convert("RGB")
    order = sorted(range(len(res.knees)), key=lambda i: {"R": 0, "L": 1}.get(res.knees[i]["side"], 2))
    knees = [res.knees[i] for i in order]
    jsw_tiles = [res.jsw_overlays[i] if i < len(res.jsw_overlays) else None for i in order]
    panels = 2 if any(t is not None for t in jsw_tiles) else 1
    width, height = fw + panels * (PANEL + 8) + 8, HEADER_H + max(FILM_H, len(knees) * (PANEL + CAPTION_H))
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, width, HEADER_H - 4), fill=(160, 0, 0))
    draw.text((8, 4), BANNER, fill=(255, 255, 255), font=_font(26))
    draw.text((8, 36), f"klgrade {model.version} | run {model.name} | {model.description} | "
                       f"weights sha1 {model.short}", fill=(255, 255, 255), font=_font(16))
    canvas.paste(film_img, (0, HEADER_H))
    for i, (k, tile) in enumerate(zip(knees, jsw_tiles)):
        y = HEADER_H + i * (PANEL + CAPTION_H)
        draw.text((fw + 8, y + 2), _caption(k), fill=(255, 255, 0), font=_font(15))
        png = k.get("_heatmap_png")
        if png is not None:
            panel = Image.open(io.BytesIO(png)).convert("RGB").resize((PANEL, PANEL))
            canvas.paste(panel, (fw + 8, y + CAPTION_H - 4))
        if tile is not None:
            canvas.paste(Image.fromarray(tile).resize((PANEL, PANEL)), (fw + PANEL + 16, y + CAPTION_H - 4))
        loc = k.get("location")
        if loc is not None:  # the grade at the joint it belongs to (locations are in source px)
            x = loc["x"] * res.film_scale * scale
            yy = HEADER_H + loc["y"] * res.film_scale * scale
            label = f"KL {k['klg']}" if k.get("klg") is not None else "not graded"
            draw.text((x - 30, yy - 60), label, fill=(255, 255, 0), font=_font(28), stroke_width=2,
                      stroke_fill=(0, 0, 0))
    return np.asarray(canvas)


def build_sc(res: InstanceResult, model: ModelInfo, series_uid: str, sop_uid: str,
             series_number: int = 901, instance_number: int = 1) -> hd.sc.SCImage:
    """The Secondary Capture of one graded instance, in the source's study."""
    header = res.header
    # The capture is laid out in the film's own orientation; a film without PatientOrientation is
    # the PA knee film the grader assumed (patient's right on the image's left: rows run to the
    # patient's left, columns to the feet).
    orientation = tuple(header.get("PatientOrientation") or ("L", "F"))[:2]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=evidence_header(header), pixel_array=compose(res, model), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=series_uid,
        series_number=series_number, sop_instance_uid=sop_uid, instance_number=instance_number,
        manufacturer="klgrade", patient_orientation=orientation, transfer_syntax_uid="1.2.840.10008.1.2.1",
        series_description=series_description(model), manufacturer_model_name=model.name[:64],
        software_versions=f"klgrade {model.version}")
    copy_identity(sc, header)
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = (f"{BANNER}. KL grades and Grad-CAM by klgrade {model.version} (run {model.name}, "
                        f"weights sha1 {model.fingerprint}); research tool.")
    sc.DerivationDescription = "klgrade KL grading: film with Grad-CAM overlays and grades burned in"
    # Which film this capture shows (Source Image Sequence, General Image module).
    from pydicom.dataset import Dataset

    ref = Dataset()
    ref.ReferencedSOPClassUID = header.SOPClassUID
    ref.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc
