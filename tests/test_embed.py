"""Embedders (image tower only, hub-layout weights offline) and the embedding store."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from klgrade.embed.embedders import build_embedder
from klgrade.embed.store import EmbeddingStore, StoreError, embed_dataset, open_store
from klgrade.models.registry import WeightsError


class Counter:
    """Counts forward calls and images through an embedder's tower."""

    def __init__(self, module):
        self.calls = self.images = 0
        module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1
        self.images += len(args[0])


@pytest.fixture()
def no_text_tower(monkeypatch):
    """Fail loudly if anything asks the hub for a file or builds open_clip's HF text tower."""
    import huggingface_hub
    import open_clip.hf_model

    def boom(*a, **k):
        raise AssertionError(f"unexpected hub/text-tower access: {a} {k}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", boom)
    monkeypatch.setattr(open_clip.hf_model.HFTextEncoder, "__init__", boom)


def test_tiny_biomedclip_loads_offline_image_tower_only(tiny_biomedclip, no_text_tower):
    import timm

    emb = build_embedder("biomedclip", weights=str(tiny_biomedclip), device="cpu")
    assert (emb.dim, emb.input_size, emb.features) == (32, 64, "proj")
    assert emb.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert not any("text" in k for k in emb.module.state_dict())
    # The loaded tower computes exactly trunk -> projection with the saved tensors.
    sd = torch.load(tiny_biomedclip / "open_clip_pytorch_model.bin", weights_only=True)
    trunk = timm.create_model("test_vit", img_size=64, num_classes=0)
    trunk.load_state_dict({k.removeprefix("visual.trunk."): v for k, v in sd.items() if k.startswith("visual.trunk.")})
    trunk.eval()
    views = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    x = emb.normalize(views)
    assert x.shape == (3, 3, 64, 64)
    with torch.no_grad():
        want = trunk(x) @ sd["visual.head.proj.weight"].T
    np.testing.assert_allclose(emb.embed_views(views), want.numpy(), rtol=1e-4, atol=1e-5)
    pre = build_embedder("biomedclip", weights=str(tiny_biomedclip), features="pre", device="cpu")
    assert pre.dim == trunk.num_features
    assert pre.fingerprint == emb.fingerprint  # same weights, other features
    with torch.no_grad():
        np.testing.assert_allclose(pre.embed_views(views), trunk(x).numpy(), rtol=1e-4, atol=1e-5)


def test_weights_auto_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    with pytest.raises(WeightsError) as e:
        build_embedder("biomedclip", weights="auto", device="cpu")
    msg = str(e.value)
    assert "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in msg and "HF_HUB_OFFLINE" in msg
    assert "--weights none" in msg and "--weights PATH" in msg


def test_bad_weights_paths_are_clear_errors(tmp_path, tiny_biomedclip):
    with pytest.raises(WeightsError, match="no such file"):
        build_embedder("biomedclip", weights=str(tmp_path / "nope"), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="open_clip_pytorch_model.bin"):
        build_embedder("biomedclip", weights=str(empty), device="cpu")
    noconf = tmp_path / "noconf"
    noconf.mkdir()
    shutil.copy(tiny_biomedclip / "open_clip_pytorch_model.bin", noconf)
    with pytest.raises(WeightsError, match="open_clip_config.json"):
        build_embedder("biomedclip", weights=str(noconf), device="cpu")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable checkpoint"):
        build_embedder("clip-vit-b16", weights=str(junk), device="cpu")
    with pytest.raises(ValueError, match="neither a registry backbone nor a timm model"):
        build_embedder("nonesuch_net", weights="none")
    assert build_embedder("test_resnet", weights="none").dim > 0  # any CNN is also a frozen embedder


@pytest.mark.parametrize("name,dim,size", [("clip-vit-b16", 512, 224), ("dinov2-base", 768, 518),
                                           ("rad-dino", 768, 518)])
