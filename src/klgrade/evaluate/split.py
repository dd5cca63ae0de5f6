"""Grade one split of a dataset with any run: the library side of `klgrade evaluate`."""
from __future__ import annotations


def evaluate_run(run_dir, data, split: str, out_dir, tta: str | None = None, device: str = "auto",
                 batch_size: int = 64, workers: int = 0, cache_dir=None) -> dict:
    """Predict ``split`` of dataset ``data`` with any run (klgrade.runs.load_run) on the views of the
    decode cache; write predictions/metrics to ``out_dir``."""
    from klgrade.ingest.manifest import image_paths, image_sides, read_manifest, select_split
    from klgrade.rundir import write_predictions
    from klgrade.runs import load_run
    from klgrade.view.cache import cached_views

    predictor = load_run(run_dir, device=device)
    tta = tta or predictor.tta
    df = select_split(read_manifest(data), split)  # read_manifest refuses patient leakage
    views = cached_views(image_paths(df), predictor.img_size, cache_dir or predictor.config.get("cache_dir"),
                         sides=image_sides(df))
    probs = predictor.predict_views(views, tta=tta, batch_size=batch_size, progress=True, workers=workers)
    return write_predictions(out_dir, split, df, probs,
                             extra_metrics={"tta": tta, "data": str(data), "run": str(run_dir)})


