"""Grade a new radiograph: file -> knees -> grade, probabilities, expected grade, Grad-CAM.

The one grading core behind ``klgrade predict`` and ``klgrade serve``::

    grader = Grader.from_run("runs/resnet18")          # model loaded once
    result = grader.predict_file("knee.dcm", heatmaps=True)
    result["knees"][0]["klg"], result["knees"][0]["probabilities"]

Inputs: a bilateral PA knee film (DICOM, or PNG/JPEG), a unilateral DICOM, or a PNG/JPEG knee.
Every knee becomes the model's input through the one view function the models were trained on
(``klgrade.data.canonical.canonical_view``, what ``square_view`` calls): a bilateral film is
split, each joint located and cropped (the patient's right knee is on the film's left; the left
knee is mirrored into the canonical orientation), DICOM pixel spacing sets the field of view.

Both run kinds are graded through one torch module mapping the normalised view tensor to logits:
the CNN itself, or an embedding head's frozen backbone followed by the head. Grad-CAM
(klgrade.evaluate.explain) and export (klgrade.export) use that same module.
"""
from __future__ import annotations

import base64
import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from klgrade.grades import GRADES
from klgrade.runs import RunError, read_config, run_name

log = logging.getLogger(__name__)

SIDE_NAMES = {"R": "right", "L": "left", "U": "unknown"}
# Views and heatmap overlays are shown at least this large: a 64-224 px model view is too coarse
# for a reader to judge osteophytes and joint space, so the CAM is upsampled onto the crop.
DISPLAY_PX = 384
# A film is area-reduced before cropping while it stays this much finer than the views (see
# reduce_for_view).
VIEW_OVERSAMPLE = 1.2


class ClinicError(ValueError):
    """A file that cannot be graded; the message names the file and the reason."""


@dataclass
class Knee:
    """One knee ready for the model: ``view`` uint8 (S, S) in canonical orientation."""

    side: str  # "R", "L" or "U" (unknown: a PNG/JPEG crop, or a DICOM without laterality)
    view: np.ndarray | None
    flipped: bool = False  # mirrored into the canonical orientation (a left knee)
    location: dict | None = None  # joint centre in the source image (px), how the scale was set
    note: str = ""  # e.g. the joint was not found and a centred crop was graded
    error: str = ""  # a knee of a bilateral film that could not be located is reported, not guessed
    source: tuple | None = field(default=None, repr=False)  # (image, spacing, side) to redraw it larger
    jsw: object = None  # klgrade.measure.JSW: minimum joint space width per compartment
    info: object = field(default=None, repr=False)  # the view's ViewInfo (to draw the JSW lines on it)


