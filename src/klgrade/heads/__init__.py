"""Classifier heads on frozen embeddings (the study's approach 3) and their run dirs.

Heads:
  * ``mlp``     — the study's "custom neural network": two hidden layers with dropout, a class-balanced
                  cross-entropy, AdamW, early stopping on validation QWK (best epoch kept);
  * ``linear``  — a multinomial logistic-regression probe (scikit-learn's objective, solved with
                  torch L-BFGS for speed), class-balanced, its C chosen on validation QWK;
  * ``xgboost`` — gradient-boosted trees (optional extra ``klgrade[xgboost]``), class-balanced sample
                  weights, early stopping on validation log-loss.

Features are standardised with the train split's mean/std. Class imbalance is handled by default
(``balance=True``): the study's embedding head never predicted KL1, and a head here should not
collapse a grade silently — per-grade F1 in metrics_<split>.json makes it visible either way.

A head run has exactly the CNN run format (klgrade.rundir): config.yaml (``kind: head``),
checkpoint.pt (a dict of tensors and plain values, loadable with ``torch.load(weights_only=True)``),
history.csv, predictions_<split>.csv and metrics_<split>.json.
"""
from klgrade.heads import linear, mlp, trees  # noqa: F401 - each registers its head
from klgrade.heads.base import HEADS, Head, HeadConfig, class_weights, get_head, register_head
from klgrade.heads.mlp import MLPHead
from klgrade.heads.run import CHECKPOINT_FORMAT, HeadModel, fit_head, load_head_run, predict_views

__all__ = ["HEADS", "Head", "HeadConfig", "register_head", "get_head", "class_weights", "MLPHead",
           "CHECKPOINT_FORMAT", "HeadModel", "fit_head", "load_head_run", "predict_views"]
