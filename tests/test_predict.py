"""klgrade predict and the clinic core: file -> knees -> grades -> Grad-CAM, for CNN and head runs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from klgrade.cli import main
from klgrade.clinic.grader import GRADES, ClinicError, Grader, knees_from_file
from klgrade.rundir import RunError


@pytest.fixture(scope="module")
def grader(tiny_cnn_run) -> Grader:
    return Grader.from_run(tiny_cnn_run)


def _predict_json(capsys, *args) -> tuple[int, dict, str]:
    rc = main(["predict", *map(str, args), "--json"])
    out = capsys.readouterr()
    return rc, json.loads(out.out), out.err


def _check_knee(k: dict) -> None:
    p = np.array(k["probabilities"])
    assert p.shape == (5,) and np.all(p >= 0) and abs(p.sum() - 1) < 1e-4
    assert k["klg"] == int(p.argmax()) and k["klg"] in GRADES
    assert k["expected_grade"] == pytest.approx(float(np.dot(GRADES, p)), abs=1e-3)


def test_bilateral_dicom_both_knees_located_graded_with_heatmaps(tiny_cnn_run, bilateral_dicom, tmp_path, capsys):
    path, truth = bilateral_dicom
    rc, out, err = _predict_json(capsys, path, "--run", tiny_cnn_run, "--heatmaps", tmp_path / "cams")
    assert rc == 0, err
    assert out["errors"] == [] and len(out["results"]) == 1
    res = out["results"][0]
    assert res["layout"] == "bilateral"
    knees = {k["side"]: k for k in res["knees"]}
    assert set(knees) == {"R", "L"}  # patient's right knee on the image's left
    for side, k in knees.items():
        _check_knee(k)
        # located near the true joint centre (within 10 mm at 0.25 mm/px)
        dist_mm = np.hypot(k["location"]["x"] - truth[side][0], k["location"]["y"] - truth[side][1]) * 0.25
        assert dist_mm < 10, (side, dist_mm)
        png = Path(k["heatmap"])
        assert png.is_file() and png.parent == tmp_path / "cams"
        with Image.open(png) as im:
            assert im.mode == "RGB" and im.size[0] == im.size[1] >= 256
    assert knees["R"]["location"]["x"] < knees["L"]["location"]["x"]


def test_heatmaps_differ_between_knees_of_different_grades(grader, bilateral_dicom):
    from klgrade.clinic.explain import find_target

    layout, knees = knees_from_file(bilateral_dicom[0], grader.img_size)
    assert layout == "bilateral" and [k.side for k in knees] == ["R", "L"]  # truth: R KL0, L KL4
    views = np.stack([k.view for k in knees])
    pred = grader.probabilities(views).argmax(axis=1)
    cams = grader.heatmaps(views, pred)
    assert cams.shape == (2, grader.img_size, grader.img_size)
    assert cams.min() >= 0 and cams.max() <= 1 and all(c.max() > 0.5 for c in cams)  # not blank
    assert np.abs(cams[0] - cams[1]).mean() > 0.05
    # the CAM depends on the grade asked about, i.e. it explains a grade, not just the image
    other = (pred[0] + 2) % 5
    assert np.abs(grader.heatmaps(views[:1], [other])[0] - cams[0]).mean() > 0.01
    assert find_target(grader.model)[2] == "layer4"
    res = grader.grade(knees, heatmaps=True)
    assert res[0]["_heatmap_png"] != res[1]["_heatmap_png"]


def _reference_cams(grader, views, classes) -> np.ndarray:
    """Grad-CAM as pytorch-grad-cam computes it by default: the whole network's backward, to an
    input that requires grad, with every parameter's gradient."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from klgrade.view.batches import views_to_tensor

    layer, reshape, _ = grader.explain_target
    x = views_to_tensor(np.asarray(views), grader.mean, grader.std, grader.device)
    with torch.enable_grad(), GradCAM(model=grader.model, target_layers=[layer], reshape_transform=reshape) as cam:
        cam.compute_input_gradient = True
        maps = cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(int(c)) for c in classes])
    grader.model.zero_grad(set_to_none=True)
    return maps


