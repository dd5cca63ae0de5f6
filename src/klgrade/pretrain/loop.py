"""The pretraining loop: one process, or DDP under torchrun (gloo on CPU, nccl on GPU).

Built from klgrade.train.loop's pieces (distributed setup, per-epoch seeding, RNG state, warm-up +
cosine schedule) so a pretrain run behaves like a CNN run: exact resume from last.pt after a
SIGKILL (each epoch's sample order and augmentation come from (seed, epoch, rank) alone), bf16
autocast + channels-last where klgrade.runs.cnn says they pay, atomic writes, tqdm.

Run dir: config.yaml (kind: pretrain, resolved: images by fingerprint, init weights source),
checkpoint.pt (the encoder after the latest epoch, no classifier), last.pt (everything for resume),
history.csv (epoch, lr, ssl_loss, rankme[, knn_qwk], seconds; epoch 0 = before training).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

import klgrade
from klgrade import io
from klgrade.config import save_config
from klgrade.pretrain.augment import SSLAugment
from klgrade.pretrain.config import PretrainConfig, load_pretrain_config
from klgrade.rundir import RunError
from klgrade.runs.device import choose_layout
from klgrade.train.loop import (
    _device,
    epoch_seed,
    init_distributed,
    recorded_layout,
    restore_last,
    rng_state,
    seed_everything,
    unwrap,
    warmup_cosine,
)
from klgrade.view.batches import ViewBatches, make_loader, normalize, set_epoch

log = logging.getLogger(__name__)

CONFIG_NAME, BEST_NAME, LAST_NAME, HISTORY_NAME = "config.yaml", "checkpoint.pt", "last.pt", "history.csv"


class Pretrainer:
    """``Pretrainer(cfg, out).fit()``; ``Pretrainer.resume(out).fit()``."""

    def __init__(self, cfg: PretrainConfig, out_dir: str | Path, resuming: bool = False,
                 recorded: dict | None = None):
        from klgrade.models.cnn import build_model
        from klgrade.pretrain.data import load_pretrain_data
        from klgrade.pretrain.methods import SSLModel

        cfg.validate()
        # absolute paths: the run stays usable (and resumable) from any working directory
        cfg.data = [str(Path(d).expanduser().resolve()) for d in cfg.data]
        if cfg.init not in ("imagenet", "none"):
            cfg.init = str(Path(cfg.init).expanduser().resolve())
        if cfg.cache_dir:
            cfg.cache_dir = str(Path(cfg.cache_dir).expanduser().resolve())
        self.cfg, self.out, self.resuming = cfg, Path(out_dir), resuming
        self.dist = init_distributed(cfg.device)
        self.device = _device(cfg, self.dist)  # reads cfg.device only
        if self.dist.is_main and not resuming and (self.out / CONFIG_NAME).exists():
            raise RunError(f"{self.out}: already holds a run; continue it with `klgrade pretrain --resume "
                           f"{self.out}` or choose another --out")
        seed_everything(cfg.seed)
        self.data = load_pretrain_data(cfg, self.dist)  # first: no images is the cheapest error
        self.built = build_model(cfg.model, cfg.init_weights, num_classes=0)
        ssl = SSLModel(self.built.model, int(self.built.model.num_features), cfg, self.dist.enabled)
        ssl = ssl.to(self.device)
        self.amp_dtype, self.channels_last = choose_layout(
            self.device, self.built.model, self.built.arch, cfg.img_size, cfg.batch_size, train=True,
            amp=cfg.amp, channels_last=cfg.channels_last, cache_dir=cfg.cache_dir, recorded=recorded)
        if self.channels_last:
            ssl = ssl.to(memory_format=torch.channels_last)
        self.model = ssl
        if self.dist.enabled:
            self.model = torch.nn.parallel.DistributedDataParallel(
                ssl, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        rows = range(len(self.data.df))
        self.loader = make_loader(ViewBatches(self.data.views, rows), cfg.batch_size, shuffle=True, seed=cfg.seed,
                                  drop_last=True, workers=cfg.workers, rank=self.dist.rank,
                                  world_size=self.dist.world_size, pin_memory=self.device.type == "cuda")
        self.steps = len(self.loader)
        if self.steps == 0 or len(self.data.df) < 2:
            raise RunError(f"{len(self.data.df)} image(s) to pretrain on: too few for a batch of pairs")
        import timm.optim

        self.optimizer = timm.optim.create_optimizer_v2(ssl, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(
            self.steps * cfg.epochs, max(1, round(self.steps * cfg.warmup_epochs)), cfg.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.augment = SSLAugment(cfg.augment)
        self.epoch = 0
        self.history: list[dict] = []

    @classmethod
    def resume(cls, out_dir: str | Path, device: str | None = None, workers: int | None = None) -> Pretrainer:
        from klgrade.config import apply_overrides

        out = Path(out_dir)
        if not (out / CONFIG_NAME).is_file():
            raise RunError(f"{out}: not a klgrade run (no config.yaml)")
        cfg = apply_overrides(load_pretrain_config(out / CONFIG_NAME), {"device": device, "workers": workers})
        trainer = cls(cfg, out, resuming=True, recorded=recorded_layout(out, device))
        trainer.load_last()
        return trainer

    def load_last(self) -> None:
        ck = restore_last(self.out, self.model, self.optimizer, self.scheduler, self.scaler)
        if ck is None:
            return
        self.epoch, self.history = int(ck["epoch"]), list(ck["history"])
        if self.dist.is_main:
            log.info("resuming %s after epoch %d", self.out, self.epoch)

    # -- files
    def _resolved(self) -> dict:
        d = self.data
        return {"resolved": {
            "arch": self.built.arch, "mean": list(self.built.mean), "std": list(self.built.std),
            "init_weights": self.cfg.init_weights, "weights_source": dict(self.built.weights_source),
            "images": d.fingerprints, "n_images": int(len(d.df)), "world_size": self.dist.world_size,
            "device": str(self.device), "channels_last": self.channels_last,
            "amp_dtype": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
            "klgrade_version": str(klgrade.__version__), "torch_version": str(torch.__version__),
        }}

    def _encoder_payload(self) -> dict:
        cfg = self.cfg
        return {"model": unwrap(self.model).encoder().state_dict(), "model_name": cfg.model,
                "arch": self.built.arch, "num_classes": 0, "img_size": cfg.img_size,
                "mean": list(self.built.mean), "std": list(self.built.std), "method": cfg.method,
                "epoch": self.epoch, "kind": "pretrain"}

    def _save(self) -> None:
        io.torch_save(self.out / BEST_NAME, self._encoder_payload())
        io.torch_save(self.out / LAST_NAME, {
            "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
            "epoch": self.epoch, "history": self.history})
        io.write_csv(self.out / HISTORY_NAME, pd.DataFrame(self.history), float_format="%.6g")

    # -- training
    def _views(self, views: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = views.to(self.device, non_blocking=True).unsqueeze(1).float().div_(255.0)
        m, s = self.built.mean, self.built.std
        return tuple(normalize(v, m, s, self.channels_last) for v in self.augment(x, gen))

    def train_step(self, v1: torch.Tensor, v2: torch.Tensor, step: int) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = self.model(v1, v2, self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        unwrap(self.model).after_backward(self.epoch)
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        unwrap(self.model).update_teacher(step + 1, self.steps * self.cfg.epochs)
        return loss.detach()

    def train_epoch(self) -> float:
        s = epoch_seed(self.cfg.seed, self.epoch, self.dist.rank)
        torch.manual_seed(s)
        gen = torch.Generator().manual_seed(s)
        set_epoch(self.loader, self.epoch)
        self.model.train()
        total = torch.zeros(2, device=self.device)
        bar = tqdm(self.loader, disable=not self.dist.is_main, unit="batch", leave=False,
                   desc=f"pretrain {self.cfg.method} epoch {self.epoch + 1}/{self.cfg.epochs}")
        for i, (views, _, _) in enumerate(bar):
            loss = self.train_step(*self._views(views, gen), self.epoch * self.steps + i)
            total[0] += loss.float() * len(views)
            total[1] += len(views)
            if i % 10 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}")
        if self.dist.enabled:
            torch.distributed.all_reduce(total)
        return float(total[0] / total[1].clamp_min(1))

    def measure(self) -> dict:
        enc = unwrap(self.model).encoder()
        return self.data.monitor.measure(enc, self.built.mean, self.built.std, self.device, self.amp_dtype,
                                         self.channels_last)

    def _log_row(self, row: dict) -> None:
        knn = f"  kNN QWK {row['knn_qwk']:.3f}" if "knn_qwk" in row else ""
        loss = "" if math.isnan(row["ssl_loss"]) else f"  loss {row['ssl_loss']:.4f}"
        tqdm.write(f"epoch {row['epoch']}/{self.cfg.epochs}{loss}  RankMe {row['rankme']:.1f}{knn}"
                   f"  ({row['seconds']:.0f}s)")

    def fit(self) -> list[dict]:
        cfg, dist = self.cfg, self.dist
        try:
            if dist.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                save_config(cfg, self.out / CONFIG_NAME, extra=self._resolved())
                log.info("pretraining %s (%s, init %s) with %s on %d images at %d px on %s", cfg.model,
                         self.built.arch, cfg.init, cfg.method, len(self.data.df), cfg.img_size, self.device)
                if not self.history:  # epoch 0: where the rank starts
                    t0 = time.time()
                    row = {"epoch": 0, "lr": 0.0, "ssl_loss": float("nan"), **self.measure()}
                    self.history.append({**row, "seconds": round(time.time() - t0, 2)})
                    self._log_row(self.history[-1])
            while self.epoch < cfg.epochs:
                t0 = time.time()
                loss = self.train_epoch()
                self.epoch += 1
                if dist.is_main:
                    row = {"epoch": self.epoch, "lr": max(g["lr"] for g in self.optimizer.param_groups),
                           "ssl_loss": loss, **self.measure(), "seconds": round(time.time() - t0, 2)}
                    self.history.append(row)
                    self._save()
                    self._log_row(row)
                dist.barrier()
            return self.history
        finally:
            if dist.enabled and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def pretrain(cfg: PretrainConfig, out_dir: str | Path) -> list[dict]:
    return Pretrainer(cfg, out_dir).fit()


def resume(out_dir: str | Path, device: str | None = None, workers: int | None = None) -> list[dict]:
    return Pretrainer.resume(out_dir, device=device, workers=workers).fit()