@dataclass
class Grader:
    """A loaded run ready to grade knees. ``model``: normalised (N, 3, S, S) -> logits (N, 5)."""

    run_dir: Path
    kind: str  # "cnn" | "head"
    name: str
    model: object  # torch.nn.Module
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: object  # torch.device
    # The layout evaluate uses for this run (klgrade.train.inference.load_cnn_run): predict must grade
    # with the same precision and memory format, or its probabilities drift from evaluate's by bf16 rounding.
    amp_dtype: object = None  # torch.dtype for autocast, or None (fp32)
    channels_last: bool = False
    tta: str = "none"  # what this grader applies
    tta_run: str = "none"  # what the run itself was evaluated with (config.yaml)
    description: str = ""
    explain_target: tuple | None = None
    explain_unavailable: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu", tta: str | None = None) -> Grader:
        """Load a CNN or embedding-head run once. ``tta``: none | flip | None (= the run's own)."""
        from klgrade.evaluate.explain import ExplainError, find_target

        run_dir = Path(run_dir)
        if not run_dir.exists():
            raise RunError(f"{run_dir}: no such run directory")
        if not run_dir.is_dir():
            raise RunError(f"{run_dir}: not a klgrade run (a run is a directory with config.yaml and checkpoint.pt)")
        cfg = read_config(run_dir)
        kind = str(cfg.get("kind", "cnn"))
        tta_run = str(cfg.get("tta", "none") or "none")
        tta = tta or tta_run
        if tta not in ("none", "flip"):
            raise RunError(f"tta must be none or flip, got {tta!r}")
        if kind == "cnn":
            parts = _load_cnn(run_dir, device)
        elif kind == "head":
            parts = _load_head(run_dir, device)
        else:
            raise RunError(f"{run_dir / 'config.yaml'}: unknown run kind {kind!r} (expected cnn or head)")
        g = cls(run_dir=run_dir, kind=kind, name=run_name(run_dir), tta=tta, tta_run=tta_run, **parts)
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
        dtype = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype is not None else "float32"
        return dtype + (" + channels-last" if self.channels_last else "")

    # ------------------------------------------------------------------ files -> knees
    def knees(self, path: str | Path, display: str | None = None, jsw: bool = True) -> tuple[str, list[Knee]]:
        """Read ``path`` and return (layout, knees). ``display`` replaces the path in errors."""
        return knees_from_file(path, self.img_size, display, jsw=jsw)

    # ------------------------------------------------------------------ knees -> grades
    def probabilities(self, views: np.ndarray) -> np.ndarray:
        """(N, 5) float64 softmax probabilities for uint8 views (N, S, S)."""
        from klgrade.train.inference import forward_probs, views_to_tensor

        views = np.asarray(views)
        if views.ndim != 3 or views.shape[1:] != (self.img_size, self.img_size) or views.dtype != np.uint8:
            raise ValueError(f"expected uint8 views (N,{self.img_size},{self.img_size}), got "
                             f"{views.shape} {views.dtype}")
        if isinstance(self.model, _HeadViews):
            probs = self.model.predict_views(views)
            if self.tta == "flip":
                probs = (probs + self.model.predict_views(np.ascontiguousarray(views[:, :, ::-1]))) / 2
            return np.asarray(probs, dtype=np.float64)
        x = views_to_tensor(views, self.mean, self.std, self.device, channels_last=self.channels_last)
        return forward_probs(self.model, x, self.tta, self.amp_dtype).double().cpu().numpy()

    def heatmaps(self, views: np.ndarray, classes) -> np.ndarray:
        """Grad-CAM maps (N, S, S) in [0, 1] for the given grades (on the view itself, not its TTA mirror)."""
        from klgrade.evaluate.explain import ExplainError, gradcam
        from klgrade.train.inference import views_to_tensor

        if self.explain_target is None:
            raise ExplainError(self.explain_unavailable or "no Grad-CAM target layer")
        x = views_to_tensor(np.asarray(views), self.mean, self.std, self.device)
        return gradcam(self.model, x, classes, self.explain_target)

    def grade(self, knees: list[Knee], heatmaps: bool = False, include_view: bool = False) -> list[dict]:
        """Per-knee result dicts (see ``knee_result``); heatmaps as overlay PNG bytes under
        ``_heatmap_png`` (callers turn them into files or data URLs)."""
        from klgrade.evaluate.explain import overlay, png_bytes, resize_map

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
            if include_view:
                r["view"] = data_url(png_bytes(disp))
                if k.jsw is not None and k.info is not None and (k.jsw.medial.ok or k.jsw.lateral.ok):
                    from klgrade.measure.overlay import draw

                    r["jsw_view"] = data_url(png_bytes(unflip(k, draw(canon, k.jsw, k.info))))
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
    from klgrade.data.canonical import canonical_view

    if knee.source is None or knee.view.shape[0] >= DISPLAY_PX:
        return knee.view
    img, spacing, side = knee.source
    return canonical_view(img, DISPLAY_PX, spacing_mm=spacing, side=side)[0]


def unflip(knee: Knee, img: np.ndarray) -> np.ndarray:
    """A display image (or CAM) back in the film's orientation: a reader compares a left knee
    with the film, not with its mirror image."""
    return np.ascontiguousarray(img[:, ::-1]) if knee.flipped else img


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------------- reading and cropping

