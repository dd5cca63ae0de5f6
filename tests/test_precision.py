"""The CPU layout (fp32/bf16 x contiguous/channels-last) follows a measurement on the running CPU."""
from __future__ import annotations

import pytest
import torch

from klgrade.runs import precision
from klgrade.runs.precision import Layout, choose, cpu_layout


def test_choice_needs_a_clear_margin_over_fp32():
    base = Layout(False, False, 100.0)
    assert choose([Layout(True, True, 105.0), base]) == base  # within timing noise: stay fp32
    fast = Layout(True, True, 200.0)
    assert choose([fast, Layout(True, False, 150.0), base]) == fast


def test_measured_choice_is_cached_per_machine_and_model(tmp_path, monkeypatch):
    import timm

    monkeypatch.setenv(precision.ENV, "measure")
    calls = []
    real = precision.measure

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(precision, "measure", counting)
    model = timm.create_model("test_resnet", num_classes=5)
    first = cpu_layout(model, "test_resnet", 32, 4, train=True, allow_bf16=False, cache_dir=tmp_path)
    again = cpu_layout(model, "test_resnet", 32, 4, train=True, allow_bf16=False, cache_dir=tmp_path)
    assert len(calls) == 1 and (first.bf16, first.channels_last) == (again.bf16, again.channels_last)
    assert not first.bf16  # bf16 not allowed (no native bf16): never chosen
    cpu_layout(model, "test_resnet", 32, 4, train=False, allow_bf16=False, cache_dir=tmp_path)
    assert len(calls) == 2  # eval is measured on its own
    saved = (tmp_path / precision.CACHE_NAME).read_text()
    assert "fp32" not in saved or "images_per_s" in saved


def test_forced_layouts_and_a_bad_value(monkeypatch):
    model = torch.nn.Conv2d(3, 4, 3)
    for value, want in [("rule", (True, True)), ("fp32", (False, False)), ("bf16", (True, False)),
                        ("fp32+cl", (False, True))]:
        monkeypatch.setenv(precision.ENV, value)
        lay = cpu_layout(model, "conv", 16, 2, train=False, allow_bf16=True)
        assert (lay.bf16, lay.channels_last) == want
    monkeypatch.setenv(precision.ENV, "fp16")
    with pytest.raises(ValueError, match="KLGRADE_CPU_LAYOUT"):
        cpu_layout(model, "conv", 16, 2, train=False, allow_bf16=True)


def test_resumed_run_keeps_its_recorded_layout():
    from klgrade.runs.device import choose_layout

    dtype, cl = choose_layout(torch.device("cpu"), torch.nn.Identity(), "x", 16, 2, train=True,
                              recorded={"amp_dtype": "fp32", "channels_last": True})
    assert dtype is None and cl is True


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mean,std", [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5,) * 3, (0.5,) * 3)])
def test_cpu_model_input_is_bit_equal_to_the_torch_normalisation(channels_last, mean, std):
    """predict/evaluate build CPU model input in NumPy (no OpenMP wake-ups); it must equal, bit for
    bit, what the torch path (used on GPUs and in training) gives, in both memory layouts."""
    import numpy as np
    import torch

    from klgrade.view.batches import normalize, views_to_tensor

    views = np.random.default_rng(0).integers(0, 256, (5, 40, 40), dtype=np.uint8)
    views[0].flat[:256] = np.arange(256)  # every grey level
    got = views_to_tensor(views, mean, std, "cpu", channels_last=channels_last)
    want = normalize(torch.from_numpy(views).unsqueeze(1).float().div_(255.0), mean, std, channels_last)
    assert got.dtype == torch.float32 and got.shape == (5, 3, 40, 40)
    assert torch.equal(got, want)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)
