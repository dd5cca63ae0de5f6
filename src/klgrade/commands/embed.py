"""`klgrade embed`: embed a dataset's knees with a frozen foundation-model image tower into a store.

    klgrade embed --data DATA --backbone biomedclip --out emb/biomedclip
    klgrade embed --data DATA --backbone biomedclip --out emb/bmc_768 --features pre   # 768-d
    klgrade embed --data DATA --backbone rad-dino --weights ~/models/rad-dino --out emb/rad-dino
    torchrun --nproc_per_node=2 -m klgrade.cli embed --data DATA --backbone dinov2-base --out emb/dino

Re-running on the same data reuses the store (no forward pass); new or changed images are embedded
and merged in. A store made with another backbone, weights or preprocessing is refused.
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from klgrade.models.registry import list_models

    names = ", ".join(s.name for s in list_models("embedder"))
    p = sub.add_parser("embed", help="embed images with a frozen foundation model (BioMedCLIP, ...) into a store",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset dir with manifest.csv")
    p.add_argument("--backbone", required=True, help=f"embedder from the registry: {names}")
    p.add_argument("--out", required=True, metavar="STORE", help="embedding store folder (created or extended)")
    p.add_argument("--weights", default="auto",
                   help="auto (hub when online, local hub cache when HF_HUB_OFFLINE) | none (random init) | PATH "
                        "(checkpoint file, or a folder in the hub's layout, e.g. open_clip_config.json + "
                        "open_clip_pytorch_model.bin); default auto")
    p.add_argument("--features", choices=["proj", "pre"], default="proj",
                   help="proj: the model's embedding (CLIP: projected, 512-d; DINO: CLS token); "
                        "pre: CLIP image features before the projection (768-d). Default proj")
    p.add_argument("--split", default="all", help="embed only this split (train|val|test|all; default all)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init with --weights none (default 0)")
    p.add_argument("--workers", type=int, default=0, help="image decode threads (default: up to 4)")
    p.add_argument("--rebuild", action="store_true", help="ignore what the store holds and embed everything anew")
    p.set_defaults(func=run)


def run(args) -> int:
    from klgrade.embed.embedders import default_device
    from klgrade.embed.store import StoreError, embed_dataset
    from klgrade.errors import UserError
    from klgrade.ingest.manifest import ManifestError

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = default_device() if args.device == "auto" else args.device
    try:
        store = embed_dataset(args.data, args.backbone, args.out, weights=args.weights, features=args.features,
                              split=args.split, batch_size=args.batch_size, device=device, seed=args.seed,
                              rebuild=args.rebuild, workers=args.workers)
    except ManifestError:
        raise
    except (StoreError, ValueError) as e:  # bad store, unknown backbone/features, unreadable image
        raise UserError(str(e)) from e
    if store is not None:
        m = store.meta
        print(f"{store.root}: {m['rows']} vectors of dim {m['dim']} ({m['backbone']}, features {m['features']}, "
              f"weights {m.get('weights_source')})")
    return 0