def test_registry_embedders_build_random_init_offline(name, dim, size):
    emb = build_embedder(name, weights="none", device="cpu")
    assert (emb.dim, emb.input_size) == (dim, size)
    assert emb.weights_source.startswith("random-init")
    if name != "clip-vit-b16":
        with pytest.raises(ValueError, match="--features pre applies to CLIP|has no projection"):
            build_embedder(name, weights="none", features="pre")


# ------------------------------------------------------------------------------------------ store
@pytest.fixture()
def tiny(tiny_biomedclip):
    return build_embedder("biomedclip", weights=str(tiny_biomedclip), device="cpu")


def test_store_reuse_incremental_and_alignment(synth_png, tiny, tmp_path):
    from klgrade.ingest.manifest import read_manifest

    df = read_manifest(synth_png)
    count = Counter(tiny.module)
    full = embed_dataset(synth_png, "biomedclip", tmp_path / "full", embedder=tiny, batch_size=16, progress=False)
    assert count.images == len(df)
    # Second call on the same inputs: zero forward passes.
    count.calls = count.images = 0
    again = embed_dataset(synth_png, "biomedclip", tmp_path / "full", embedder=tiny, batch_size=16, progress=False)
    assert count.calls == 0
    np.testing.assert_array_equal(again.vectors, full.vectors)
    # Incremental: a new image appears in the manifest -> only it is embedded.
    grown = tmp_path / "grown"
    shutil.copytree(synth_png, grown)
    m = pd.read_csv(grown / "manifest.csv", dtype=str, keep_default_na=False)
    new = m.iloc[[0]].copy()
    new["image_id"] = "new_knee"
    new["path"] = "extra.png"
    shutil.copy(grown / m["path"].iat[0], grown / "extra.png")
    pd.concat([m, new]).to_csv(grown / "manifest.csv", index=False)
    shutil.copytree(tmp_path / "full", tmp_path / "grown_store")
    s3 = embed_dataset(grown, "biomedclip", tmp_path / "grown_store", embedder=tiny, progress=False)
    assert count.images == 1 and len(s3.index) == len(df) + 1
    # Vectors are aligned by image_id: the copied image has the same vector as its original.
    g = read_manifest(grown)
    X = open_store(tmp_path / "grown_store").vectors_for(g)
    np.testing.assert_allclose(X[-1], X[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(open_store(tmp_path / "full").vectors_for(df), X[:-1], rtol=1e-6)
    meta = open_store(tmp_path / "grown_store").meta
    assert meta["rows"] == len(df) + 1 and meta["backbone"] == "biomedclip"
    assert meta["weights_fingerprint"] == tiny.fingerprint and meta["preprocessing"]["input_size"] == 64
    assert meta["dataset_fingerprint"] != open_store(tmp_path / "full").meta["dataset_fingerprint"]


def test_changed_image_is_re_embedded(synth_png, tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_png, data)
    embed_dataset(data, "biomedclip", tmp_path / "s", embedder=tiny, split="val", progress=False)
    m = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    val = m[m["split"] == "val"]
    target = data / val["path"].iat[0]
    from PIL import Image

    Image.fromarray(np.zeros((64, 64), np.uint8) + 17).save(target)
    count = Counter(tiny.module)
    embed_dataset(data, "biomedclip", tmp_path / "s", embedder=tiny, split="val", progress=False)
    assert count.images == 1


def test_mismatched_store_is_refused(synth_png, tiny, tiny_biomedclip, tmp_path):
    from conftest import write_tiny_open_clip

    store = tmp_path / "store"
    embed_dataset(synth_png, "biomedclip", store, embedder=tiny, split="val", progress=False)
    pre = build_embedder("biomedclip", weights=str(tiny_biomedclip), features="pre", device="cpu")
    with pytest.raises(StoreError, match=r"made differently.*features: store 'proj' vs now 'pre'"):
        embed_dataset(synth_png, "biomedclip", store, embedder=pre, split="val", progress=False)
    other = build_embedder("biomedclip", weights=str(write_tiny_open_clip(tmp_path / "other", seed=1)), device="cpu")
    with pytest.raises(StoreError, match="weights: store"):
        embed_dataset(synth_png, "biomedclip", store, embedder=other, split="val", progress=False)
    # --rebuild replaces it
    s = embed_dataset(synth_png, "biomedclip", store, embedder=other, split="val", rebuild=True, progress=False)
    assert s.meta["weights_fingerprint"] == other.fingerprint
    # A store that lacks images of a manifest, and a half-written store, are clear errors.
    from klgrade.ingest.manifest import read_manifest

    with pytest.raises(StoreError, match=r"no vectors for \d+ of \d+ image"):
        open_store(store).vectors_for(read_manifest(synth_png))
    np.save(store / "vectors.npy", np.zeros((3, 32), np.float32))
    with pytest.raises(StoreError, match="inconsistent store"):
        EmbeddingStore.open(store)
    with pytest.raises(StoreError, match="no embedding store"):
        open_store(tmp_path / "nowhere")


def test_store_of_a_moved_view_module_is_reused_but_not_of_another_view_version(synth_png, tiny, tmp_path):
    """Stores whose recipe names the view's module (before and after its move from
    klgrade.data.canonical to klgrade.view.canonical) hold the same views: the view version decides."""
    import json

    from klgrade.embed.embedders import VIEW_RECIPE
    from klgrade.view.cache import CACHE_VERSION

    store = tmp_path / "store"
    embed_dataset(synth_png, "biomedclip", store, embedder=tiny, split="val", progress=False)
    meta_path = store / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["preprocessing"]["view"] == VIEW_RECIPE
    count = Counter(tiny.module)
    for module in ("klgrade.data.canonical", "klgrade.view.canonical"):  # as older stores wrote it
        meta["preprocessing"]["view"] = VIEW_RECIPE.replace("canonical_view,", f"canonical_view ({module}),")
        meta_path.write_text(json.dumps(meta))
        embed_dataset(synth_png, "biomedclip", store, embedder=tiny, split="val", progress=False)
    assert count.images == 0  # reused as it is
    meta["preprocessing"]["view"] = VIEW_RECIPE.replace(f"view version {CACHE_VERSION}",
                                                        f"view version {CACHE_VERSION - 1}")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"preprocessing\.view: store .*view version"):
        embed_dataset(synth_png, "biomedclip", store, embedder=tiny, split="val", progress=False)


def test_embed_cli(synth_png, tiny_biomedclip, tmp_path, capsys):
    from klgrade.cli import main

    args = ["embed", "--data", str(synth_png), "--backbone", "biomedclip", "--weights", str(tiny_biomedclip),
            "--out", str(tmp_path / "s"), "--split", "test", "--batch-size", "8", "--device", "cpu"]
    assert main(args) == 0
    assert "vectors of dim 32" in capsys.readouterr().out
    assert main(args[:-6] + ["--out", str(tmp_path / "s"), "--features", "pre", "--split", "test"]) == 1
    assert "made differently" in capsys.readouterr().err
    assert main(["embed", "--data", str(synth_png), "--backbone", "nonesuch", "--out", str(tmp_path / "x"),
                 "--weights", "none"]) == 1
    assert "neither a registry backbone nor a timm model" in capsys.readouterr().err


def test_torchrun_two_gloo_processes_shard_and_merge(synth_png, tiny, tiny_biomedclip, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to the interpreter")
    single = embed_dataset(synth_png, "biomedclip", tmp_path / "single", embedder=tiny, split="test", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "klgrade.cli", "embed", "--data", str(synth_png),
           "--backbone", "biomedclip", "--weights", str(tiny_biomedclip), "--out", str(tmp_path / "ddp"),
           "--split", "test", "--device", "cpu", "--batch-size", "4"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    merged = open_store(tmp_path / "ddp")
    assert sorted(merged.index["image_id"]) == sorted(single.index["image_id"])
    from klgrade.ingest.manifest import read_manifest, select_split

    test = select_split(read_manifest(synth_png), "test")
    np.testing.assert_allclose(merged.vectors_for(test), single.vectors_for(test), rtol=1e-4, atol=1e-5)
    assert merged.meta["weights_fingerprint"] == single.meta["weights_fingerprint"]
