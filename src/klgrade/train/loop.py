"""Training loop for end-to-end CNNs: one process, or DistributedDataParallel under torchrun.

- AdamW (no weight decay on norms/biases, via timm) with linear warm-up and cosine decay, stepped
  per batch; class-weighted ordinal loss by default (klgrade.train.losses).
- Mixed precision (bf16, or fp16 + GradScaler) and channels-last on GPU and on CPUs with native
  bf16 (AMX / AVX512-BF16: 2-3x faster there); fp32 on other CPUs.
- Every epoch: validation QWK; ``checkpoint.pt`` when it improves; ``history.csv``; ``last.pt``
  (model, optimizer, scheduler, scaler, RNG states, epoch, best) for resume. All writes atomic.
- Exact resume: each epoch's randomness (sample order, augmentation, dropout) is seeded from
  (seed, epoch, rank) alone, so a run killed at any point and resumed from last.pt ends with the
  same weights and metrics (CPU) as one never interrupted.
- DDP: gloo on CPU, nccl on GPU; DistributedSampler shards the data; rank 0 alone validates and
  writes, the others wait at a barrier.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import klgrade
from klgrade import io
from klgrade.augment.augment import Augment
from klgrade.config import TrainConfig, save_config
from klgrade.grades import N_GRADES
from klgrade.rundir import RunError, write_predictions
from klgrade.runs.cnn import predict_batches
from klgrade.runs.device import choose_layout, resolve_device
from klgrade.view.batches import ViewBatches, make_loader, normalize, set_epoch

log = logging.getLogger(__name__)

CONFIG_NAME, BEST_NAME, LAST_NAME, HISTORY_NAME = "config.yaml", "checkpoint.pt", "last.pt", "history.csv"
RESOLVED_KEY = "resolved"  # facts found while running (arch, mean/std, split sizes), not settings


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun describes in the environment (no-op when launched alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    d = Dist(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if not torch.distributed.is_initialized():
        use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return d


def _device(cfg: TrainConfig, dist: Dist) -> torch.device:
    dev = resolve_device(cfg.device)
    if dev.type == "cuda" and dist.enabled:
        dev = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(dev)
    return dev


# ----------------------------------------------------------------------------- data
@dataclass
class SplitData:
    df: pd.DataFrame  # manifest rows in use (train/val/test), after any hold-out
    views: np.ndarray  # (N,S,S) uint8 memmap, row-aligned with df
    rows: dict[str, np.ndarray]  # split -> row positions in df/views
    val_source: str


def load_data(cfg: TrainConfig, img_size: int, dist: Dist) -> SplitData:
    from klgrade.ingest.manifest import (
        ManifestError,
        check_no_leakage,
        image_paths,
        image_sides,
        read_manifest,
    )
    from klgrade.ingest.splits import holdout_split
    from klgrade.view.cache import cached_views

    df = read_manifest(cfg.data)  # validates and refuses patient leakage across splits
    root = df.attrs["root"]
    if not (df["split"] == "train").any():
        raise ManifestError(f"{cfg.data}: no rows in split 'train' (run `klgrade split {cfg.data}`)")
    val_source = "manifest"
    if not (df["split"] == "val").any():
        # Keep the dataset's own val/test for reporting: select on a patient-level hold-out of train.
        df = holdout_split(df, cfg.val_fraction, seed=cfg.seed)
        check_no_leakage(df, where=f"{cfg.data} (after hold-out)")
        val_source = f"holdout:{cfg.val_fraction}"
        if not (df["split"] == "val").any():
            raise ManifestError(f"{cfg.data}: too few training patients to hold out a val split")
    df = df[df["split"].isin(["train", "val", "test"])].reset_index(drop=True)
    df.attrs["root"] = root
    paths = image_paths(df)
    # Rank 0 decodes; the others then open the finished cache instead of decoding it again.
    if dist.is_main:
        views = cached_views(paths, img_size, cfg.cache_dir, progress=True, sides=image_sides(df))
    dist.barrier()
    if not dist.is_main:
        views = cached_views(paths, img_size, cfg.cache_dir, progress=False, sides=image_sides(df))
    rows = {s: np.flatnonzero(df["split"].to_numpy() == s) for s in ("train", "val", "test")}
    return SplitData(df=df, views=views, rows=rows, val_source=val_source)


# ----------------------------------------------------------------------------- helpers
def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return factor


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + 17) % (2**63 - 1)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def recorded_layout(out: Path, device: str | None) -> dict | None:
    """The run's resolved facts (precision/layout among them) when it resumes on the same device."""
    from klgrade.rundir import read_config

    resolved = read_config(out).get(RESOLVED_KEY) or {}
    return resolved if device is None or str(device) == resolved.get("device") else None


