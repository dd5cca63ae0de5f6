"""Classifier heads on embeddings: learning, class balance, the run-dir format, evaluate and predict."""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from klgrade.embed.store import StoreError, embed_dataset
from klgrade.evaluate.metrics import compute_metrics
from klgrade.evaluate.split import evaluate_run
from klgrade.heads import HeadConfig, fit_head, get_head, load_head_run, predict_views
from klgrade.rundir import PRED_COLUMNS, RunError, read_predictions


@pytest.fixture(scope="module")
def knees(tmp_path_factory):
    """200 synthetic patients (800 knees, 64 px) embedded once by a tiny random-init ViT saved in
    BioMedCLIP's hub layout (pre-projection features: the most signal a random tower keeps)."""
    from conftest import write_tiny_open_clip
    from klgrade.embed.embedders import build_embedder
    from klgrade.synthetic import write_png_dataset

    root = tmp_path_factory.mktemp("knees")
    write_png_dataset(root / "data", n_patients=200, seed=0, size=64, progress=False)
    weights = write_tiny_open_clip(root / "weights", timm_model="vit_tiny_patch16_224", image_size=64)
    emb = build_embedder("biomedclip", weights=str(weights), features="pre", device="cpu")
    embed_dataset(root / "data", "biomedclip", root / "store", embedder=emb, progress=False)
    return root / "data", root / "store"


@pytest.fixture(scope="module")
def mlp_run(knees, tmp_path_factory):
    data, store = knees
    out = tmp_path_factory.mktemp("runs") / "mlp"
    results = fit_head(store, data, out, HeadConfig(head="mlp", seed=0, epochs=40))
    return out, results


def test_mlp_head_learns_synthetic_knees_end_to_end(mlp_run):
    out, results = mlp_run
    # Honest end to end: random-init tiny ViT on 64 px synthetic knees -> embedding -> MLP head.
    assert results["val"]["qwk"] > 0.5, results["val"]
    assert results["test"]["qwk"] > 0.5, results["test"]


def test_head_run_has_the_cnn_run_format(mlp_run, knees):
    out, results = mlp_run
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["kind"] == "head" and cfg["head"] == "mlp" and cfg["backbone"] == "biomedclip"
    assert cfg["embeddings"] == str(knees[1].resolve()) and cfg["seed"] == 0 and cfg["val_source"] == "manifest"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["head"] == "mlp" and ckpt["store"]["features"] == "pre"
    hist = pd.read_csv(out / "history.csv")
    assert {"epoch", "train_loss", "val_loss", "val_qwk"} <= set(hist.columns) and len(hist) >= 1
    for split in ("val", "test"):
        p = read_predictions(out, split)
        assert list(p.columns) == PRED_COLUMNS
        np.testing.assert_allclose(p[[f"p{g}" for g in range(5)]].sum(1), 1.0, atol=1e-4)
        m = yaml.safe_load((out / f"metrics_{split}.json").read_text())
        assert len(m["f1"]) == 5 and m["qwk"] == pytest.approx(results[split]["qwk"])


def test_fit_is_reproducible(knees, mlp_run, tmp_path):
    data, store = knees
    fit_head(store, data, tmp_path / "again", HeadConfig(head="mlp", seed=0, epochs=40))
    a = read_predictions(mlp_run[0], "test")
    b = read_predictions(tmp_path / "again", "test")
    pd.testing.assert_frame_equal(a, b)


def test_load_head_run_predicts_views_like_the_run(mlp_run, knees):
    from klgrade.ingest.manifest import image_paths, read_manifest, select_split
    from klgrade.view.entrance import load_view

    out, _ = mlp_run
    model = load_head_run(out, device="cpu")
    assert model.input_size == 64 and model.backbone == "biomedclip"
    test = select_split(read_manifest(knees[0]), "test").iloc[:5]
    views = np.stack([load_view(p, model.input_size) for p in image_paths(test)])
    probs = predict_views(model, views)
    want = read_predictions(out, "test").set_index("image_id").loc[test["image_id"], [f"p{g}" for g in range(5)]]
    np.testing.assert_allclose(probs, want.to_numpy(), atol=1e-4)
    np.testing.assert_allclose(model.predict_paths(image_paths(test)), probs, atol=1e-6)


