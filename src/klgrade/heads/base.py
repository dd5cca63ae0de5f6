"""The head contract and registry: a head is one module that registers one class.

    @register_head("mlp")
    class Mlp(Head):
        def fit(cfg, Ztr, ytr, Zva, yva) -> (state, history)  # on standardised vectors
        def predict_proba(state, Z) -> (N, 5) float64
        def torch_layers(state) -> nn.Module | None          # standardised vectors -> logits

``state`` is a dict of tensors and plain values (it goes into checkpoint.pt, read back with
``torch.load(weights_only=True)``); ``history`` a DataFrame written as history.csv. A head with
``torch_layers`` is graded, explained (Grad-CAM) and exported like a CNN; one without is graded
through ``predict_proba`` only (klgrade.runs.head).
"""
from __future__ import annotations

import numpy as np

from klgrade.config import HeadConfig  # noqa: F401 - re-exported (heads.HeadConfig)
from klgrade.evaluate.metrics import N_GRADES
from klgrade.rundir import RunError

HEADS: dict[str, type[Head]] = {}


def register_head(name: str):
    """Class decorator: make a Head available as ``--head name``."""
    def add(cls):
        HEADS[name] = cls
        cls.name = name
        return cls
    return add


def get_head(name: str) -> type[Head]:
    if name not in HEADS:
        raise RunError(f"unknown head '{name}' (choose from {', '.join(HEADS)})")
    return HEADS[name]


class Head:
    """The contract (see the module docstring); methods are static: a head holds no state itself."""

    name = ""

    @staticmethod
    def check_available() -> None:
        """Raise RunError naming the missing extra, before any work."""

    @staticmethod
    def fit(cfg, Ztr, ytr, Zva, yva):
        raise NotImplementedError

    @staticmethod
    def predict_proba(state: dict, Z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def torch_layers(state: dict):
        return None


def class_weights(y: np.ndarray) -> np.ndarray:
    """'balanced' weights n / (K * n_c) over the grades present (absent grades get 0)."""
    counts = np.bincount(y, minlength=N_GRADES).astype(float)
    present = counts > 0
    w = np.zeros(N_GRADES)
    w[present] = len(y) / (present.sum() * counts[present])
    return w


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))
