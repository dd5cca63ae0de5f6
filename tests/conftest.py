"""Shared fixtures. Tests are offline (HF_HUB_OFFLINE) and single-threaded to be fair to a 2-core CI."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# bf16 + channels-last wherever the CPU has native bf16 (as before the measured choice): test numerics
# must not depend on a timing; klgrade.runs.precision's measurement has its own tests.
os.environ.setdefault("KLGRADE_CPU_LAYOUT", "rule")

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
    from klgrade.synthetic import write_png_dataset

    out = tmp_path_factory.mktemp("synth_png")
    write_png_dataset(out, n_patients=60, seed=0, size=64)
    return out


@pytest.fixture(scope="session")
def synth_dicom(tmp_path_factory) -> Path:
    """A small synthetic OAI-style DICOM tree with kxr_sq_bu label tables and contents.csv."""
    from klgrade.synthetic import write_dicom_tree

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

    from klgrade.synthetic import bilateral_dataset, render_bilateral, save_dataset, to_stored

    img, truth = render_bilateral(0, 4, np.random.default_rng(3), spacing_mm=0.25, shape=(720, 1040))
    path = tmp_path_factory.mktemp("clinic_dicom") / "bilateral.dcm"
    save_dataset(bilateral_dataset(to_stored(img), 0.25, uid_seed=3), path)
    return path, truth


TINY_CLIP_CFG = {
    # BioMedCLIP's open_clip_config.json structure, shrunk: a timm ViT image tower (test_vit at 64 px,
    # 32-d projection) and the HF BERT text_cfg, which klgrade must never build (nor fetch).
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 64},
        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 256},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}


def write_tiny_open_clip(folder: Path, seed: int = 0, timm_model: str = "test_vit", image_size: int = 64) -> Path:
    """Save a tiny CLIP checkpoint in the hub's layout (open_clip_config.json + open_clip_pytorch_model.bin)."""
    import copy
    import json

    import timm
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    trunk = timm.create_model(timm_model, img_size=image_size, num_classes=0)
    sd = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    sd["visual.head.proj.weight"] = torch.randn(32, trunk.num_features) / trunk.num_features**0.5
    sd["text.transformer.embeddings.word_embeddings.weight"] = torch.zeros(8, 4)  # stand-in text tower
    sd["logit_scale"] = torch.tensor(4.6052)
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    cfg = copy.deepcopy(TINY_CLIP_CFG)
    cfg["model_cfg"]["vision_cfg"].update(timm_model_name=timm_model, image_size=image_size)
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


@pytest.fixture(scope="session")
def tiny_biomedclip(tmp_path_factory) -> Path:
    """A tiny random ViT in BioMedCLIP's hub layout: `--backbone biomedclip --weights <this dir>`."""
    return write_tiny_open_clip(tmp_path_factory.mktemp("tiny_biomedclip"))