def test_gradcam_backward_stops_at_the_target_layer_with_the_same_maps(grader, bilateral_dicom):
    # only the gradient at the target layer is needed: nothing below it is differentiated (no
    # parameter gradient, the stem's backward never runs), and the maps are the library default's
    _, knees = knees_from_file(bilateral_dicom[0], grader.img_size)
    views = np.stack([k.view for k in knees])
    classes = [1, 3]
    stem_backward = []
    hook = grader.model.conv1.register_full_backward_hook(lambda *a: stem_backward.append(1))
    try:
        cams = grader.heatmaps(views, classes)
    finally:
        hook.remove()
    assert not stem_backward
    assert all(p.grad is None for p in grader.model.parameters())
    assert all(p.requires_grad for p in grader.model.parameters())  # given back trainable
    np.testing.assert_allclose(cams, _reference_cams(grader, views, classes), atol=1e-5)


def test_left_knee_is_mirrored_to_the_canonical_orientation(grader, tmp_path):
    from klgrade.synthetic import (
        bilateral_dataset,
        random_anatomy,
        render_bilateral,
        save_dataset,
        to_stored,
    )

    # Two mirror-image knees (same anatomy and grade): once the left one is mirrored back into the
    # canonical orientation, the two views match; unmirrored they would not.
    rng = np.random.default_rng(5)
    anat = random_anatomy(rng)
    img, _ = render_bilateral(2, 2, rng, spacing_mm=0.25, shape=(720, 1040), anatomy_right=anat,
                              anatomy_left=anat, noise=0.0)
    save_dataset(bilateral_dataset(to_stored(img), 0.25), tmp_path / "twins.dcm")
    _, (right, left) = knees_from_file(tmp_path / "twins.dcm", 128)
    assert (right.side, right.flipped, left.side, left.flipped) == ("R", False, "L", True)

    def mad(a, b):
        return np.abs(a.astype(float) - b.astype(float)).mean()

    assert 2 * mad(right.view, left.view) < mad(right.view, left.view[:, ::-1])


def test_png_jpeg_and_unilateral_dicom(grader, synth_png, tmp_path):
    from klgrade.synthetic import bilateral_dataset, render_knee, save_dataset, to_stored

    png = next((synth_png / "images").rglob("*.png"))
    layout, knees = knees_from_file(png, grader.img_size)
    assert layout == "unilateral" and len(knees) == 1 and knees[0].side == "U"
    jpg = tmp_path / "knee.jpg"
    Image.open(png).convert("L").save(jpg, quality=95)
    _check_knee(grader.predict_file(jpg)["knees"][0])

    img, _ = render_knee(3, np.random.default_rng(0), size_px=500, spacing_mm=0.3)
    ds = bilateral_dataset(to_stored(img), 0.3, series_description="PA Left Knee")
    ds.ImageLaterality = "L"
    save_dataset(ds, tmp_path / "uni.dcm")
    res = grader.predict_file(tmp_path / "uni.dcm")
    assert res["layout"] == "unilateral" and len(res["knees"]) == 1
    k = res["knees"][0]
    assert k["side"] == "L" and "location" in k
    _check_knee(k)