def restore_last(out: Path, model, optimizer, scheduler, scaler) -> dict | None:
    """Restore model, optimizer, scheduler, scaler and RNG states from ``out/last.pt``; returns the
    checkpoint (for the run's own counters), or None when there is none yet."""
    from klgrade.rundir import read_checkpoint

    path = out / LAST_NAME
    if not path.is_file():
        log.warning("%s: no last.pt yet; starting from epoch 0", out)
        return None
    ck = read_checkpoint(path, map_location="cpu")
    unwrap(model).load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    scaler.load_state_dict(ck["scaler"])
    set_rng_state(ck["rng"])
    return ck


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """One training run. ``Trainer(cfg, out_dir).fit()``; ``Trainer.resume(out_dir).fit()``."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, resuming: bool = False,
                 recorded: dict | None = None):
        from klgrade.models.cnn import build_model
        from klgrade.train.losses import make_loss

        cfg.validate()
        if not cfg.data:
            raise RunError("no dataset given (--data DIR)")
        # Absolute paths: the run must stay usable from any working directory.
        cfg.data = str(Path(cfg.data).expanduser().resolve())
        if cfg.cache_dir:
            cfg.cache_dir = str(Path(cfg.cache_dir).expanduser().resolve())
        self.cfg, self.out, self.resuming = cfg, Path(out_dir), resuming
        self.dist = init_distributed(cfg.device)
        self.device = _device(cfg, self.dist)
        if self.dist.is_main and not resuming and (self.out / CONFIG_NAME).exists():
            raise RunError(f"{self.out}: already holds a run; continue it with `klgrade train --resume "
                           f"{self.out}` or choose another --out")
        seed_everything(cfg.seed)
        built = build_model(cfg.model, cfg.weights, drop_rate=cfg.drop_rate,
                            drop_path_rate=cfg.drop_path_rate)
        self.built = built
        cfg.img_size = int(cfg.img_size or built.input_size)
        self.data = load_data(cfg, cfg.img_size, self.dist)
        self.train_labels = self.data.df["klg"].to_numpy()[self.data.rows["train"]]

        self.model = self._place(built.model, recorded)
        self._make_loaders()
        self._make_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.loss_fn = make_loss(cfg, self.train_labels).to(self.device)
        self.augment = Augment(cfg.augment)
        self.epoch = 0  # epochs completed
        self.best_qwk, self.best_epoch, self.since_best = -math.inf, 0, 0
        self.history: list[dict] = []

    def _place(self, model: torch.nn.Module, recorded: dict | None) -> torch.nn.Module:
        """The model on the device in the precision and memory layout picked for it (recorded: a
        resumed run's own pick), DDP-wrapped when distributed."""
        cfg, cuda = self.cfg, self.device.type == "cuda"
        model = model.to(self.device)
        self.amp_dtype, self.channels_last = choose_layout(
            self.device, model, self.built.arch, cfg.img_size, cfg.batch_size, train=True, amp=cfg.amp,
            channels_last=cfg.channels_last, cache_dir=cfg.cache_dir, recorded=recorded)
        # Validation and the final predictions use the layout inference picks (load_cnn_run), so
        # `klgrade evaluate` later reproduces the run's own predictions on this machine exactly.
        self.eval_amp_dtype, self.eval_channels_last = choose_layout(
            self.device, model, self.built.arch, cfg.img_size, cfg.eval_batch_size, train=False, amp=cfg.amp,
            channels_last=cfg.channels_last, cache_dir=cfg.cache_dir)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.dist.enabled:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if cuda else None)
        return model

    def _make_loaders(self) -> None:
        cfg, d, cuda = self.cfg, self.data, self.device.type == "cuda"
        train_ds = ViewBatches(d.views, d.rows["train"], self.train_labels)
        self.train_loader = make_loader(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                        drop_last=True, workers=cfg.workers, rank=self.dist.rank,
                                        world_size=self.dist.world_size, pin_memory=cuda)
        if len(self.train_loader) == 0:
            raise RunError(f"{cfg.data}: no training batches (train split has {len(train_ds)} images)")
        self.eval_loaders = {
            s: make_loader(ViewBatches(d.views, d.rows[s], d.df["klg"].to_numpy()[d.rows[s]]),
                           cfg.eval_batch_size, shuffle=False, workers=cfg.workers, pin_memory=cuda)
            for s in ("val", "test") if len(d.rows[s])
        }

    def _make_optimizer(self) -> None:
        """AdamW (layer-wise LR decay when asked) with warm-up + cosine decay per step."""
        import timm.optim

        cfg = self.cfg
        self.optimizer = timm.optim.create_optimizer_v2(
            unwrap(self.model), "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
            layer_decay=cfg.layer_decay if cfg.layer_decay < 1 else None)
        for group in self.optimizer.param_groups:  # timm leaves lr_scale to its own schedulers
            group["lr"] = cfg.lr * group.get("lr_scale", 1.0)
        steps = len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(steps * cfg.epochs, max(1, round(steps * cfg.warmup_epochs)),
                                          cfg.min_lr_ratio))

    # -- construction from a run dir
    @classmethod
    def resume(cls, out_dir: str | Path, device: str | None = None, workers: int | None = None) -> Trainer:
        from klgrade.config import apply_overrides, from_dict
        from klgrade.rundir import read_config

        out = Path(out_dir)
        raw = read_config(out)
        raw.pop(RESOLVED_KEY, None)
        cfg = from_dict(TrainConfig, raw, where=str(out / CONFIG_NAME))
        cfg = apply_overrides(cfg, {"device": device, "workers": workers})
        trainer = cls(cfg, out, resuming=True, recorded=recorded_layout(out, device))
        trainer.load_last()
        return trainer

    def load_last(self) -> None:
        ck = restore_last(self.out, self.model, self.optimizer, self.scheduler, self.scaler)
        if ck is None:
            return
        self.epoch = int(ck["epoch"])
        self.best_qwk, self.best_epoch = float(ck["best_qwk"]), int(ck["best_epoch"])
        self.since_best = int(ck["since_best"])
        self.history = list(ck["history"])
        if self.dist.is_main:
            log.info("resuming %s after epoch %d (best val QWK %.4f at epoch %d)", self.out, self.epoch,
                     self.best_qwk, self.best_epoch)

    # -- files
    def _resolved(self) -> dict:
        d = self.data
        return {RESOLVED_KEY: {
            "arch": self.built.arch, "mean": list(self.built.mean), "std": list(self.built.std),
            "weights_source": dict(self.built.weights_source),
            "val_source": d.val_source, "world_size": self.dist.world_size, "device": str(self.device),
            "amp_dtype": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
            "channels_last": self.channels_last,
            "eval_amp_dtype": str(self.eval_amp_dtype).replace("torch.", "") if self.eval_amp_dtype else "fp32",
            "eval_channels_last": self.eval_channels_last,
            "n_images": {s: int(len(r)) for s, r in d.rows.items()},
            "klgrade_version": str(klgrade.__version__), "torch_version": str(torch.__version__),
        }}

    def _model_payload(self) -> dict:
        return {"model": unwrap(self.model).state_dict(), "model_name": self.cfg.model,
                "arch": self.built.arch, "num_classes": N_GRADES, "img_size": self.cfg.img_size,
                "mean": list(self.built.mean), "std": list(self.built.std)}

    def _save_last(self) -> None:
        io.torch_save(self.out / LAST_NAME, {
            **self._model_payload(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": rng_state(), "epoch": self.epoch, "best_qwk": self.best_qwk,
            "best_epoch": self.best_epoch, "since_best": self.since_best, "history": self.history,
        })

    # -- one epoch
    def _prepare(self, views: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = views.to(self.device, non_blocking=True).unsqueeze(1).float().div_(255.0)
        x = self.augment(x, gen)
        return normalize(x, self.built.mean, self.built.std, self.channels_last)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = self.loss_fn(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def train_epoch(self, epoch: int, max_steps: int | None = None) -> float:
        s = epoch_seed(self.cfg.seed, epoch, self.dist.rank)
        torch.manual_seed(s)  # dropout / drop-path draw from the global generator
        gen = torch.Generator().manual_seed(s)
        set_epoch(self.train_loader, epoch)
        self.model.train()
        total = torch.zeros(2, device=self.device)
        bar = tqdm(self.train_loader, disable=not self.dist.is_main, unit="batch", leave=False,
                   desc=f"epoch {epoch + 1}/{self.cfg.epochs}")
        for i, (views, y, _) in enumerate(bar):
            if max_steps is not None and i >= max_steps:
                break
            y = y.to(self.device, non_blocking=True)
            loss = self.train_step(self._prepare(views, gen), y)
            total[0] += loss.float() * len(y)  # stays on the device: no per-step sync
            total[1] += len(y)
            if i % 25 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}")
        if self.dist.enabled:
            torch.distributed.all_reduce(total)
        return float(total[0] / total[1].clamp_min(1))

    def predict(self, split: str, tta: str = "none", progress: bool = False) -> np.ndarray:
        model = unwrap(self.model)
        fmt = {True: torch.channels_last, False: torch.contiguous_format}
        if self.eval_channels_last != self.channels_last:
            model.to(memory_format=fmt[self.eval_channels_last])
        try:
            return predict_batches(model, self.eval_loaders[split], self.built.mean, self.built.std,
                                   self.device, tta, self.eval_amp_dtype, self.eval_channels_last,
                                   n=len(self.data.rows[split]), progress=progress, desc=f"predict {split}")
        finally:
            if self.eval_channels_last != self.channels_last:
                model.to(memory_format=fmt[self.channels_last])

    def _labels(self, split: str) -> np.ndarray:
        return self.data.df["klg"].to_numpy()[self.data.rows[split]]

    def validate(self) -> dict:
        from klgrade.evaluate.metrics import compute_metrics

        probs = self.predict("val")
        y = self._labels("val")
        m = compute_metrics(y, probs.argmax(1), probs)
        with torch.no_grad():
            val_loss = float(self.loss_fn(torch.from_numpy(np.log(np.clip(probs, 1e-12, 1))).float()
                                          .to(self.device), torch.from_numpy(y).to(self.device)))
        return {"val_loss": val_loss, "val_qwk": m["qwk"], "val_accuracy": m["accuracy"],
                "val_adjacent_accuracy": m["adjacent_accuracy"], "val_macro_f1": m["macro_f1"]}

    # -- the run
    def fit(self) -> dict:
        cfg, dist = self.cfg, self.dist
        try:
            if dist.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                save_config(cfg, self.out / CONFIG_NAME, extra=self._resolved())
                n = {s: len(r) for s, r in self.data.rows.items()}
                log.info("training %s (%s) at %d px on %s: train %d, val %d (%s), test %d images",
                         cfg.model, self.built.arch, cfg.img_size, self.device, n["train"], n["val"],
                         self.data.val_source, n["test"])
            stop = False
            while self.epoch < cfg.epochs and not stop:
                t0 = time.time()
                train_loss = self.train_epoch(self.epoch)
                self.epoch += 1
                if dist.is_main:
                    row = {"epoch": self.epoch, "lr": max(g["lr"] for g in self.optimizer.param_groups),
                           "train_loss": train_loss, **self.validate()}
                    improved = row["val_qwk"] > self.best_qwk
                    if improved:
                        self.best_qwk, self.best_epoch, self.since_best = row["val_qwk"], self.epoch, 0
                        io.torch_save(self.out / BEST_NAME, {**self._model_payload(), "epoch": self.epoch,
                                                             "val_qwk": self.best_qwk})
                    else:
                        self.since_best += 1
                    row.update(best=improved, seconds=round(time.time() - t0, 2))
                    self.history.append(row)
                    io.write_csv(self.out / HISTORY_NAME, pd.DataFrame(self.history), float_format="%.6g")
                    self._save_last()
                    tqdm.write(f"epoch {self.epoch}/{cfg.epochs}  loss {train_loss:.4f}  "
                               f"val QWK {row['val_qwk']:.4f}  acc {row['val_accuracy']:.3f}"
                               f"{'  *best*' if improved else ''}  ({row['seconds']:.0f}s)")
                    stop = bool(cfg.patience and self.since_best >= cfg.patience)
                stop = dist.broadcast(stop)
                dist.barrier()
            results = self.finish() if dist.is_main else {}
            dist.barrier()
            return results
        finally:
            if dist.enabled and torch.distributed.is_initialized():
                # DDP's reducer holds the gloo group: drop the wrapper first so the group's threads are
                # joined here, not at interpreter shutdown (a rare "terminate called" abort at exit)
                self.model = unwrap(self.model)
                gc.collect()
                torch.distributed.destroy_process_group()

    def finish(self) -> dict:
        """Reload the best checkpoint and write predictions/metrics for val (and test)."""
        from klgrade.rundir import read_checkpoint

        ck = read_checkpoint(self.out / BEST_NAME, map_location=self.device)
        unwrap(self.model).load_state_dict(ck["model"])
        results = {}
        for split in self.eval_loaders:
            probs = self.predict(split, tta=self.cfg.tta, progress=True)
            meta = self.data.df.iloc[self.data.rows[split]]
            results[split] = write_predictions(self.out, split, meta, probs,
                                               extra_metrics={"best_epoch": self.best_epoch,
                                                              "tta": self.cfg.tta})
            m = results[split]
            print(f"{split}: QWK {m['qwk']:.4f}  adjacent {m['adjacent_accuracy']:.4f}  "
                  f"accuracy {m['accuracy']:.4f}  F1 per grade {[round(f, 3) for f in m['f1']]}")
        return results


def train(cfg: TrainConfig, out_dir: str | Path) -> dict:
    return Trainer(cfg, out_dir).fit()


def resume(out_dir: str | Path, device: str | None = None, workers: int | None = None) -> dict:
    return Trainer.resume(out_dir, device=device, workers=workers).fit()
