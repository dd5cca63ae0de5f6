"""Where and how a model runs: the device, autocast precision and memory layout (CPU: measured,
klgrade.runs.precision). Used by training, inference and pretraining alike."""
from __future__ import annotations

import torch

from klgrade.rundir import RunError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return dev


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AMX or AVX512-BF16): there bf16 autocast
    runs convolutions 2-3x faster than fp32; elsewhere it is emulated and slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def amp_dtype_for(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it (fp16 on older ones) and on CPUs with native bf16;
    none on other CPUs, where mixed precision is slower than fp32."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def use_channels_last(device: torch.device, amp_dtype: torch.dtype | None, wanted: bool = True) -> bool:
    """Channels-last pays off on GPUs and with oneDNN's bf16 kernels on the CPU (~30% faster)."""
    return wanted and (device.type == "cuda" or amp_dtype is not None)


def choose_layout(device: torch.device, model: torch.nn.Module, arch: str, img_size: int, batch: int,
                  train: bool, amp: bool = True, channels_last: bool = True, cache_dir=None,
                  recorded: dict | None = None) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, channels-last) for ``model`` on ``device``.

    GPUs: bf16 (fp16 on old ones) + channels-last. CPUs: whichever allowed layout measures fastest
    on this CPU (klgrade.runs.precision), bf16 only where the CPU has it natively. ``recorded``
    (a run's resolved config) is reused as is, so a resumed run keeps its precision."""
    if recorded and "amp_dtype" in recorded and "channels_last" in recorded:
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(recorded["amp_dtype"]))
        return dtype, bool(recorded["channels_last"])
    if device.type != "cpu":
        dtype = amp_dtype_for(device, amp)
        return dtype, use_channels_last(device, dtype, channels_last)
    from klgrade.runs.precision import cpu_layout

    layout = cpu_layout(model, arch, img_size, batch, train, allow_bf16=amp_dtype_for(device, amp) is not None,
                        allow_channels_last=channels_last, cache_dir=cache_dir)
    return layout.amp_dtype, layout.channels_last
