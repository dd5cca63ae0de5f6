"""Does the input pipeline starve the model? Training and evaluation images/s through the real
pipeline (decode-once memmap cache -> batch slice -> device -> augment -> normalise) vs the same
model, optimizer and step on random tensors of the same shape, same threads.

    .venv/bin/python benchmarks/bench_train_throughput.py                      # kneeKL224, resnet18, 224 px
    .venv/bin/python benchmarks/bench_train_throughput.py --device cuda --batch-size 128 --steps 40

Rounds alternate real/random so a noisy shared machine hurts both sides alike; each ratio is the
median over rounds of that round's real/random pair (``paired_ratios`` keeps them all, and the
quartiles say how far they spread; ``ratio_of_medians`` is what earlier runs reported). Writes benchmarks/results/train_throughput_<device>_<model>_<size>.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KNEEKL224 = HERE.parents[1] / "shared" / "data" / "kneeKL224"


def ensure_dataset(data: str | None, work: Path) -> str:
    """A dataset dir: the one given, or kneeKL224 ingested with `klgrade prepare folders`."""
    if data:
        return data
    out = work / "kneeKL224"
    if not (out / "manifest.csv").is_file():
        from klgrade.cli import main

        if main(["prepare", "folders", str(KNEEKL224), "--out", str(out)]) != 0:
            sys.exit(f"could not ingest {KNEEKL224}")
    return str(out)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="dataset dir (default: kneeKL224 via prepare folders)")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "klgrade_bench"))
    ap.add_argument("--out", help="result json (default benchmarks/results/...)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    from klgrade.config import TrainConfig
    from klgrade.train.loop import Trainer

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = ensure_dataset(args.data, work)
    cfg = TrainConfig(data=data, model=args.model, weights="none", img_size=args.img_size,
                      batch_size=args.batch_size, eval_batch_size=args.batch_size, device=args.device,
                      workers=args.workers, epochs=1000)
    tr = Trainer(cfg, tempfile.mkdtemp(dir=work))  # builds the cache once (untimed) and the loaders
    sides = timed_sides(tr, args)
    for fn in sides.values():  # warm-up (allocator, cudnn autotune, page cache) not timed
        fn()
    res = {k: [] for k in sides}
    for _ in range(args.rounds):
        for k, fn in sides.items():
            res[k].append(fn())
    out = summary(res, tr, args, data)
    path = Path(args.out) if args.out else HERE / "results" / f"train_throughput_{tr.device.type}_{args.model}_{args.img_size}.json"
    from klgrade import io

    io.write_json(path, out)
    print(json.dumps({k: out[k] for k in ("images_per_s", "train_ratio", "eval_ratio", "ratio_quartiles")}, indent=1))
    print(f"wrote {path}")


def timed_sides(tr, args) -> dict:
    """{'train_real', 'train_random', 'eval_real', 'eval_random'}: each times ``args.steps``
    batches and returns images/s."""
    import torch

    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    xr = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=tr.device)
    if tr.channels_last:
        xr = xr.contiguous(memory_format=torch.channels_last)
    return {**_train_sides(tr, args, xr, sync), **_eval_sides(tr, args, xr, sync)}


def _train_sides(tr, args, xr, sync) -> dict:
    """The loop's own epoch code for ``steps`` batches vs its train step on the random ``xr``."""
    import torch

    yr = torch.randint(0, 5, (args.batch_size,), device=tr.device)
    epoch = [0]

    def real_train() -> float:
        # The loop's own epoch code, run for `steps` batches (over several epochs on a small set).
        sync()
        t = time.perf_counter()
        left = args.steps
        while left > 0:
            n = min(left, len(tr.train_loader))
            tr.train_epoch(epoch[0], max_steps=n)
            epoch[0] += 1
            left -= n
        sync()
        return args.steps * args.batch_size / (time.perf_counter() - t)

    def random_train() -> float:
        tr.model.train()
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            tr.train_step(xr, yr)
        sync()
        return args.steps * args.batch_size / (time.perf_counter() - t)

    return {"train_real": real_train, "train_random": random_train}