def test_evaluate_head_run_on_new_data_equals_its_own_predictions(mlp_run, knees, tmp_path):
    """A head run evaluated (klgrade.runs.load_run: views -> frozen backbone -> head) on a copy of its
    test images under other ids gives the probabilities fit-head wrote from its store."""
    out, results = mlp_run
    data, _ = knees
    ext = tmp_path / "external"
    shutil.copytree(data, ext)
    man = pd.read_csv(ext / "manifest.csv", dtype=str, keep_default_na=False)
    man = man[man["split"] == "test"].assign(split="")
    man["image_id"] = "ext_" + man["image_id"]
    man.to_csv(ext / "manifest.csv", index=False)
    m2 = evaluate_run(out, ext, "all", tmp_path / "ev2", device="cpu", tta="none", cache_dir=tmp_path / "c")
    assert m2["qwk"] == pytest.approx(results["test"]["qwk"], abs=1e-6)
    p = read_predictions(tmp_path / "ev2", "all")
    assert p["image_id"].str.startswith("ext_").all()
    own = read_predictions(out, "test")
    np.testing.assert_allclose(p[PRED_COLUMNS[4:]].to_numpy(), own[PRED_COLUMNS[4:]].to_numpy(), atol=1e-4)


def test_evaluate_refuses_other_backbone_weights(mlp_run, knees, tmp_path):
    out, _ = mlp_run
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    bad = tmp_path / "bad_run"
    shutil.copytree(out, bad)
    ckpt = torch.load(bad / "checkpoint.pt", weights_only=True)
    ckpt["store"]["weights_fingerprint"] = "0" * 40
    cfg["embeddings"] = str(tmp_path / "none")
    torch.save(ckpt, bad / "checkpoint.pt")
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(RunError, match="differ from those the head was trained on"):
        evaluate_run(bad, knees[0], "test", tmp_path / "ev", device="cpu")


@pytest.mark.parametrize("head", ["linear", "xgboost"])
def test_linear_and_xgboost_heads(head, knees, tmp_path):
    if head == "xgboost":
        pytest.importorskip("xgboost")
    data, store = knees
    results = fit_head(store, data, tmp_path / head, HeadConfig(head=head, seed=0, n_estimators=60))
    assert results["test"]["qwk"] > 0.3
    model = load_head_run(tmp_path / head)
    X = np.random.default_rng(0).normal(size=(4, model.mean.size)).astype(np.float32)
    np.testing.assert_allclose(model.predict_proba(X).sum(1), 1.0, atol=1e-5)
    assert (tmp_path / head / "history.csv").is_file()


def test_xgboost_whose_first_round_is_best_still_predicts():
    """Validation labels opposite to the training signal: every round after the first is worse, so
    early stopping keeps round 0, which must not read as 'no early stopping' (all 500 rounds)."""
    pytest.importorskip("xgboost")
    from klgrade.heads.trees import Trees, fit_xgboost

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 40)
    X = (y[:, None] + rng.normal(0, 0.3, (200, 4))).astype(np.float32)
    cfg = HeadConfig(head="xgboost", seed=0)
    ckpt, hist = fit_xgboost(cfg, X, y, X, 4 - y)
    assert ckpt["best_iteration"] == 0 and len(hist) == 1 + cfg.early_stopping_rounds
    p = Trees.predict_proba(ckpt, X[:3])
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)


