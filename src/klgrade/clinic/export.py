"""Export a run's model (CNN, or embedding backbone + head) to ONNX or TorchScript.

    report = export_run("runs/resnet18", "onnx", "resnet18.onnx")

The exported graph maps the *normalised* image tensor to grade probabilities:

    input  "image"          float32 (batch, 3, S, S), NCHW
    output "probabilities"  float32 (batch, 5), softmax over KL grades 0..4

where the input is the model view (``klgrade.view.entrance.square_view``: S x S uint8 gray) / 255,
replicated to 3 channels and normalised per channel with the run's mean/std. A sidecar
``FILE.json`` records exactly that (names, shape, mean, std, S) with the parity result.

Parity is checked before the file is published: the exported file is reloaded (onnxruntime for
ONNX, ``torch.jit.load`` for TorchScript) and run on seeded inputs of a batch size other than the
traced one (so the dynamic batch axis is exercised too); the largest absolute difference of the
probabilities from the eager PyTorch model must be below ``PARITY_TOL`` (1e-4), else nothing is
written and :class:`ExportError` says by how much it missed.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from klgrade import io
from klgrade.grades import GRADES

FORMATS = ("onnx", "torchscript")
PARITY_TOL = 1e-4
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
DEFAULT_OPSET = 17


class ExportError(RuntimeError):
    """An export that cannot be made or does not match the PyTorch model."""


def _probability_module(model):
    import torch

    class ProbabilityModel(torch.nn.Module):
        """The run's logits model with the softmax folded in: the file returns probabilities."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, image):
            return torch.softmax(self.net(image).float(), dim=1)

    return ProbabilityModel(model).eval()


def parity_inputs(img_size: int, mean, std, n: int = 3, seed: int = 0):
    """Seeded normalised inputs made the way real ones are: random uint8 gray views -> tensor."""
    from klgrade.view.batches import views_to_tensor

    rng = np.random.default_rng(seed)
    # A smooth ramp plus noise: a flat-noise image alone can leave BatchNorm-free models near uniform.
    ramp = np.linspace(0, 255, img_size, dtype=np.float32)[None, :, None]
    views = np.clip(ramp + rng.normal(0, 60, (n, img_size, img_size)), 0, 255).astype(np.uint8)
    return views_to_tensor(views, mean, std, "cpu")


def export_run(run_dir: str | Path, fmt: str, out: str | Path, opset: int = DEFAULT_OPSET,
               tol: float = PARITY_TOL) -> dict:
    """Export, verify parity, then publish ``out`` and ``out.json`` atomically; returns the sidecar."""
    import torch

    from klgrade.runs import load_run

    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out}: is a directory; --out must be a file path")
    grader = load_run(run_dir, device="cpu")
    if grader.torch_module() is None:
        raise ExportError(f"{run_dir}: its model is not a PyTorch module ({grader.description}); "
                          "only CNN runs and neural heads can be exported")
    wrapped = _probability_module(grader.torch_module())
    example = parity_inputs(grader.img_size, grader.mean, grader.std, n=1, seed=1)
    check = parity_inputs(grader.img_size, grader.mean, grader.std, n=3, seed=0)
    with torch.no_grad():
        ref = wrapped(check).numpy()
    with io.atomic_path(out) as tmp:
        if fmt == "onnx":
            got, checker = _export_onnx(wrapped, example, check, tmp, opset)
        else:
            got, checker = _export_torchscript(wrapped, example, check, tmp)
        diff = float(np.abs(got - ref).max())
        if not np.isfinite(diff) or diff >= tol:
            raise ExportError(f"{out}: parity check failed: max |p_export - p_torch| = {diff:.3g} "
                              f">= {tol:g} ({checker}); nothing written")
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    sidecar = {
        "format": fmt,
        "file": out.name,
        "sha256": digest,
        "run": grader.name,
        "run_kind": grader.kind,
        "model": grader.description,
        "input": {
            "name": INPUT_NAME, "dtype": "float32", "layout": "NCHW",
            "shape": ["batch", 3, grader.img_size, grader.img_size],
            "preprocessing": (f"the knee view as klgrade makes it (klgrade.view.entrance.square_view: "
                              f"{grader.img_size}x{grader.img_size} uint8 grayscale, canonical orientation = a "
                              "right knee, left knees mirrored), divided by 255, replicated to 3 channels, "
                              "then (x - mean[c]) / std[c]"),
            "mean": [float(m) for m in grader.mean], "std": [float(s) for s in grader.std],
        },
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", 5],
                   "meaning": "softmax probabilities of KL grades 0-4; grade = argmax, "
                              "expected grade = sum(g * p_g)"},
        "grades": list(GRADES),
        "tta": ("none inside the file; the run was evaluated with flip TTA: average the probabilities "
                "of the input and of its horizontal mirror") if grader.tta == "flip" else "none",
        "parity": {"max_abs_diff": diff, "tolerance": tol, "inputs": int(check.shape[0]),
                   "checked_with": checker},
        "opset": opset if fmt == "onnx" else None,
        "torch": torch.__version__,
    }
    io.write_json(sidecar_path(out), sidecar)
    return sidecar


def sidecar_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


def _export_onnx(wrapped, example, check, tmp: Path, opset: int) -> tuple[np.ndarray, str]:
    import onnx
    import onnxruntime as ort
    import torch

    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of dynamo=True, which needs
        # onnxscript (not a dependency); it still exports these CNN/ViT graphs exactly.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        # timm's shape assertions trace as constants; the parity check below (another batch size)
        # is what proves the graph generalises.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(wrapped, (example,), str(tmp), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    try:
        onnx.checker.check_model(str(tmp))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported ONNX graph is invalid: {e}") from e
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: check.numpy()})[0]
    return np.asarray(got), f"onnxruntime {ort.__version__} CPUExecutionProvider"


def _export_torchscript(wrapped, example, check, tmp: Path) -> tuple[np.ndarray, str]:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapped, (example,), check_trace=False)
        traced.save(str(tmp))
        loaded = torch.jit.load(str(tmp), map_location="cpu")
        got = loaded(check).numpy()
    return got, f"torch.jit.load (torch {torch.__version__})"
