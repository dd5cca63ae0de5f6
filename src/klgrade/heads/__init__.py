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
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from klgrade import io
from klgrade.evaluate.metrics import N_GRADES, qwk
from klgrade.rundir import RunError, write_predictions

log = logging.getLogger(__name__)

HEADS = ("mlp", "linear", "xgboost")
CHECKPOINT_FORMAT = "klgrade-head"
# Store-meta fields a head depends on: copied into the checkpoint so that a run can rebuild (and
# verify) the very backbone that made its training vectors.
STORE_FIELDS = ("backbone", "features", "dim", "weights", "weights_source", "weights_fingerprint", "seed",
                "preprocessing")


@dataclass
class HeadConfig:
    head: str = "mlp"
    seed: int = 0
    balance: bool = True  # class-balanced loss / sample weights
    val_fraction: float = 0.1  # patient-level hold-out of train when the manifest has no val split
    # mlp
    hidden: tuple[int, ...] = (256, 64)
    dropout: float = 0.3
    epochs: int = 40
    patience: int = 6
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4
    device: str = "cpu"
    # linear: C grid searched on validation QWK unless one C is given
    C: tuple[float, ...] = (0.01, 0.1, 1.0)
    max_iter: int = 50  # L-BFGS iterations per C
    # xgboost
    n_estimators: int = 500
    max_depth: int = 4
    learning_rate: float = 0.1
    early_stopping_rounds: int = 30


class MLPHead(nn.Module):
    def __init__(self, dim: int, hidden=(512, 128), dropout: float = 0.3, n_classes: int = N_GRADES):
        super().__init__()
        layers: list[nn.Module] = []
        prev = dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.GELU(), nn.Dropout(dropout)]
            prev = h
        layers.append(nn.Linear(prev, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def class_weights(y: np.ndarray) -> np.ndarray:
    """'balanced' weights n / (K * n_c) over the grades present (absent grades get 0)."""
    counts = np.bincount(y, minlength=N_GRADES).astype(float)
    present = counts > 0
    w = np.zeros(N_GRADES)
    w[present] = len(y) / (present.sum() * counts[present])
    return w


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))