def test_xgboost_missing_is_a_clear_error(knees, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgboost", None)
    with pytest.raises(RunError, match=r"pip install 'klgrade\[xgboost\]'"):
        fit_head(knees[1], knees[0], tmp_path / "x", HeadConfig(head="xgboost"))


def test_holdout_val_when_manifest_has_none(knees, tmp_path):
    from klgrade.ingest.manifest import read_manifest
    from klgrade.ingest.splits import holdout_split

    data, store = knees
    nov = tmp_path / "noval"
    shutil.copytree(data, nov)
    man = pd.read_csv(nov / "manifest.csv", dtype=str, keep_default_na=False)
    man.loc[man["split"] == "val", "split"] = "train"
    man.to_csv(nov / "manifest.csv", index=False)
    fit_head(store, nov, tmp_path / "run", HeadConfig(head="linear", seed=3, val_fraction=0.2))
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["val_source"].startswith("holdout 0.2")
    df = read_manifest(nov)
    want = holdout_split(df, 0.2, seed=3)
    val_ids = set(want.loc[want["split"] == "val", "image_id"])
    assert set(read_predictions(tmp_path / "run", "val")["image_id"]) == val_ids
    train_pat = set(want.loc[want["split"] == "train", "patient_id"])
    assert not train_pat & set(want.loc[want["split"] == "val", "patient_id"])


def test_store_not_matching_manifest_is_refused(knees, tmp_path):
    from conftest import write_tiny_open_clip
    from klgrade.embed.embedders import build_embedder

    data, _ = knees

    emb = build_embedder("biomedclip", weights=str(write_tiny_open_clip(tmp_path / "w")), device="cpu")
    part = embed_dataset(data, "biomedclip", tmp_path / "part", embedder=emb, split="val", progress=False)
    with pytest.raises(StoreError, match="no vectors for .* run `klgrade embed --data"):
        fit_head(part.root, data, tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_fit_head_cli(knees, tmp_path, capsys):
    from klgrade.cli import main

    data, store = knees
    args = ["fit-head", "--embeddings", str(store), "--data", str(data), "--head", "linear",
            "--out", str(tmp_path / "r"), "--C", "0.1"]
    assert main(args) == 0
    assert "QWK" in capsys.readouterr().out
    assert main(args) == 1  # run exists
    assert "already holds a run" in capsys.readouterr().err
    args[2] = str(tmp_path / "nostore")
    assert main(args + ["--overwrite"]) == 1
    assert "no embedding store" in capsys.readouterr().err


# ------------------------------------------------------------------- heads on informative vectors
def _imbalanced(n: int, seed: int):
    """Ordinal vectors with the OAI grade mix; KL1 is rare and sits between KL0 and KL2."""
    rng = np.random.default_rng(seed)
    y = rng.choice(5, size=n, p=(0.5, 0.06, 0.24, 0.15, 0.05))
    X = rng.normal(size=(n, 24)).astype(np.float32)
    X[:, 0] += 1.6 * y
    X[:, 1] += 1.6 * (y == 1)
    return X, y


@pytest.mark.parametrize("fitter", [get_head("mlp").fit, get_head("linear").fit])
def test_balanced_heads_do_not_collapse_a_rare_grade(fitter):
    Xtr, ytr = _imbalanced(3000, 0)
    Xva, yva = _imbalanced(600, 1)
    Xte, yte = _imbalanced(1000, 2)
    ckpt, _ = fitter(HeadConfig(seed=0, epochs=30), Xtr, ytr, Xva, yva)
    from klgrade.heads import CHECKPOINT_FORMAT, HeadModel

    model = HeadModel({"format": CHECKPOINT_FORMAT, "head": "mlp" if fitter is get_head("mlp").fit else "linear", "store": {},
                       "scaler_mean": torch.zeros(24), "scaler_scale": torch.ones(24), **ckpt})
    m = compute_metrics(yte, model.predict_proba(Xte).argmax(1))
    assert m["qwk"] > 0.8
    assert min(m["f1"]) > 0.2, m["f1"]  # every grade, KL1 included, is predicted


def test_the_cli_offers_every_registered_head_and_lists_them_without_torch():
    import subprocess
    import sys

    from klgrade.config import HEAD_KINDS
    from klgrade.heads import HEADS

    assert set(HEAD_KINDS) == set(HEADS)
    # `klgrade --help` (every command registers its options) starts in a fraction of a second:
    # importing torch alone takes ~2 s
    code = "import sys; from klgrade.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
