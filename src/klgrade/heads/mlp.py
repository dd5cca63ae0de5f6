"""The ``mlp`` head: the study's "custom neural network" (two hidden layers with dropout, a
class-balanced cross-entropy, AdamW, early stopping on validation QWK, best epoch kept)."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from klgrade.evaluate.metrics import N_GRADES, qwk
from klgrade.heads.base import Head, HeadConfig, class_weights, log_loss, register_head


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


def fit_mlp(cfg: HeadConfig, Xtr, ytr, Xva, yva):
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
        val_qwk, val_loss = qwk(yva, pv.argmax(1)), log_loss(yva, pv)
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


def mlp_net(state: dict) -> MLPHead:
    net = MLPHead(state["state_dict"]["net.0.weight"].shape[1], tuple(state["hidden"]), float(state["dropout"]))
    net.load_state_dict(state["state_dict"])
    return net.eval()


@register_head("mlp")
class Mlp(Head):
    fit = staticmethod(fit_mlp)

    @staticmethod
    def predict_proba(state: dict, Z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(mlp_net(state)(torch.from_numpy(Z)), 1).numpy().astype(np.float64)

    @staticmethod
    def torch_layers(state: dict):
        return mlp_net(state)