# ----------------------------------------------------------------------------------------- fitting
def _fit_mlp(cfg: HeadConfig, Xtr, ytr, Xva, yva):
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    model = MLPHead(Xtr.shape[1], cfg.hidden, cfg.dropout).to(dev)
    w = class_weights(ytr) if cfg.balance else (np.bincount(ytr, minlength=N_GRADES) > 0).astype(float)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(w, dtype=torch.float32, device=dev))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    xt, yt = torch.from_numpy(np.array(Xtr)).to(dev), torch.from_numpy(np.array(ytr)).long().to(dev)
    xv = torch.from_numpy(np.array(Xva)).to(dev)
    # Small datasets still get ~10 optimiser steps per epoch (else patience counts single steps).
    batch_size = min(cfg.batch_size, max(16, -(-len(xt) // 10)))
    best = (-np.inf, np.inf)
    best_state, best_epoch, history, bad = None, 0, [], 0
    from tqdm import tqdm

    bar = tqdm(range(1, cfg.epochs + 1), desc="fit mlp head", unit="epoch")
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(xt), generator=gen).to(dev)
        total = 0.0
        for s in range(0, len(perm), batch_size):
            idx = perm[s : s + batch_size]
            loss = loss_fn(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        with torch.inference_mode():
            pv = torch.softmax(model(xv), 1).cpu().numpy()
        val_qwk, val_loss = qwk(yva, pv.argmax(1)), _log_loss(yva, pv)
        history.append({"epoch": epoch, "train_loss": total / len(xt), "val_loss": val_loss, "val_qwk": val_qwk,
                        "val_accuracy": float(np.mean(pv.argmax(1) == yva)), "lr": cfg.lr,
                        "seconds": time.perf_counter() - t0})
        bar.set_postfix(val_qwk=f"{val_qwk:.3f}", val_loss=f"{val_loss:.3f}")
        # The kept epoch: best QWK, ties broken by lower validation loss. Patience counts epochs
        # without a better QWK only, so a loss that keeps creeping down does not stall stopping.
        bad = 0 if val_qwk > best[0] else bad + 1
        if (val_qwk, -val_loss) > (best[0], -best[1]):
            best, best_epoch = (val_qwk, val_loss), epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if cfg.patience and bad >= cfg.patience:
            break
    bar.close()
    model.load_state_dict(best_state)
    ckpt = {"state_dict": best_state, "hidden": list(cfg.hidden), "dropout": cfg.dropout, "best_epoch": best_epoch}
    return ckpt, pd.DataFrame(history)


def _fit_linear(cfg: HeadConfig, Xtr, ytr, Xva, yva):
    """Multinomial logistic regression, scikit-learn's objective (C * sum_i w_i CE_i + ||W||^2 / 2,
    'balanced' w) minimised with torch's full-batch L-BFGS: scikit-learn's lbfgs works in float64
    through a per-sample loss loop and took ~1 s per iteration on 32k x 768 here, torch's ~20 ms."""
    torch.manual_seed(cfg.seed)
    xt, yt = torch.from_numpy(np.array(Xtr)), torch.from_numpy(np.array(ytr)).long()
    xv = torch.from_numpy(np.array(Xva))
    n = len(xt)
    cw = torch.tensor(class_weights(ytr) if cfg.balance else (np.bincount(ytr, minlength=N_GRADES) > 0) * 1.0,
                      dtype=torch.float32)
    W = torch.zeros(N_GRADES, xt.shape[1], requires_grad=True)
    b = torch.zeros(N_GRADES, requires_grad=True)
    rows, best = [], None
    # Ascending C with warm starts: each fit starts from the more regularised solution.
    for C in sorted(cfg.C):
        t0 = time.perf_counter()
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=cfg.max_iter, history_size=20,
                                tolerance_grad=1e-5, tolerance_change=1e-6, line_search_fn="strong_wolfe")
        evals = [0]

        def closure(C=C, evals=evals, opt=opt):
            opt.zero_grad()
            # Dividing sklearn's objective by C*n keeps the loss O(1) for L-BFGS' tolerances.
            loss = nn.functional.cross_entropy(xt @ W.T + b, yt, weight=cw, reduction="sum") / n \
                + (W * W).sum() / (2 * C * n)
            loss.backward()
            evals[0] += 1
            return loss

        opt.step(closure)
        with torch.no_grad():
            p = torch.softmax(xv @ W.T + b, 1).numpy().astype(np.float64)
        score = (qwk(yva, p.argmax(1)), -_log_loss(yva, p))
        rows.append({"C": C, "val_qwk": score[0], "val_loss": -score[1], "evaluations": evals[0],
                     "seconds": time.perf_counter() - t0})
        if best is None or score > best[0]:
            best = (score, C, W.detach().clone(), b.detach().clone())
    _, C, coef, intercept = best
    intercept[cw == 0] = -1e4  # a grade absent from train is never predicted
    ckpt = {"coef": coef, "intercept": intercept, "C": float(C)}
    return ckpt, pd.DataFrame(rows)


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


def _fit_xgboost(cfg: HeadConfig, Xtr, ytr, Xva, yva):
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
    best_it = int(getattr(clf, "best_iteration", None) or clf.n_estimators - 1)
    hist = clf.evals_result().get("validation_0", {}).get("mlogloss", [])
    ckpt = {"booster": torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone(), "best_iteration": best_it,
            "classes": torch.from_numpy(classes.astype(np.int64))}
    return ckpt, pd.DataFrame({"round": np.arange(1, len(hist) + 1), "val_loss": hist})


# -------------------------------------------------------------------------------------- the model
class HeadModel:
    """A fitted head plus its scaler and the store/backbone it expects; turns vectors (or images,
    through the same frozen backbone) into KL probabilities."""

    def __init__(self, ckpt: dict, run_dir: str | Path | None = None, config: dict | None = None,
                 device: str | None = None):
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise RunError(f"{run_dir}: checkpoint.pt is not a klgrade head checkpoint")
        self.ckpt, self.run_dir, self.config = ckpt, run_dir, config or {}
        self.head = ckpt["head"]
        self.store = dict(ckpt["store"])
        self.mean = ckpt["scaler_mean"].numpy().astype(np.float32)
        self.scale = ckpt["scaler_scale"].numpy().astype(np.float32)
        self._device = device
        self._embedder = None
        self._net = None
        self._booster = None
        if self.head == "mlp":
            self._net = MLPHead(len(self.mean), tuple(ckpt["hidden"]), float(ckpt["dropout"]))
            self._net.load_state_dict(ckpt["state_dict"])
            self._net.eval()

    @property
    def backbone(self) -> str:
        return self.store["backbone"]

    @property
    def input_size(self) -> int:
        """Side of the uint8 square view (klgrade.view.entrance.square_view) the backbone takes."""
        return int(self.store["preprocessing"]["input_size"])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, dim) raw embeddings -> (N, 5) probabilities."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != len(self.mean):
            raise ValueError(f"head expects (N, {len(self.mean)}) vectors, got {X.shape}")
        Z = (X - self.mean) / self.scale
        if self.head == "mlp":
            with torch.inference_mode():
                return torch.softmax(self._net(torch.from_numpy(Z)), 1).numpy().astype(np.float64)
        if self.head == "linear":
            logits = Z @ self.ckpt["coef"].numpy().T + self.ckpt["intercept"].numpy()
            return _softmax(logits.astype(np.float64))
        if self.head == "xgboost":
            xgb = _import_xgboost()
            if self._booster is None:
                self._booster = xgb.Booster()
                self._booster.load_model(bytearray(self.ckpt["booster"].numpy().tobytes()))
            p = self._booster.predict(xgb.DMatrix(Z), iteration_range=(0, int(self.ckpt["best_iteration"]) + 1))
            return _expand(p.reshape(len(Z), -1), self.ckpt["classes"].numpy())
        raise RunError(f"{self.run_dir}: unknown head '{self.head}'")

    def embedder(self, device: str | None = None):
        """The frozen backbone that made the training vectors, rebuilt and verified by fingerprint."""
        if self._embedder is None:
            from klgrade.embed.embedders import build_embedder

            s = self.store
            emb = build_embedder(s["backbone"], weights=s.get("weights", "auto"), features=s["features"],
                                 device=device or self._device, seed=int(s.get("seed", 0)))
            if emb.fingerprint != s["weights_fingerprint"]:
                raise RunError(f"{self.run_dir}: the {s['backbone']} weights found now ({emb.weights_source}, sha1 "
                               f"{emb.fingerprint[:12]}) differ from those the head was trained on "
                               f"({s.get('weights_source')}, sha1 {s['weights_fingerprint'][:12]})")
            self._embedder = emb
        return self._embedder

    def predict_views(self, views: np.ndarray, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """uint8 (N, S, S) square views (S = ``input_size``) -> (N, 5) probabilities."""
        views = np.asarray(views)
        if views.ndim == 2:
            views = views[None]
        return self.predict_proba(self.embedder().embed_views(views, batch_size=batch_size, progress=progress))

    def predict_paths(self, paths, batch_size: int = 32) -> np.ndarray:
        """Image files -> (N, 5) probabilities (views made by klgrade.view.entrance.load_view)."""
        from klgrade.view.entrance import load_view

        return self.predict_views(np.stack([load_view(p, self.input_size) for p in paths]), batch_size)


def load_head_run(run_dir: str | Path, device: str | None = None) -> HeadModel:
    """Load a head run (config.yaml with ``kind: head`` + checkpoint.pt) for prediction."""
    from klgrade.rundir import read_config

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if config.get("kind") != "head":
        raise RunError(f"{run_dir}: not an embedding-head run (kind: {config.get('kind')!r})")
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise RunError(f"{run_dir}: no checkpoint.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file is reported, whatever the cause
        raise RunError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from e
    return HeadModel(ckpt, run_dir, config, device=device)


def predict_views(run: str | Path | HeadModel, views: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Grade uint8 square views with a head run (path or loaded model): (N, 5) probabilities."""
    model = run if isinstance(run, HeadModel) else load_head_run(run)
    return model.predict_views(views, batch_size=batch_size)


# ------------------------------------------------------------------------------------------ fit run
def fit_head(embeddings: str | Path, data: str | Path, out: str | Path, cfg: HeadConfig | None = None,
             name: str | None = None, overwrite: bool = False) -> dict:
    """Fit a head on store ``embeddings`` with the labels/splits of dataset ``data``; write run ``out``.

    Returns {split: metrics} for the splits predicted (val, and test when the manifest has one).
    """
    from klgrade.embed.store import open_store
    from klgrade.ingest.manifest import read_manifest
    from klgrade.ingest.splits import holdout_split

    cfg = cfg or HeadConfig()
    if cfg.head not in HEADS:
        raise RunError(f"unknown head '{cfg.head}' (choose from {', '.join(HEADS)})")
    if cfg.head == "xgboost":
        _import_xgboost()  # fail before any work
    out = Path(out)
    if (out / "config.yaml").exists() and not overwrite:
        raise RunError(f"{out}: already holds a run; choose another --out (or --overwrite)")
    store = open_store(embeddings)
    df = read_manifest(data)
    root = df.attrs["root"]
    df = df[df["split"] != ""].copy()
    val_source = "manifest"
    if not (df["split"] == "val").any():
        df = holdout_split(df, cfg.val_fraction, seed=cfg.seed)
        val_source = f"holdout {cfg.val_fraction:g} of train (patient-level, seed {cfg.seed})"
    parts = {s: df[df["split"] == s].copy() for s in ("train", "val", "test")}
    for p in parts.values():
        p.attrs["root"] = root
    if parts["train"].empty or parts["val"].empty:
        raise RunError(f"{data}: need train and val images (train {len(parts['train'])}, val {len(parts['val'])})")
    X = {s: store.vectors_for(p, data) for s, p in parts.items() if len(p)}
    y = {s: p["klg"].to_numpy(dtype=np.int64) for s, p in parts.items() if len(p)}
    mean = X["train"].mean(0)
    scale = X["train"].std(0)
    scale[scale < 1e-6] = 1.0  # constant features stay 0 instead of blowing up
    Z = {s: ((x - mean) / scale).astype(np.float32) for s, x in X.items()}
    t0 = time.perf_counter()
    fitter = {"mlp": _fit_mlp, "linear": _fit_linear, "xgboost": _fit_xgboost}[cfg.head]
    head_ckpt, history = fitter(cfg, Z["train"], y["train"], Z["val"], y["val"])
    fit_seconds = time.perf_counter() - t0
    meta = store.meta
    ckpt = {"format": CHECKPOINT_FORMAT, "version": 1, "head": cfg.head,
            "store": {k: meta.get(k) for k in STORE_FIELDS},
            "scaler_mean": torch.from_numpy(mean.astype(np.float32)),
            "scaler_scale": torch.from_numpy(scale.astype(np.float32)), **head_ckpt}
    model = HeadModel(ckpt, out)
    config = {
        "kind": "head", "name": name or out.name, "head": cfg.head, "backbone": meta["backbone"],
        "features": meta["features"], "dim": int(meta["dim"]), "weights": meta.get("weights"),
        "weights_source": meta.get("weights_source"), "weights_fingerprint": meta["weights_fingerprint"],
        "embeddings": str(Path(embeddings).resolve()), "data": str(Path(data).resolve()), "seed": cfg.seed,
        "val_source": val_source, "n_images": {s: int(len(p)) for s, p in parts.items()},
        "head_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "fit_seconds": round(fit_seconds, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    io.write_yaml(out / "config.yaml", config)
    io.torch_save(out / "checkpoint.pt", ckpt)
    io.write_csv(out / "history.csv", history, float_format="%.6f")
    results = {}
    for s in ("val", "test"):
        if s in X:
            results[s] = write_predictions(out, s, parts[s], model.predict_proba(X[s]))
    log.info("%s head on %s: fitted in %.1f s; %s", cfg.head, meta["backbone"], fit_seconds,
             ", ".join(f"{s} QWK {m['qwk']:.3f}" for s, m in results.items()))
    return results


# ------------------------------------------------------------------------------------------ evaluate
def evaluate_head_run(run_dir: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
                      batch_size: int = 32, device: str | None = None, store: str | Path | None = None,
                      workers: int = 0) -> dict:
    """Predict ``split`` of dataset ``data`` with head run ``run_dir``; write predictions_/metrics_<split>
    into ``out`` (default: the run dir) and return the metrics.

    Vectors come from the run's own store when it holds these very images; otherwise the images are
    embedded through the same frozen backbone into ``store`` (default ``<out>/embeddings``),
    incrementally, so a second evaluation does no forward pass.
    """
    from klgrade.embed.store import EmbeddingStore, StoreError, embed_dataset
    from klgrade.ingest.manifest import read_manifest, select_split

    model = load_head_run(run_dir, device=device)
    dest = Path(out) if out else Path(run_dir)
    df = select_split(read_manifest(data), split)
    X = None
    own = model.config.get("embeddings")
    if own and EmbeddingStore.exists(own):
        try:
            s = EmbeddingStore.open(own)
            if s.meta.get("weights_fingerprint") == model.store["weights_fingerprint"] and \
                    s.meta.get("preprocessing") == model.store["preprocessing"]:
                X = s.vectors_for(df, data)
        except StoreError as e:
            log.info("run store not usable for %s (%s); embedding", data, str(e).split(";")[0])
    if X is None:
        target = Path(store) if store else dest / "embeddings"
        emb_store = embed_dataset(data, model.backbone, target, split=split, batch_size=batch_size,
                                  embedder=model.embedder(device), workers=workers)
        X = emb_store.vectors_for(df, data)
    return write_predictions(dest, split, df, model.predict_proba(X))

