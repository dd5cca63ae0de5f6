"""`klgrade demo`: the whole study on built-in synthetic knees, offline, in minutes on a laptop CPU.

synthesize a cohort -> prepare (patient-level split) -> train ResNet18 and ConvNeXt -> embed with the
BioMedCLIP architecture -> MLP head -> compare -> report. Every step is the same sub-command a user
runs; the demo only chooses small sizes. Run it again in the same --out and it reuses the steps that
finished (recorded in demo.json) and resumes an interrupted training.
"""
from __future__ import annotations

import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole study on built-in synthetic data (minutes, offline)",
                       description=__doc__)
    p.add_argument("--out", default="demo_out", help="folder for the data, runs and report (default demo_out)")
    p.add_argument("--weights", default="none", help="none (random init, default) or auto (pretrained "
                   "weights from the hub or its local cache)")
    p.add_argument("--embed-weights", default=None,
                   help="weights of the embedding backbone if not --weights (e.g. a local hub-layout folder)")
    p.add_argument("--patients", type=int, default=120, help="synthetic patients, one visit each (default 120)")
    p.add_argument("--img-size", type=int, default=64, help="CNN input size in px (default 64)")
    p.add_argument("--epochs", type=int, default=12, help="CNN epochs (default 12)")
    p.add_argument("--n-boot", type=int, default=500, help="bootstrap replicates for the CIs (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cnns", default="resnet18,convnext_tiny", help="CNNs to train (comma-separated)")
    p.add_argument("--backbone", default="biomedclip", help="embedding backbone (default biomedclip)")
    p.set_defaults(func=run)


# Per-family training settings of the demo (random init, ~150 training images at 64 px, 12 epochs).
# ConvNeXt (LayerNorm, layer scale, AdamW) diverges in its first steps at the default lr 1e-3 and
# then predicts the majority grade for every knee; at 3e-4 it is stable but learns slowly, so it
# gets smaller batches (2x the optimizer steps for the same images) and a longer warm-up.
DEMO_TRAIN = {"convnext": ["--lr", "3e-4", "--batch-size", "16", "--warmup-epochs", "2"]}
STATE_NAME = "demo.json"  # settings + finished steps, so a second `klgrade demo` reuses them
# settings that change what the steps produce (n_boot only changes compare, which always reruns)
SETTINGS = ("patients", "img_size", "epochs", "seed", "cnns", "backbone", "weights", "embed_weights")


def _step(title: str, argv: list[str]) -> None:
    from klgrade.cli import main
    from klgrade.errors import UserError

    print(f"\n== {title}\n$ klgrade {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise UserError(f"demo step '{title}' failed (exit {rc})")
    print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)


class _State:
    """demo.json in --out: the settings the folder was made with and the steps finished so far.
    A rerun with the same settings skips finished steps (and says so); other settings are refused,
    since mixing two cohorts or two trainings in one report would be wrong."""

    def __init__(self, out: Path, args):
        from klgrade import io
        from klgrade.errors import UserError

        self.path, self.io = out / STATE_NAME, io
        self.settings = {k: getattr(args, k) for k in SETTINGS}
        self.done: list[str] = []
        if self.path.is_file():
            old = io.read_json(self.path)
            diff = {k: (old["settings"].get(k), v) for k, v in self.settings.items() if old["settings"].get(k) != v}
            if diff:
                raise UserError(f"{out} holds a demo made with other settings ("
                                + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
                                + "); use another --out or delete it")
            self.done = list(old.get("done", []))
        elif out.is_dir() and any(out.iterdir()):
            raise UserError(f"{out}: not empty and not a demo folder (no {STATE_NAME}); use another --out")

    def finished(self, key: str, output: Path) -> bool:
        """True (and says so) when step ``key`` finished before and its output is still there."""
        if key in self.done and output.exists():
            print(f"\n== {key}: done in an earlier run, reusing {output}", flush=True)
            return True
        return False

    def mark(self, key: str) -> None:
        self.done = [k for k in self.done if k != key] + [key]
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.io.write_json(self.path, {"settings": self.settings, "done": self.done})


def _train(state: _State, model: str, rd: Path, data: Path, args) -> None:
    key = f"train {model}"
    if state.finished(key, rd / "metrics_test.json"):
        return
    if (rd / "config.yaml").is_file():  # interrupted: continue from its last.pt
        _step(f"train {model} end to end (resuming the interrupted run)", ["train", "--resume", str(rd)])
    else:
        _step(f"train {model} end to end",
              ["train", "--data", str(data), "--model", model, "--out", str(rd), "--weights", args.weights,
               "--img-size", str(args.img_size), "--epochs", str(args.epochs), "--seed", str(args.seed),
               *[a for family, extra in DEMO_TRAIN.items() if family in model for a in extra]])
    state.mark(key)


def run(args) -> int:
    out = Path(args.out)
    data, runs, report = out / "data", out / "runs", out / "report"
    t0 = time.perf_counter()
    seed = str(args.seed)
    state = _State(out, args)
    state.save()  # before any step, so an interrupted demo is recognised as one
    if not state.finished("synthesize", data / "manifest.csv"):
        _step("synthesize a cohort of knee radiographs (unilateral crops)",
              ["synth", "--patients", str(args.patients), "--out", str(data), "--format", "png",
               "--size", "128", "--visits-per-patient", "1", "--seed", seed])
        state.mark("synthesize")
    if not state.finished("split", data / "manifest.csv"):
        _step("patient-level, grade-stratified split",
              ["split", str(data), "--split", "0.6,0.15,0.25", "--seed", seed])
        state.mark("split")
    run_dirs = []
    for model in [m for m in args.cnns.split(",") if m]:
        run_dirs.append(runs / model)
        _train(state, model, runs / model, data, args)
    store = out / "embeddings" / args.backbone
    if not state.finished("embed", store / "meta.json"):
        # embed resumes by itself: images already in the store are skipped
        _step(f"embed every knee with the frozen {args.backbone} image tower",
              ["embed", "--data", str(data), "--backbone", args.backbone, "--out", str(store),
               "--weights", args.embed_weights or args.weights])
        state.mark("embed")
    rd = runs / f"{args.backbone}_mlp"
    if not state.finished("fit the MLP head", rd / "metrics_test.json"):
        _step("fit the MLP head on the embeddings",
              ["fit-head", "--embeddings", str(store), "--data", str(data), "--head", "mlp", "--out", str(rd),
               "--seed", seed, "--overwrite"])  # a head fit is seconds: an interrupted one starts over
        state.mark("fit the MLP head")
    run_dirs.append(rd)
    _step("compare the approaches: Table 1, Figure 1, CIs, paired tests",
          ["compare", *map(str, run_dirs), "--split", "test", "--out", str(report), "--n-boot", str(args.n_boot),
           "--seed", seed, *(["--note", "Synthetic knees and randomly initialised networks: the numbers are a "
                                        "pipeline check, not the study's answer."] if args.weights == "none" else [])])
    print(f"\nDemo finished in {time.perf_counter() - t0:.0f} s.")
    if args.weights == "none":
        print("NOTE: all models were randomly initialised (--weights none): the numbers check the pipeline; "
              "they are not the study's answer.")
    print(f"Report: {(report / 'report.html').resolve()}")
    print(f"Table 1: {(report / 'table1.md').resolve()}")
    return 0
