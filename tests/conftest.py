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