def knees_from_file(path: str | Path, img_size: int, display: str | None = None,
                    jsw: bool = True) -> tuple[str, list[Knee]]:
    """Read an image file and make the model view of each knee in it: (layout, knees).

    A bilateral film (``klgrade.data.canonical.is_bilateral``: two legs side by side) gives the
    right and the left knee; anything else one knee, whose side comes from the DICOM's
    (Image)Laterality when present; ``jsw``: also measure each knee's joint space width. Raises
    ClinicError naming ``display`` (default: the path).
    """
    import cv2

    from klgrade.data.canonical import is_bilateral
    from klgrade.data.dicom import DicomError, radiograph_from_dataset, read_dataset
    from klgrade.data.images import ImageReadError, is_dicom, read_image

    path = Path(path)
    name = display or str(path)
    if not path.is_file():
        raise ClinicError(f"{name}: no such file")
    spacing, laterality = None, ""
    try:
        if is_dicom(path):
            ds = read_dataset(path)
            rad = radiograph_from_dataset(ds, name)
            img, spacing = rad.pixels, rad.spacing_mm
            # Laterality is technical (which knee), not identifying; nothing else is read.
            laterality = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "")).strip().upper()
        else:
            img = read_image(path)
    except (DicomError, ImageReadError) as e:
        raise ClinicError(_rename(str(e), path, name)) from e
    except (OSError, ValueError) as e:
        raise ClinicError(f"{name}: cannot read ({type(e).__name__}: {_rename(str(e), path, name)})") from e
    try:
        img, spacing, factor = reduce_for_view(img, spacing, img_size)
        if is_bilateral(img):
            # The two knees' views are independent and mostly GIL-free (OpenCV, NumPy): make them
            # in parallel, which takes their cost off the critical path on an idle machine.
            return "bilateral", list(_view_pool().map(
                lambda side: _knee(img, spacing, side, img_size, True, factor, jsw), ("R", "L")))
        side = laterality if laterality in ("R", "L") else "U"
        if side == "L":  # a single left knee: mirrored into the canonical (right-knee) orientation
            img = np.ascontiguousarray(img[:, ::-1])
        return "unilateral", [_knee(img, spacing, side, img_size, False, factor, jsw)]
    except (ValueError, ArithmeticError, IndexError, cv2.error) as e:  # degenerate images (flat, tiny)
        raise ClinicError(f"{name}: cannot make a knee view ({type(e).__name__}: {e})") from e


