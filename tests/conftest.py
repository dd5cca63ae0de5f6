"""Shared fixtures. Tests are offline (HF_HUB_OFFLINE) and single-threaded to be fair to a 2-core CI."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kneeKL224"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # Keep the decode cache and hub cache out of the user's home during tests.
    os.environ["KLGRADE_CACHE"] = str(tmp_path_factory.mktemp("klgrade_cache"))
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "train").is_dir():
        pytest.skip("real kneeKL224 data not present (../shared/data/kneeKL224)")
    return REAL_DATA


@pytest.fixture(scope="session")
def synth_png(tmp_path_factory) -> Path:
    """A small synthetic unilateral-crop dataset (PNG + manifest.csv with a patient-level split)."""
    from klgrade.data.synthetic import write_png_dataset

    out = tmp_path_factory.mktemp("synth_png")
    write_png_dataset(out, n_patients=60, seed=0, size=64)
    return out


@pytest.fixture(scope="session")
def synth_dicom(tmp_path_factory) -> Path:
    """A small synthetic OAI-style DICOM tree with kxr_sq_bu label tables and contents.csv."""
    from klgrade.data.synthetic import write_dicom_tree

    out = tmp_path_factory.mktemp("synth_dicom")
    write_dicom_tree(out, n_patients=6, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_cnn_run(synth_png, tmp_path_factory) -> Path:
    """A CNN run dir (timm test_resnet, 64 px, a few epochs on synth_png) for the clinic tests."""
    from klgrade.config import TrainConfig, apply_overrides
    from klgrade.train.loop import train

    out = tmp_path_factory.mktemp("clinic_runs") / "tiny_cnn"
    cfg = apply_overrides(TrainConfig(data=str(synth_png)), dict(
        model="test_resnet", weights="none", img_size=64, epochs=4, batch_size=16, lr=3e-3, tta="none",
        **{"augment.enabled": False}))
    train(cfg, out)
    return out


@pytest.fixture(scope="session")
def bilateral_dicom(tmp_path_factory) -> tuple[Path, dict]:
    """A synthetic bilateral PA knee DICOM (right KL0, left KL4; 0.25 mm/px) and its truth."""
    import numpy as np

    from klgrade.data.synthetic import bilateral_dataset, render_bilateral, save_dataset, to_stored

    img, truth = render_bilateral(0, 4, np.random.default_rng(3), spacing_mm=0.25, shape=(720, 1040))
    path = tmp_path_factory.mktemp("clinic_dicom") / "bilateral.dcm"
    save_dataset(bilateral_dataset(to_stored(img), 0.25, uid_seed=3), path)
    return path, truth
