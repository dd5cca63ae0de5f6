"""`--resume RUN` for the commands that start runs (train, pretrain): one rule for both."""
from __future__ import annotations

from klgrade.errors import UserError


def resume_if_asked(args, given: dict, allowed: tuple[str, ...], loop, other_flags: tuple[str, ...] = ()) -> bool:
    """Resume ``args.resume`` with ``loop.resume`` when asked (True), refusing any flag but those in
    ``allowed``: a resumed run continues with its own config.yaml. False when not resuming."""
    if not args.resume:
        return False
    extra = sorted(set(given) - set(allowed)) + (["--out"] if args.out else []) + \
        [f"--{f}" for f in other_flags if getattr(args, f, None)]
    if extra:
        raise UserError(f"--resume continues {args.resume} with its own config.yaml; only "
                        f"--device/--workers may change (got {extra})")
    loop.resume(args.resume, device=given.get("device"), workers=given.get("workers"))
    return True
