"""DistributedDataParallel under torchrun: 2 gloo processes on CPU produce one valid run dir."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import torch

from klgrade import io


def test_torchrun_two_gloo_processes_make_a_valid_run(synth_png, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "klgrade.cli", "train", "--data", str(synth_png), "--model", "test_resnet",
           "--weights", "none", "--img-size", "32", "--epochs", "1", "--batch-size", "8",
           "--tta", "none", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = io.read_yaml(out / "config.yaml")
    assert cfg["resolved"]["world_size"] == 2
    assert len(pd.read_csv(out / "history.csv")) == 1
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ck["model"])  # saved unwrapped: loads anywhere
    for split in ("val", "test"):
        m = io.read_json(out / f"metrics_{split}.json")
        assert m["n"] == (pd.read_csv(synth_png / "manifest.csv")["split"] == split).sum()
    # rank 0 alone writes: no stray temp files from a second writer
    assert not list(out.glob(".*.tmp"))