def reduce_for_view(img: np.ndarray, spacing, img_size: int) -> tuple[np.ndarray, object, int]:
    """Area-average a film that is much finer than the views made from it: (image, spacing, factor).

    An OAI film has 0.14 mm pixels; a 224-px view of the canonical ~94 mm field has 0.42 mm ones,
    so locating and cropping at full resolution costs more than the model's forward pass, for
    nothing. Reducing by an integer factor that keeps the film at least ``VIEW_OVERSAMPLE`` x finer
    than the model view leaves the view the same up to resampling noise (tests check it) at a
    fraction of the cost. The display image is drawn from the same reduced film, so the heatmap
    lies exactly on the crop the model saw. Films without spacing are left alone.
    """
    import cv2

    from klgrade.data.canonical import FOV_MM
    from klgrade.data.images import MIN_SIDE

    if spacing is None:
        return img, spacing, 1
    sy, sx = (float(spacing), float(spacing)) if np.isscalar(spacing) else (float(spacing[0]), float(spacing[1]))
    factor = int(FOV_MM / img_size / (VIEW_OVERSAMPLE * max(sy, sx)))
    # never below the smallest usable image (a tiny film with a fine spacing would reduce to 0 px)
    factor = min(factor, min(img.shape[:2]) // MIN_SIDE)
    if factor < 2:
        return img, spacing, 1
    h, w = img.shape[0] // factor, img.shape[1] // factor
    small = cv2.resize(np.ascontiguousarray(img[: h * factor, : w * factor], np.float32), (w, h),
                       interpolation=cv2.INTER_AREA)
    return small, (sy * factor, sx * factor), factor


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _view_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Two threads shared by all callers (one per knee); server threads queue on it rather than
    each starting more threads than the machine has cores."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="klgrade-view")
        return _POOL


def _rename(msg: str, path: Path, name: str) -> str:
    return msg.replace(str(path), name) if name != str(path) else msg


def _knee(img: np.ndarray, spacing, side: str, img_size: int, bilateral: bool, factor: int = 1,
          jsw: bool = True) -> Knee:
    """The view of one knee of ``img`` (reduced ``factor`` x from the film: the reported centre is
    in the film's own pixels)."""
    from klgrade.data.canonical import canonical_view

    view_side = side if bilateral else None
    view, info = canonical_view(img, img_size, spacing_mm=spacing, side=view_side)
    cx, cy = info.centre
    if not bilateral and side == "L":  # report the centre in the film's own coordinates
        cx = img.shape[1] - 1 - cx
    cx, cy = (cx + 0.5) * factor - 0.5, (cy + 0.5) * factor - 0.5
    loc = {"x": round(float(cx), 1), "y": round(float(cy), 1), "scale": info.scale_source}
    flipped = info.flipped if bilateral else side == "L"
    if not info.ok:
        if bilateral:  # half a film cropped at random is not a knee: refuse rather than guess
            return Knee(side=side, view=None, location=loc, flipped=flipped,
                        error=f"{SIDE_NAMES[side]} knee not located: {info.reason}")
        from klgrade.measure.jsw import failed

        return Knee(side=side, view=view, flipped=flipped, location=loc, source=(img, spacing, view_side),
                    note=f"joint not located ({info.reason}); graded a centred crop of the image",
                    jsw=failed(f"joint not located: {info.reason}", "mm" if spacing else "%plateau") if jsw else None)
    from klgrade.measure import measure_knee

    return Knee(side=side, view=view, flipped=flipped, location=loc, source=(img, spacing, view_side),
                note=info.reason, jsw=measure_knee(img, spacing, view_side, info=info) if jsw else None, info=info)


# ---------------------------------------------------------------------- run kinds

def _load_cnn(run_dir: Path, device: str) -> dict:
    from klgrade.train.inference import load_cnn_run

    loaded = load_cnn_run(run_dir, device=device)
    return {"model": loaded.model, "img_size": int(loaded.img_size), "mean": tuple(loaded.mean),
            "std": tuple(loaded.std), "device": loaded.device, "amp_dtype": loaded.amp_dtype,
            "channels_last": bool(loaded.channels_last),
            "description": f"{loaded.config.get('model', '?')} ({loaded.arch or 'timm'}) CNN"}


def _load_head(run_dir: Path, device: str) -> dict:
    """An embedding-head run as one torch module: frozen backbone -> standardise -> head.

    MLP and linear heads become torch layers, so grading, Grad-CAM (through the backbone) and export
    work as for a CNN; their output equals klgrade.models.heads.HeadModel's. Gradient-boosted
    trees have no gradient: they are graded through HeadModel itself, without heatmaps or export.
    """
    from klgrade.models.heads import load_head_run
    from klgrade.train.inference import resolve_device

    dev = resolve_device(device)
    head = load_head_run(run_dir, device=str(dev))
    try:
        emb = head.embedder(str(dev))  # rebuilt and checked against the training fingerprint
    except ValueError as e:
        raise RunError(f"{run_dir}: cannot rebuild the head's backbone ({e})") from e
    desc = f"{head.backbone} embeddings + {head.head} head"
    parts = {"img_size": int(emb.input_size), "mean": tuple(emb.mean), "std": tuple(emb.std), "device": dev,
             "description": desc}
    if head.head == "mlp":
        net = head._net
    elif head.head == "linear":
        coef = head.ckpt["coef"].float()
        net = torch.nn.Linear(coef.shape[1], coef.shape[0])
        with torch.no_grad():
            net.weight.copy_(coef)
            net.bias.copy_(head.ckpt["intercept"].float())
    else:
        return {**parts, "model": _HeadViews(head),
                "explain_unavailable": f"{head.head} head: trees have no gradient, Grad-CAM needs one"}
    model = EmbeddingHeadNet(emb.module, head.mean, head.scale, net).eval().to(dev)
    return {**parts, "model": model}


class EmbeddingHeadNet(torch.nn.Module):
    """Normalised image (N, 3, S, S) -> frozen backbone -> (v - mean) / scale -> head -> logits."""

    def __init__(self, backbone, mean, scale, head):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.register_buffer("feat_mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("feat_scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x):
        return self.head((self.backbone(x).float() - self.feat_mean) / self.feat_scale)


class _HeadViews:
    """A head without a torch graph (xgboost): uint8 views -> probabilities via HeadModel."""

    def __init__(self, head):
        self.head = head

    def predict_views(self, views: np.ndarray) -> np.ndarray:
        return self.head.predict_views(views)
