"""Run dirs as graders: ``load_run(dir) -> Predictor``, one loader per run kind.

    predictor = load_run("runs/resnet18")                 # a CNN run, a head run, ...
    probs = predictor.predict_views(views, tta="flip")   # uint8 (N, S, S) views -> (N, 5)
    module = predictor.torch_module()                    # for Grad-CAM and export; None for trees

Evaluate, robustness, predict, serve and export all grade through a Predictor, so they agree for
the same views. The loaders are registered by kind as data (module:attribute), imported when a
run of that kind is loaded; a new run kind is one module and one line here. The run-dir format
itself (config.yaml, checkpoint.pt, predictions_<split>.csv) is klgrade.rundir.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from klgrade.rundir import RunError, read_config, run_name

LOADERS = {
    "cnn": "klgrade.runs.cnn:load_cnn_predictor",
    "head": "klgrade.runs.head:load_head_predictor",
}
# Kinds that are not graders, and what to do with them instead.
NOT_GRADERS = {
    "pretrain": "a self-supervised pretrain run is a backbone without a grading head: fine-tune it "
                "(klgrade train --weights RUN_DIR) or fit a head on its embeddings "
                "(klgrade embed --backbone RUN_DIR, then klgrade fit-head)",
}


@dataclass
class Predictor:
    """A loaded run that grades uint8 views. ``module``: normalised (N, 3, S, S) -> logits, or None
    (then ``_predict`` grades views itself, e.g. gradient-boosted trees)."""

    kind: str
    name: str
    run_dir: Path
    config: dict
    img_size: int
    mean: tuple
    std: tuple
    device: object  # torch.device
    module: object = None  # torch.nn.Module | None
    amp_dtype: object = None  # autocast dtype evaluate and predict both use, or None (fp32)
    channels_last: bool = False
    description: str = ""
    explain_unavailable: str = ""  # why there is no Grad-CAM (no module, ...)
    _predict: object = field(default=None, repr=False)  # views -> probs when there is no module

    @property
    def tta(self) -> str:
        """The TTA the run itself was evaluated with (config.yaml)."""
        return str(self.config.get("tta", "none") or "none")

    @property
    def precision(self) -> str:
        dtype = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype is not None else "float32"
        return dtype + (" + channels-last" if self.channels_last else "")

    def torch_module(self):
        return self.module

    def predict_views(self, views, tta: str | None = None, batch_size: int = 64, progress: bool = False,
                      workers: int = 0) -> np.ndarray:
        """(N, 5) float64 probabilities for uint8 views (N, S, S), S = ``img_size``; ``tta``: none |
        flip | None (the run's own)."""
        from klgrade.runs.cnn import check_views, predict_module

        tta = tta or self.tta
        if tta not in ("none", "flip"):
            raise ValueError(f"tta must be none or flip, got {tta!r}")
        views = check_views(views, self.img_size, self.run_dir)
        if self.module is not None:
            return predict_module(self.module, self, views, tta, batch_size, progress, workers)
        probs = self._predict(views, batch_size)
        if tta == "flip":
            probs = (probs + self._predict(np.ascontiguousarray(views[:, :, ::-1]), batch_size)) / 2
        return np.asarray(probs, dtype=np.float64)


def load_run(run_dir: str | Path, device: str = "auto") -> Predictor:
    """Load any gradable run dir once (its kind from config.yaml); RunError with the reason if not."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: not a klgrade run (a run is a directory with config.yaml and checkpoint.pt)")
    cfg = read_config(run_dir)
    kind = str(cfg.get("kind", "cnn"))
    if kind in NOT_GRADERS:
        raise RunError(f"{run_dir}: {NOT_GRADERS[kind]}")
    if kind not in LOADERS:
        raise RunError(f"{run_dir / 'config.yaml'}: unknown run kind {kind!r} (expected {' or '.join(LOADERS)})")
    module, _, attr = LOADERS[kind].partition(":")
    loader = getattr(importlib.import_module(module), attr)
    return loader(run_dir, cfg, run_name(run_dir), device)
