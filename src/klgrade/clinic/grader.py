"""Grade a new radiograph: file -> knees -> grade, probabilities, expected grade, Grad-CAM.

The one grading core behind ``klgrade predict`` and ``klgrade serve``::

    grader = Grader.from_run("runs/resnet18")          # model loaded once
    result = grader.predict_file("knee.dcm", heatmaps=True)
    result["knees"][0]["klg"], result["knees"][0]["probabilities"]

Inputs: a bilateral PA knee film (DICOM, or PNG/JPEG), a unilateral DICOM, or a PNG/JPEG knee.
Every knee becomes the model's input through the one view function the models were trained on
(``klgrade.view.canonical.canonical_view``, what ``square_view`` calls): a bilateral film is
split, each joint located and cropped (the patient's right knee is on the film's left; the left
knee is mirrored into the canonical orientation), DICOM pixel spacing sets the field of view.

Both run kinds are graded through one torch module mapping the normalised view tensor to logits:
the CNN itself, or an embedding head's frozen backbone followed by the head. Grad-CAM
(klgrade.clinic.explain) and export (klgrade.clinic.export) use that same module.
"""
from __future__ import annotations

import base64
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from klgrade.grades import GRADES
from klgrade.measure.files import knees_from_file
from klgrade.rundir import RunError
from klgrade.view.entrance import SIDE_NAMES, Knee, ViewError

log = logging.getLogger(__name__)

# Views and heatmap overlays are shown at least this large: a 64-224 px model view is too coarse
# for a reader to judge osteophytes and joint space, so the CAM is upsampled onto the crop.
DISPLAY_PX = 384
ClinicError = ViewError  # a file that cannot be graded; the message names the file and the reason