def _eval_sides(tr, args, xr, sync) -> dict:
    """Evaluation's own code over every cached image, in order, vs the bare forward on ``xr``;
    both in evaluation's measured precision and layout (switched untimed, as Trainer.predict does)."""
    import torch

    from klgrade.runs.cnn import forward_probs, predict_batches
    from klgrade.view.batches import ViewBatches, make_loader

    dev, b = tr.device, args.batch_size
    layout = {True: torch.channels_last, False: torch.contiguous_format}
    xe = xr.contiguous(memory_format=layout[tr.eval_channels_last])
    model = tr.model.module if hasattr(tr.model, "module") else tr.model
    loader = make_loader(ViewBatches(tr.data.views, range(len(tr.data.df))), b, shuffle=False,
                         workers=args.workers, pin_memory=dev.type == "cuda")

    def batches():
        while True:
            yield from loader

    def real_eval() -> float:
        # the evaluation code itself (klgrade evaluate / the loop's validation), on `steps` batches
        sync()
        t = time.perf_counter()
        predict_batches(model, itertools.islice(batches(), args.steps), tr.built.mean, tr.built.std,
                        dev, "none", tr.eval_amp_dtype, tr.eval_channels_last, n=len(tr.data.df))
        sync()
        return args.steps * b / (time.perf_counter() - t)

    @torch.no_grad()
    def random_eval() -> float:
        model.eval()
        sync()
        t = time.perf_counter()
        out = [forward_probs(model, xe, "none", tr.eval_amp_dtype) for _ in range(args.steps)]
        torch.cat(out).cpu()
        sync()
        return args.steps * b / (time.perf_counter() - t)

    def evaluating(fn):  # fn timed with the model in the evaluation layout
        model.to(memory_format=layout[tr.eval_channels_last])
        try:
            return fn()
        finally:
            model.to(memory_format=layout[tr.channels_last])

    return {"eval_real": lambda: evaluating(real_eval), "eval_random": lambda: evaluating(random_eval)}


def summary(res: dict, tr, args, data: str) -> dict:
    """The result JSON: images/s (medians), the paired ratios and how they spread, the setup."""
    import torch

    dev = tr.device
    med = {k: statistics.median(v) for k, v in res.items()}
    # A round's two sides ran back to back, so their ratio cancels the machine's drift between
    # rounds (+-20-30% on a shared VM), which a ratio of the two medians does not.
    paired = {kind: [r / q for r, q in zip(res[f"{kind}_real"], res[f"{kind}_random"])] for kind in ("train", "eval")}
    return {
        "model": args.model, "img_size": args.img_size, "batch_size": args.batch_size, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else os.uname().machine,
        "threads": torch.get_num_threads(), "workers": args.workers, "steps_per_round": args.steps,
        "rounds": args.rounds, "amp_dtype": str(tr.amp_dtype), "channels_last": tr.channels_last,
        "eval_amp_dtype": str(tr.eval_amp_dtype), "eval_channels_last": tr.eval_channels_last,
        "images_per_s": {k: round(v, 2) for k, v in med.items()},
        "train_ratio": round(statistics.median(paired["train"]), 3),
        "eval_ratio": round(statistics.median(paired["eval"]), 3),
        "ratio_quartiles": {k: [round(q, 3) for q in _quartiles(v)] for k, v in paired.items()},
        "ratio_of_medians": {"train": round(med["train_real"] / med["train_random"], 3),
                             "eval": round(med["eval_real"] / med["eval_random"], 3)},
        "paired_ratios": {k: [round(x, 3) for x in v] for k, v in paired.items()},
        "per_round": {k: [round(x, 2) for x in v] for k, v in res.items()},
        "data": data, "n_train_images": int(len(tr.data.rows["train"])),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


if __name__ == "__main__":
    main()
