"""The ``xgboost`` head: gradient-boosted trees (optional extra ``klgrade[xgboost]``), class-balanced
sample weights, early stopping on validation log-loss. Trees have no gradient: no Grad-CAM, no export."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from klgrade.evaluate.metrics import N_GRADES
from klgrade.heads.base import Head, register_head
from klgrade.rundir import RunError


def _expand(p: np.ndarray, classes) -> np.ndarray:
    out = np.zeros((len(p), N_GRADES))
    out[:, np.asarray(classes, dtype=int)] = p
    return out


def _import_xgboost():
    try:
        import xgboost
    except ImportError as e:
        raise RunError("--head xgboost needs the xgboost package: pip install 'klgrade[xgboost]'") from e
    return xgboost


def fit_xgboost(cfg, Xtr, ytr, Xva, yva):
    xgb = _import_xgboost()
    from sklearn.utils.class_weight import compute_sample_weight

    # Train on contiguous labels 0..k-1 (xgboost's requirement), map back to grades on predict.
    classes = np.unique(ytr)
    remap = {g: i for i, g in enumerate(classes)}
    ytr_c = np.vectorize(remap.get)(ytr)
    keep = np.isin(yva, classes)
    yva_c = np.vectorize(remap.get)(yva[keep]) if keep.any() else yva[keep]
    sw = compute_sample_weight("balanced", ytr_c) if cfg.balance else None
    params = dict(n_estimators=cfg.n_estimators, max_depth=cfg.max_depth, learning_rate=cfg.learning_rate,
                  subsample=0.8, colsample_bytree=0.5, tree_method="hist", random_state=cfg.seed,
                  objective="multi:softprob", eval_metric="mlogloss")
    if keep.any():
        params["early_stopping_rounds"] = cfg.early_stopping_rounds
    clf = xgb.XGBClassifier(**params)
    clf.fit(Xtr, ytr_c, sample_weight=sw, eval_set=[(Xva[keep], yva_c)] if keep.any() else None, verbose=False)
    raw = bytes(clf.get_booster().save_raw("json"))
    # round 0 can be the best (a validation set the trees only get worse on): 0 is not "unset"
    best = getattr(clf, "best_iteration", None)
    best_it = min(int(best) if best is not None else clf.n_estimators - 1,
                  clf.get_booster().num_boosted_rounds() - 1)
    hist = clf.evals_result().get("validation_0", {}).get("mlogloss", [])
    ckpt = {"booster": torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone(), "best_iteration": best_it,
            "classes": torch.from_numpy(classes.astype(np.int64))}
    return ckpt, pd.DataFrame({"round": np.arange(1, len(hist) + 1), "val_loss": hist})


@register_head("xgboost")
class Trees(Head):
    fit = staticmethod(fit_xgboost)
    check_available = staticmethod(_import_xgboost)

    @staticmethod
    def predict_proba(state: dict, Z: np.ndarray) -> np.ndarray:
        xgb = _import_xgboost()
        booster = xgb.Booster()
        booster.load_model(bytearray(state["booster"].numpy().tobytes()))
        p = booster.predict(xgb.DMatrix(Z), iteration_range=(0, int(state["best_iteration"]) + 1))
        return _expand(p.reshape(len(Z), -1), state["classes"].numpy())