@dataclass
class Grader:
    """A loaded run ready to grade knees. ``model``: normalised (N, 3, S, S) -> logits (N, 5)."""

    run_dir: Path
    kind: str  # the run kind (klgrade.runs.LOADERS)
    name: str
    model: object  # torch.nn.Module, or None (a head without one: graded through the predictor)
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: object  # torch.device
    # The layout evaluate uses for this run (klgrade.runs.load_run): predict grades through the same
    # Predictor, or its probabilities would drift from evaluate's by bf16 rounding.
    amp_dtype: object = None  # torch.dtype for autocast, or None (fp32)
    channels_last: bool = False
    tta: str = "none"  # what this grader applies
    tta_run: str = "none"  # what the run itself was evaluated with (config.yaml)
    description: str = ""
    predictor: object = None  # klgrade.runs.Predictor: grades exactly as evaluate does
    explain_target: tuple | None = None
    explain_unavailable: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        if self.predictor is None:  # a grader made around a module in memory (tests, embedding apps)
            from klgrade.runs import Predictor

            self.predictor = Predictor(kind=self.kind, name=self.name, run_dir=Path(self.run_dir),
                                       config={"tta": self.tta_run}, img_size=self.img_size, mean=self.mean,
                                       std=self.std, device=self.device, module=self.model,
                                       amp_dtype=self.amp_dtype, channels_last=self.channels_last)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu", tta: str | None = None) -> Grader:
        """Load any gradable run once (klgrade.runs.load_run). ``tta``: none | flip | None (= the run's own)."""
        from klgrade.clinic.explain import ExplainError, find_target
        from klgrade.runs import load_run

        if tta not in (None, "none", "flip"):
            raise RunError(f"tta must be none or flip, got {tta!r}")
        pred = load_run(run_dir, device)
        g = cls(run_dir=Path(run_dir), kind=pred.kind, name=pred.name, predictor=pred,
                model=pred.torch_module(), img_size=pred.img_size,
                mean=pred.mean, std=pred.std, device=pred.device, amp_dtype=pred.amp_dtype,
                channels_last=pred.channels_last, tta=tta or pred.tta, tta_run=pred.tta,
                description=pred.description, explain_unavailable=pred.explain_unavailable)
        if not g.explain_unavailable:
            try:
                g.explain_target = find_target(g.model)
            except ExplainError as e:
                g.explain_unavailable = str(e)
        return g

    def info(self) -> dict:
        """What the service says about itself (no paths: they may name people or sites)."""
        return {"run": self.name, "kind": self.kind, "model": self.description, "img_size": self.img_size,
                "tta": self.tta, "grades": list(GRADES),
                "heatmaps": self.explain_target is not None,
                "heatmap_layer": self.explain_target[2] if self.explain_target else None,
                "heatmap_unavailable": self.explain_unavailable or None, "precision": self.precision}

    @property
    def precision(self) -> str:
        """The layout graded with, e.g. 'bfloat16 + channels-last' (what evaluate uses for this run)."""
        return self.predictor.precision

    # ------------------------------------------------------------------ files -> knees
    def knees(self, path: str | Path, display: str | None = None, jsw: bool = True) -> tuple[str, list[Knee]]:
        """Read ``path`` and return (layout, knees). ``display`` replaces the path in errors."""
        return knees_from_file(path, self.img_size, display, jsw=jsw)

    # ------------------------------------------------------------------ knees -> grades
    def probabilities(self, views: np.ndarray) -> np.ndarray:
        """(N, 5) float64 softmax probabilities for uint8 views (N, S, S), as evaluate computes them."""
        views = np.asarray(views)
        if views.ndim != 3 or views.shape[1:] != (self.img_size, self.img_size) or views.dtype != np.uint8:
            raise ValueError(f"expected uint8 views (N,{self.img_size},{self.img_size}), got "
                             f"{views.shape} {views.dtype}")
        return self.predictor.predict_views(views, tta=self.tta)

    def heatmaps(self, views: np.ndarray, classes) -> np.ndarray:
        """Grad-CAM maps (N, S, S) in [0, 1] for the given grades (on the view itself, not its TTA mirror)."""
        from klgrade.clinic.explain import ExplainError, gradcam
        from klgrade.view.batches import views_to_tensor

        if self.explain_target is None:
            raise ExplainError(self.explain_unavailable or "no Grad-CAM target layer")
        x = views_to_tensor(np.asarray(views), self.mean, self.std, self.device)
        return gradcam(self.model, x, classes, self.explain_target)

    def grade(self, knees: list[Knee], heatmaps: bool = False, include_view: bool = False,
              jsw_overlay: bool = False) -> list[dict]:
        """Per-knee result dicts (see ``knee_result``); heatmaps as overlay PNG bytes under
        ``_heatmap_png`` (callers turn them into files or data URLs); ``jsw_overlay``: the knee's
        ``jsw_display`` array under ``_jsw_overlay`` (the PACS capture), drawn on the display view
        the heatmap is drawn on rather than on a second one."""
        from klgrade.clinic.explain import overlay, png_bytes, resize_map

        ok = [k for k in knees if k.view is not None]
        cams, cam_error = None, ""
        if heatmaps and ok and self.explain_target is None:
            cam_error = self.explain_unavailable
        # One model, many server threads: Grad-CAM hooks record every forward through the model,
        # so a concurrent forward would corrupt an explanation. Reading and cropping stay parallel.
        with self.lock:
            probs = self.probabilities(np.stack([k.view for k in ok])) if ok else np.zeros((0, 5))
            if heatmaps and ok and self.explain_target is not None:
                try:
                    cams = self.heatmaps(np.stack([k.view for k in ok]), probs.argmax(axis=1))
                except Exception as e:  # noqa: BLE001 - a failed explanation must not lose the grade
                    log.warning("Grad-CAM failed: %s: %s", type(e).__name__, e)
                    cam_error = f"Grad-CAM failed ({type(e).__name__}: {e})"
        out, i = [], 0
        for k in knees:
            if k.view is None:
                out.append({"side": k.side, "side_name": SIDE_NAMES[k.side], "klg": None,
                            "error": k.error, "location": k.location})
                continue
            r = knee_result(k, probs[i])
            canon = display_view(k) if (include_view or cams is not None) else None
            disp = unflip(k, canon) if canon is not None else None
            lines = jsw_display(k, canon) if (include_view or jsw_overlay) else None
            if jsw_overlay:
                r["_jsw_overlay"] = lines
            if include_view:
                r["view"] = data_url(png_bytes(disp))
                if lines is not None:
                    r["jsw_view"] = data_url(png_bytes(lines))
            if heatmaps:
                if cams is not None:
                    cam = unflip(k, resize_map(cams[i], disp.shape))
                    r["_heatmap_png"] = png_bytes(overlay(disp, cam))
                    if not cams[i].max() > 0:  # Grad-CAM's ReLU left nothing: say so, not "cold knee"
                        r["heatmap_note"] = f"no region had positive evidence for KL {r['klg']}"
                    r["heatmap_layer"] = self.explain_target[2]
                else:
                    r["heatmap"] = None
                    r["heatmap_unavailable"] = cam_error
            out.append(r)
            i += 1
        return out

    def predict_file(self, path: str | Path, heatmaps: bool = False, display: str | None = None,
                     include_view: bool = False, jsw: bool = True) -> dict:
        """Grade every knee in one file: {'layout', 'knees': [...]} (heatmaps as PNG bytes; ``jsw``:
        measure the joint space width too)."""
        layout, knees = self.knees(path, display, jsw=jsw)
        return {"layout": layout, "knees": self.grade(knees, heatmaps=heatmaps, include_view=include_view)}