def test_bad_file_is_reported_and_the_others_still_graded(tiny_cnn_run, synth_png, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    missing = tmp_path / "missing.dcm"
    good = next((synth_png / "images").rglob("*.png"))
    rc, out, err = _predict_json(capsys, bad, good, missing, "--run", tiny_cnn_run)
    assert rc == 1
    assert [r["file"] for r in out["results"]] == [str(good)]
    assert {e["file"] for e in out["errors"]} == {str(bad), str(missing)}
    assert str(bad) in err and "not a readable image" in err and str(missing) in err
    with pytest.raises(ClinicError, match="broken.png"):
        knees_from_file(bad, 64)


def test_text_output(tiny_cnn_run, bilateral_dicom, capsys):
    assert main(["predict", str(bilateral_dicom[0]), "--run", str(tiny_cnn_run)]) == 0
    out = capsys.readouterr().out
    assert "right knee: KL" in out and "left knee: KL" in out and "expected" in out


def test_not_a_run_and_unsafe_checkpoint_are_clear_errors(tiny_cnn_run, synth_png, tmp_path, capsys):
    png = next((synth_png / "images").rglob("*.png"))
    assert main(["predict", str(png), "--run", str(synth_png)]) == 1
    assert "not a klgrade run" in capsys.readouterr().err
    with pytest.raises(RunError, match="no such run directory"):
        Grader.from_run(tmp_path / "nope")
    # A checkpoint holding a pickled object (code on load) is refused by weights_only loading.
    run = tmp_path / "evil"
    run.mkdir()
    (run / "config.yaml").write_text((tiny_cnn_run / "config.yaml").read_text())
    torch.save({"model": {}, "payload": _Payload()}, run / "checkpoint.pt")
    with pytest.raises(RunError, match="not a loadable klgrade checkpoint"):
        Grader.from_run(run)


class _Payload:  # any non-tensor class instance: torch.load(weights_only=True) must refuse it
    pass


# ------------------------------------------------------------------------------ head runs
@pytest.fixture(scope="module")
def head_store(tmp_path_factory):
    """A tiny timm ViT registered as an embedder, a small dataset and its embedding store."""
    from klgrade.embed.store import embed_dataset
    from klgrade.models.registry import REGISTRY, ModelSpec, register
    from klgrade.synthetic import write_png_dataset

    register(ModelSpec(name="test-vit-embedder", kind="embedder", library="timm", arch="test_vit",
                       hub_id=None, input_size=160, description="tiny ViT (tests)"))
    root = tmp_path_factory.mktemp("head")
    data = write_png_dataset(root / "data", n_patients=20, seed=1, size=64, visits_per_patient=1,
                             split="0.6,0.2,0.2")
    embed_dataset(data, "test-vit-embedder", root / "store", weights="none", device="cpu", progress=False)
    yield root, data
    REGISTRY.pop("test-vit-embedder", None)


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_head_run_grades_like_its_head_model_and_explains_through_the_vit(head_store, bilateral_dicom, head):
    from klgrade.heads import HeadConfig, fit_head, load_head_run

    root, data = head_store
    run = root / f"run_{head}"
    fit_head(root / "store", data, run, HeadConfig(head=head, epochs=3), overwrite=True)
    g = Grader.from_run(run)
    assert g.kind == "head" and g.img_size == 160
    res = g.predict_file(bilateral_dicom[0], heatmaps=True)
    assert [k["side"] for k in res["knees"]] == ["R", "L"]
    for k in res["knees"]:
        _check_knee(k)
        assert k["_heatmap_png"][:8] == b"\x89PNG\r\n\x1a\n" and "blocks" in k["heatmap_layer"]
    # the composed torch module gives the head API's own probabilities
    _, knees = knees_from_file(bilateral_dicom[0], g.img_size)
    views = np.stack([k.view for k in knees])
    np.testing.assert_allclose(g.probabilities(views), load_head_run(run).predict_views(views), atol=1e-5)
    # through the frozen ViT (no parameter takes a gradient), the maps of a backward to the input
    np.testing.assert_allclose(g.heatmaps(views, [0, 4]), _reference_cams(g, views, [0, 4]), atol=1e-5)


def test_xgboost_head_grades_without_heatmap_and_says_why(head_store, bilateral_dicom):
    pytest.importorskip("xgboost")
    from klgrade.heads import HeadConfig, fit_head

    root, data = head_store
    fit_head(root / "store", data, root / "run_xgb", HeadConfig(head="xgboost", n_estimators=10), overwrite=True)
    g = Grader.from_run(root / "run_xgb")
    res = g.predict_file(bilateral_dicom[0], heatmaps=True)
    for k in res["knees"]:
        _check_knee(k)
        assert k["heatmap"] is None and "no gradient" in k["heatmap_unavailable"]


def test_fine_films_are_reduced_before_cropping_without_changing_the_view():
    from klgrade.synthetic import render_bilateral
    from klgrade.view.canonical import canonical_view
    from klgrade.view.entrance import reduce_for_view

    img, truth = render_bilateral(1, 3, np.random.default_rng(2), spacing_mm=0.14, shape=(1000, 1560), noise=0.0)
    small, sp, f = reduce_for_view(img, (0.14, 0.14), 128)
    assert f >= 2 and sp == pytest.approx((0.14 * f, 0.14 * f)) and small.shape == (1000 // f, 1560 // f)
    assert reduce_for_view(img, None, 128)[0] is img  # no spacing: left alone
    for side in "RL":
        v_full, i_full = canonical_view(img, 128, spacing_mm=0.14, side=side)
        v_small, i_small = canonical_view(small, 128, spacing_mm=sp, side=side)
        centre_small = (np.array(i_small.centre) + 0.5) * f - 0.5
        assert np.hypot(*(centre_small - np.array(i_full.centre))) * 0.14 < 1.5  # mm
        assert np.abs(v_full.astype(float) - v_small).mean() < 8  # gray levels of 255


def test_head_run_exports_to_onnx_with_parity(head_store, tmp_path):
    from klgrade.clinic.export import export_run
    from klgrade.heads import HeadConfig, fit_head

    root, data = head_store
    fit_head(root / "store", data, root / "run_export", HeadConfig(head="mlp", epochs=2), overwrite=True)
    meta = export_run(root / "run_export", "onnx", tmp_path / "head.onnx")
    assert meta["run_kind"] == "head" and meta["input"]["shape"] == ["batch", 3, 160, 160]
    assert meta["parity"]["max_abs_diff"] < 1e-4


def test_each_knee_view_is_made_once_and_jsw_is_optional(grader, bilateral_dicom, monkeypatch):
    """Plain predict makes one view per knee (the JSW reuses its geometry); jsw=False skips the
    measurement and leaves the grades unchanged."""
    import klgrade.view.entrance as entrance

    calls = []
    real = entrance.canonical_view
    monkeypatch.setattr(entrance, "canonical_view", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    with_jsw = grader.predict_file(bilateral_dicom[0])
    assert calls == [grader.img_size] * 2
    without = grader.predict_file(bilateral_dicom[0], jsw=False)
    assert all("jsw" in k for k in with_jsw["knees"]) and not any("jsw" in k for k in without["knees"])
    for a, b in zip(with_jsw["knees"], without["knees"], strict=True):
        assert a["probabilities"] == b["probabilities"]


def test_a_films_knees_are_graded_in_one_batch_without_a_data_loader(grader, bilateral_dicom, monkeypatch):
    """Issue 19: a film's two views go straight to the model (no DataLoader, sampler or progress
    bar, and no eval()/train() walk over a model already in eval mode), with the probabilities the
    batched loader path gives."""
    import klgrade.runs.cnn as cnn

    views = np.stack([k.view for k in knees_from_file(bilateral_dicom[0], grader.img_size, jsw=False)[1]])
    batched = grader.predictor.predict_views(views, tta=grader.tta, progress=True)  # the loader path
    monkeypatch.setattr(cnn, "make_loader", lambda *a, **k: pytest.fail("DataLoader made for one batch"))
    toggles = []
    monkeypatch.setattr(grader.model, "train", lambda mode=True: toggles.append(mode))
    direct = grader.predictor.predict_views(views, tta=grader.tta)
    assert np.array_equal(direct, batched) and direct.shape == (2, 5)
    assert toggles == []
    res = grader.predict_file(bilateral_dicom[0], jsw=False)
    assert [k["probabilities"] for k in res["knees"]] == [[round(float(p), 6) for p in row] for row in batched]


def test_a_model_in_training_mode_is_graded_in_eval_mode_and_given_back():
    from klgrade.runs.cnn import predict_batches

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(5))
    views = torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8)
    model(torch.zeros(1, 3, 16, 16))  # materialise the lazy layer
    model[1].running_mean.fill_(0.3)  # eval-mode BatchNorm differs from the batch statistics
    expect = predict_batches(model.eval(), [(views, None, torch.arange(3))], (0.5,) * 3, (0.25,) * 3, "cpu")
    model.train()
    model[1].eval()  # a mixed state is also graded wholly in eval mode
    got = predict_batches(model, [(views, None, torch.arange(3))], (0.5,) * 3, (0.25,) * 3, "cpu")
    assert np.array_equal(got, expect)
    assert model.training and model[0].training


def test_each_half_of_a_film_is_copied_once_and_each_bone_band_profiled_once(monkeypatch):
    """Issue 19: a bilateral film's half is made contiguous once (locating and cropping read it
    without copying it again) and each bone band's edge profile is made once for both centring
    passes; the joints are still found."""
    import klgrade.ingest.roi as roi
    import klgrade.view.canonical as canonical
    from klgrade.synthetic import render_bilateral

    img, truth = render_bilateral(1, 3, np.random.default_rng(4), spacing_mm=0.3, shape=(700, 1000))
    seen, bands = [], []
    real_locate, real_crop, real_bands = roi.locate_knee, canonical._crop, roi._band_gradients
    monkeypatch.setattr(roi, "locate_knee", lambda im, **k: seen.append(im.flags.c_contiguous) or real_locate(im, **k))
    monkeypatch.setattr(canonical, "_crop", lambda im, *a: seen.append(im.flags.c_contiguous) or real_crop(im, *a))
    monkeypatch.setattr(roi, "_band_gradients", lambda g, b: bands.extend(b) or real_bands(g, b))
    for side in "RL":
        seen.clear()
        bands.clear()
        view, info = canonical.canonical_view(img, 128, spacing_mm=0.3, side=side)
        assert info.ok and np.hypot(*np.subtract(info.centre, truth[side])) * 0.3 < 5  # mm
        assert seen[0] and seen[-1]  # the half itself, as located and as cropped: already contiguous
        assert len(bands) == len(set(bands)) == 2 * (len(seen) - 1)  # 2 bands per location, each once


def test_grading_a_film_does_not_import_scikit_learn(tiny_cnn_run, bilateral_dicom):
    # scikit-learn takes ~1 s to import: `klgrade predict` (the CLI, which registers every command,
    # and the grader) must not pay it; metrics import it when one is computed
    import subprocess
    import sys

    code = ("import sys; from klgrade.cli import build_parser; build_parser(); "
            "from klgrade.clinic.grader import Grader; "
            f"Grader.from_run({str(tiny_cnn_run)!r}, device='cpu').predict_file({str(bilateral_dicom[0])!r}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn')[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    from klgrade.evaluate.metrics import qwk

    assert qwk([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]) == 1.0


def test_png_bytes_decode_to_the_very_pixels_in_their_channel_order():
    # the page's and the CLI's PNGs (OpenCV's encoder, which wants BGR) read back by another decoder
    import io

    from klgrade.clinic.explain import png_bytes

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # a red image stays red
    gray = rng.integers(0, 256, (41, 29), dtype=np.uint8)
    for img, mode in ((rgb, "RGB"), (gray, "L")):
        back = Image.open(io.BytesIO(png_bytes(img)))
        assert back.mode == mode
        np.testing.assert_array_equal(np.asarray(back), img)
    assert png_bytes(rgb[:, ::-1])[:8] == b"\x89PNG\r\n\x1a\n"  # a strided view is encoded too
