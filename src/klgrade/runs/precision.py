"""Precision and memory layout on the CPU, chosen by measurement on the running machine.

Which of fp32 / bf16 autocast and contiguous / channels-last is fastest depends on the CPU and on
the network: oneDNN's bf16 kernels need AMX or AVX512-BF16, and depthwise convolutions
(EfficientNet) gain from channels-last only in bf16 on AMD cores with AVX512-BF16 (fp32
channels-last eval there is ~10% slower than contiguous). Rules of thumb from one machine were
wrong on the next, so each candidate is timed for a few steps on random tensors of the real shape
and the fastest kept. The choice is cached per (CPU, flags, torch, architecture, size, batch, mode)
in ``$KLGRADE_CACHE/precision.json``, so a machine decides once and a run is reproducible; a run
records its choice in config.yaml and a resumed run reuses it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from klgrade.grades import N_GRADES

log = logging.getLogger(__name__)

# A candidate must beat the plain fp32 contiguous baseline by this factor to be chosen: timing noise
# on a shared machine must not flip the choice.
MARGIN = 1.08
CACHE_NAME = "precision.json"
# Override: measure (default) | rule (bf16 + channels-last wherever bf16 is native) | fp32 | fp32+cl |
# bf16 | bf16+cl. Tests pin "rule" so their numerics never depend on a timing.
ENV = "KLGRADE_CPU_LAYOUT"


@dataclass(frozen=True)
class Layout:
    bf16: bool
    channels_last: bool
    images_per_s: float = 0.0

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.bf16 else None

    @property
    def label(self) -> str:
        return ("bf16" if self.bf16 else "fp32") + (" + channels-last" if self.channels_last else "")


def cpu_signature() -> str:
    """CPU model + the ISA flags that decide oneDNN's kernels + torch version."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                keep = ("amx", "avx512_bf16", "avx512f", "avx2", "avx512_vnni", "avx_vnni")
                flags = " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(keep)))
                break
    except OSError:
        pass
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} | {flags} | torch {torch.__version__} | threads {torch.get_num_threads()}"


class _Candidate:
    """One layout's copy of the model and input, ready to time single steps."""

    def __init__(self, model, x, y, train: bool, layout: Layout):
        self.layout, self.train, self.y = layout, train, y
        self.m = copy.deepcopy(model)
        self.x = x
        if layout.channels_last:
            self.m, self.x = self.m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(self.m.parameters(), lr=1e-6) if train else None
        self.m.train(train)
        self.step()  # warm-up: oneDNN builds its kernels on the first call

    def step(self) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.layout.bf16):
            if self.train:
                loss = torch.nn.functional.cross_entropy(self.m(self.x).float(), self.y)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
            else:
                with torch.no_grad():
                    self.m(self.x)
        return time.perf_counter() - t0


def measure(model: torch.nn.Module, img_size: int, batch: int, train: bool, allow_bf16: bool,
            allow_channels_last: bool = True, rounds: int = 3) -> list[Layout]:
    """Every candidate layout with its measured images/s (fastest first). Candidates take turns, one
    step each per round, and each keeps its fastest step: a busy moment on a shared machine then slows
    one step of one candidate, not a whole candidate."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, generator=gen)
    n_out = int(getattr(model, "num_classes", N_GRADES) or N_GRADES)
    y = torch.randint(0, max(1, n_out), (batch,), generator=gen)
    layouts = [Layout(b, c) for b in ((False, True) if allow_bf16 else (False,))
               for c in ((False, True) if allow_channels_last else (False,))]
    cands = [_Candidate(model, x, y, train, lay) for lay in layouts]
    best = [c.step() for c in cands]
    for _ in range(rounds - 1):
        best = [min(b, c.step()) for b, c in zip(best, cands)]
    timed = [Layout(c.layout.bf16, c.layout.channels_last, batch / t) for c, t in zip(cands, best)]
    return sorted(timed, key=lambda lay: -lay.images_per_s)


def choose(timed: list[Layout]) -> Layout:
    base = next(t for t in timed if not t.bf16 and not t.channels_last)
    best = timed[0]
    return best if best.images_per_s >= MARGIN * base.images_per_s else base


def cpu_layout(model: torch.nn.Module, arch: str, img_size: int, batch: int, train: bool,
               allow_bf16: bool, allow_channels_last: bool = True, cache_dir: str | Path | None = None) -> Layout:
    """The fastest allowed layout for this model on this CPU: cached, else measured (seconds).
    ``allow_bf16`` should be False where the CPU has no native bf16 (it is emulated, always slower)."""
    if not allow_bf16 and not allow_channels_last:
        return Layout(False, False)
    forced = os.environ.get(ENV, "measure").strip().lower()
    if forced != "measure":
        return _forced_layout(forced, allow_bf16, allow_channels_last)
    from klgrade.view.cache import default_cache_dir

    file = Path(cache_dir or default_cache_dir()) / CACHE_NAME
    sig = (f"{cpu_signature()} | {arch} | {img_size}px | batch {batch} | {'train' if train else 'eval'}"
           f" | bf16 {allow_bf16} | cl {allow_channels_last}")
    key = hashlib.sha1(sig.encode()).hexdigest()[:16]
    cache = _read(file)
    if key in cache and isinstance(cache[key].get("choice"), dict):
        c = cache[key]["choice"]
        return Layout(bool(c["bf16"]), bool(c["channels_last"]), float(c.get("images_per_s", 0)))
    batch = min(batch, 16)  # enough to rank the kernels; keeps the measurement to seconds
    timed = measure(model, img_size, batch, train, allow_bf16, allow_channels_last)
    chosen = choose(timed)
    log.info("CPU layout for %s at %d px (%s): %s (%s)", arch, img_size, "train" if train else "eval",
             chosen.label, ", ".join(f"{t.label} {t.images_per_s:.1f} img/s" for t in timed))
    cache[key] = {"signature": sig, "choice": asdict(chosen), "measured": [asdict(t) for t in timed]}
    _write(file, cache)
    return chosen


def _forced_layout(forced: str, allow_bf16: bool, allow_channels_last: bool) -> Layout:
    if forced == "rule":
        return Layout(allow_bf16, allow_bf16 and allow_channels_last)
    if forced not in ("fp32", "fp32+cl", "bf16", "bf16+cl"):
        raise ValueError(f"{ENV}={forced!r}: expected measure, rule, fp32, fp32+cl, bf16 or bf16+cl")
    return Layout(forced.startswith("bf16") and allow_bf16, forced.endswith("+cl") and allow_channels_last)


def _read(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(file: Path, cache: dict) -> None:
    from klgrade import io

    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        io.write_json(file, cache)
    except OSError as e:  # a read-only cache only costs a re-measurement next time
        log.warning("could not cache the CPU layout choice in %s (%s)", file, e)