def knee_result(knee: Knee, probs: np.ndarray) -> dict:
    probs = np.asarray(probs, dtype=float)
    r = {
        "side": knee.side,
        "side_name": SIDE_NAMES[knee.side],
        "klg": int(probs.argmax()),
        "probabilities": [round(float(p), 6) for p in probs],
        # The expected grade keeps the ordinal information a single argmax throws away (a
        # 0.5/0.5 split between KL2 and KL3 reads 2.5).
        "expected_grade": round(float(np.dot(GRADES, probs)), 4),
        "confidence": round(float(probs.max()), 6),
    }
    if knee.location is not None:
        r["location"] = knee.location
    if knee.note:
        r["note"] = knee.note
    if knee.jsw is not None:
        r["jsw"] = knee.jsw.as_dict(lines=False)
    return r


def display_view(knee: Knee) -> np.ndarray:
    """uint8 square of the knee at DISPLAY_PX: the model view's crop with more pixels, in the
    canonical orientation the model saw (see ``unflip`` for the film's own orientation)."""
    from klgrade.view.entrance import view_at

    if knee.source is None or knee.view.shape[0] >= DISPLAY_PX:
        return knee.view
    return view_at(knee, DISPLAY_PX)  # the graded crop with more pixels: not located again


def jsw_display(knee: Knee, canon: np.ndarray | None = None) -> np.ndarray | None:
    """The knee at DISPLAY_PX with its measured margins and minima drawn, in the film's orientation
    (serve's page, the PACS capture); None when nothing was measured. ``canon``: the knee's
    ``display_view`` when the caller has made it already."""
    from klgrade.measure.files import overlay

    j = knee.jsw
    if knee.view is None or j is None or knee.info is None or not (j.medial.ok or j.lateral.ok):
        return None
    m = knee.measured_on or knee  # the knee the JSW's points refer to
    return unflip(knee, overlay(knee, DISPLAY_PX, view=canon if m is knee else None))


def unflip(knee: Knee, img: np.ndarray) -> np.ndarray:
    """A display image (or CAM) back in the film's orientation: a reader compares a left knee
    with the film, not with its mirror image."""
    return np.ascontiguousarray(img[:, ::-1]) if knee.flipped else img


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


