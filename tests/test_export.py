"""klgrade export: ONNX (onnxruntime parity < 1e-4) and TorchScript, with the input documented."""
from __future__ import annotations

import json

import numpy as np
import pytest

from klgrade.cli import main
from klgrade.clinic.export import ExportError, export_run, sidecar_path
from klgrade.clinic.grader import Grader, knees_from_file


def test_onnx_export_parity_and_sidecar(tiny_cnn_run, bilateral_dicom, tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    assert main(["export", "--run", str(tiny_cnn_run), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity: max |p_export - p_torch|" in printed and "'image' float32" in printed
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["input"]["name"] == "image" and meta["input"]["shape"] == ["batch", 3, 64, 64]
    assert len(meta["input"]["mean"]) == 3 and meta["output"]["name"] == "probabilities"
    assert meta["parity"]["max_abs_diff"] < 1e-4 and meta["parity"]["tolerance"] == 1e-4

    # A real knee, preprocessed exactly as the sidecar says, gives klgrade's own probabilities.
    g = Grader.from_run(tiny_cnn_run, tta="none")
    _, knees = knees_from_file(bilateral_dicom[0], 64)
    views = np.stack([k.view for k in knees])
    x = views.astype(np.float32)[:, None] / 255.0
    mean = np.array(meta["input"]["mean"], np.float32)[None, :, None, None]
    std = np.array(meta["input"]["std"], np.float32)[None, :, None, None]
    x = (np.repeat(x, 3, axis=1) - mean) / std
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (probs,) = sess.run(["probabilities"], {"image": x})
    assert probs.shape == (2, 5)
    # the export is fp32; klgrade grades in the layout measured fastest here (bf16 where native)
    assert np.abs(probs - g.probabilities(views)).max() < (1e-4 if g.amp_dtype is None else 5e-3)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated upstream, still supported
def test_torchscript_export(tiny_cnn_run, tmp_path):
    import torch

    out = tmp_path / "model.pt"
    meta = export_run(tiny_cnn_run, "torchscript", out)
    assert meta["parity"]["max_abs_diff"] < 1e-4
    m = torch.jit.load(str(out))
    p = m(torch.zeros(3, 3, 64, 64))
    assert p.shape == (3, 5) and torch.allclose(p.sum(1), torch.ones(3))


def test_failed_parity_writes_nothing_and_bad_runs_are_clear(tiny_cnn_run, tmp_path, capsys):
    out = tmp_path / "m.pt"
    with pytest.raises(ExportError, match="parity check failed"):
        export_run(tiny_cnn_run, "torchscript", out, tol=-1.0)  # no difference can pass
    assert not out.exists() and not sidecar_path(out).exists() and list(tmp_path.iterdir()) == []
    assert main(["export", "--run", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 1
    assert "not a klgrade run" in capsys.readouterr().err
