"""`klgrade pretrain`: self-supervised pretraining, its run dir as a backbone, resume, DDP, bad inputs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from klgrade import io
from klgrade.cli import main

FLAGS = ["--model", "test_resnet", "--init", "none", "--method", "byol", "--epochs", "3", "--img-size", "32",
         "--batch-size", "16", "--device", "cpu"]
COLS = ["epoch", "lr", "ssl_loss", "rankme", "knn_qwk"]


def _cfg(data, **kw):
    from klgrade.config import apply_overrides
    from klgrade.pretrain.config import PretrainConfig

    base = dict(data=[str(data)], model="test_resnet", init="none", method="byol", epochs=3, img_size=32,
                batch_size=16, device="cpu")
    return apply_overrides(PretrainConfig(), {**base, **kw})


@pytest.fixture(scope="module")
def ssl_run(synth_png, tmp_path_factory):
    from klgrade.pretrain.loop import pretrain

    out = tmp_path_factory.mktemp("pretrain") / "ssl_byol"
    pretrain(_cfg(synth_png), out)
    return out


def test_tiny_pretrain_lowers_loss_raises_rank_and_writes_a_run(ssl_run, synth_png):
    h = pd.read_csv(ssl_run / "history.csv")
    assert list(h["epoch"]) == [0, 1, 2, 3]  # epoch 0: the embeddings before any training
    assert h["ssl_loss"].iloc[-1] < h["ssl_loss"].iloc[1]
    assert h["rankme"].iloc[-1] > h["rankme"].iloc[0]
    assert h["knn_qwk"].notna().all()  # synth_png has a labelled val split
    cfg = io.read_yaml(ssl_run / "config.yaml")
    assert cfg["kind"] == "pretrain" and cfg["splits"] == ["train"]
    (fp,) = cfg["resolved"]["images"]
    n_train = (pd.read_csv(synth_png / "manifest.csv")["split"] == "train").sum()
    assert fp["n_images"] == n_train and len(fp["manifest_sha256"]) == 64 and fp["images_sha1"]
    assert cfg["resolved"]["weights_source"] == {"kind": "none"}
    ck = torch.load(ssl_run / "checkpoint.pt", weights_only=True)
    assert ck["model_name"] == "test_resnet" and ck["img_size"] == 32 and ck["epoch"] == 3
    assert not any(k.startswith(("module.", "fc.")) for k in ck["model"])  # the bare encoder


def test_resume_after_sigkill_equals_uninterrupted(ssl_run, synth_png, tmp_path):
    from klgrade.pretrain.loop import resume

    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "klgrade.cli", "pretrain", "--data", str(synth_png), *FLAGS, "--out", str(run)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (run / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] < 3
    resume(run)
    a = torch.load(run / "last.pt", weights_only=True)["model"]
    b = torch.load(ssl_run / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # teacher and heads too
    pd.testing.assert_frame_equal(pd.read_csv(run / "history.csv")[COLS], pd.read_csv(ssl_run / "history.csv")[COLS])


def test_torchrun_two_gloo_processes_make_a_valid_run(synth_png, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "klgrade.cli",
           "pretrain", "--data", str(synth_png), "--model", "test_resnet", "--init", "none", "--method", "simclr",
           "--epochs", "1", "--img-size", "32", "--batch-size", "8", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert io.read_yaml(out / "config.yaml")["resolved"]["world_size"] == 2
    assert len(pd.read_csv(out / "history.csv")) == 2
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ck["model"])
    assert not list(out.glob(".*.tmp"))  # rank 0 alone writes


def test_run_dir_is_a_backbone_for_embed_and_train(ssl_run, synth_png, tmp_path):
    from klgrade.embed.embedders import build_embedder
    from klgrade.embed.store import open_store
    from klgrade.models.cnn import build_model

    emb = tmp_path / "emb"
    assert main(["embed", "--data", str(synth_png), "--backbone", str(ssl_run), "--split", "val",
                 "--device", "cpu", "--out", str(emb)]) == 0
    meta = open_store(emb).meta
    assert meta["backbone"] == "test_resnet" and meta["weights"] == str(ssl_run.resolve())
    assert meta["weights_source"].startswith("pretrain:ssl_byol (byol, epoch 3")  # names the run
    # what a head fitted on this store rebuilds: the same tower, by fingerprint
    again = build_embedder(meta["backbone"], weights=meta["weights"], device="cpu")
    assert again.fingerprint == meta["weights_fingerprint"]

    ft = tmp_path / "ft"
    assert main(["train", "--data", str(synth_png), "--weights", str(ssl_run), "--img-size", "32", "--epochs", "1",
                 "--batch-size", "16", "--tta", "none", "--device", "cpu", "--out", str(ft)]) == 0
    cfg = io.read_yaml(ft / "config.yaml")
    assert cfg["model"] == "test_resnet"  # from the run, no --model given
    assert cfg["resolved"]["weights_source"]["kind"] == "pretrain"
    built = build_model("test_resnet", str(ssl_run))  # the fine-tune's start: encoder + a fresh head
    enc = torch.load(ssl_run / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(built.model.state_dict()[k], v) for k, v in enc.items())


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_inputs_get_one_clear_line(ssl_run, synth_png, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    header = (synth_png / "manifest.csv").read_text().splitlines()[0]
    (empty / "manifest.csv").write_text(header + "\n")
    base = ["pretrain", "--data", str(synth_png), "--img-size", "32", "--device", "cpu", "--out", str(tmp_path / "r")]
    assert "no images" in _one_line_error(capsys, [*base[:2], str(empty), *base[3:]])
    assert "no images to pretrain on" in _one_line_error(capsys, [*base, "--splits", "test_nope"])
    assert "unknown method 'mocov9'" in _one_line_error(capsys, [*base, "--method", "mocov9"])
    err = _one_line_error(capsys, [*base, "--model", "test_convnext", "--init", str(ssl_run)])
    assert "pretrained as 'test_resnet'" in err and "--model test_resnet" in err
    err = _one_line_error(capsys, ["train", "--data", str(synth_png), "--weights", str(ssl_run), "--model",
                                   "test_convnext", "--out", str(tmp_path / "t")])
    assert "pretrained as 'test_resnet'" in err
    assert "brings its own weights" in _one_line_error(
        capsys, ["embed", "--data", str(synth_png), "--backbone", str(ssl_run), "--weights", "none",
                 "--out", str(tmp_path / "e")])
    assert not (tmp_path / "r").exists()


def test_rankme_and_joint_keeping_crops():
    from klgrade.pretrain.augment import JOINT_XY, SSLAugment
    from klgrade.pretrain.monitor import rankme

    rng = np.random.default_rng(0)
    assert rankme(np.outer(rng.normal(size=64), rng.normal(size=16))) < 1.5  # collapsed: rank 1
    assert rankme(rng.normal(size=(256, 16))) > 14  # isotropic: close to the dimension
    theta = SSLAugment().crop_theta(500, torch.Generator().manual_seed(0))
    a, t = theta[:, :, :2], theta[:, :, 2]
    joint_out = torch.linalg.solve(a, torch.tensor(JOINT_XY) - t)  # where the joint lands in each view
    assert joint_out.abs().max() < 1.0
